"""Phone photos: HEIC/HEIF decoded through pillow-heif upright, hashed like their JPEG twin, and an error row
naming the extra where pillow-heif is missing."""

from __future__ import annotations

import io
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dinobatch.dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX
from dinobatch.imaging import decode as decode_module
from dinobatch.imaging.decode import HEIF_MISSING, DecodeError, decode, decode_hashes
from tests.helpers import jpeg_bytes, picture, save

pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra (pip install 'dinobatch[heif]') is not installed")


def bits(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def rotated_exif(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def heic_bytes(img: Image.Image, **kwargs) -> bytes:
    """img as a HEIC file written by pillow-heif (what an iPhone saves), without touching the disk."""
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    img.save(buf, format="HEIF", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture
def without_pillow_heif(monkeypatch):
    """pillow-heif unimportable, as where the heif extra is not installed; the formats are looked up again
    on both sides of the test, since each process registers the opener once."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    decode_module._available_formats.cache_clear()
    yield
    decode_module._available_formats.cache_clear()


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_heic_decodes_upright_with_the_hashes_of_its_jpeg_twin(orientation):
    img = picture(5, (1280, 960))
    heic = heic_bytes(img, exif=rotated_exif(orientation))
    twin = decode(jpeg_bytes(img, exif=rotated_exif(orientation)))
    for got in (decode(heic), decode_hashes(heic)):
        assert got.format == "HEIF"
        assert (got.width, got.height) == (twin.width, twin.height)
        assert bits(got.phash, twin.phash) <= DEFAULT_PHASH_MAX
        assert bits(got.dhash, twin.dhash) <= DEFAULT_DHASH_MAX
    picture_ = decode(heic).image
    assert picture_.size[0] < picture_.size[1] if orientation in (6, 8) else picture_.size[0] > picture_.size[1]


def test_a_sideways_heic_is_not_its_unrotated_self():
    """The hash check above can tell orientations apart: the same picture left sideways is far off."""
    img = picture(5, (1280, 960))
    upright, sideways = decode(heic_bytes(img, exif=rotated_exif(6))), decode(heic_bytes(img))
    assert bits(upright.phash, sideways.phash) > DEFAULT_PHASH_MAX


def test_a_truncated_heic_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode(heic_bytes(picture(2, (640, 480)))[:600])


def test_avif_stays_pillows_own():
    buf = io.BytesIO()
    picture(3, (320, 240)).save(buf, format="AVIF")
    assert decode(buf.getvalue()).format == "AVIF"


def test_without_the_extra_a_heic_is_a_decode_error_naming_it(without_pillow_heif):
    heic = heic_bytes(picture(4, (320, 240)))
    for decoder in (decode, decode_hashes):
        with pytest.raises(DecodeError, match=r"pip install 'dinobatch\[heif\]'"):
            decoder(heic)
    with pytest.raises(DecodeError, match="not an image") as raised:  # other unknown bytes keep their reason
        decode(b"\x00\x00\x00\x18ftypqt  " + bytes(64))
    assert "heif" not in str(raised.value)


def heic_folder(tmp_path):
    root = tmp_path / "phone"
    (root / "IMG_0001.HEIC").parent.mkdir(parents=True)
    (root / "IMG_0001.HEIC").write_bytes(heic_bytes(picture(6, (400, 300)), exif=rotated_exif(6)))
    save(picture(7), root / "b.jpg", quality=92)
    return root


def test_scan_gives_a_heic_an_ok_row(tmp_path):
    from dinobatch.cli.main import cli

    out = tmp_path / "scan.parquet"
    result = CliRunner().invoke(cli, ["scan", str(heic_folder(tmp_path)), "-o", str(out), "--workers", "0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = {r["path"]: r for r in pq.read_table(out).to_pylist()}["IMG_0001.HEIC"]
    assert (row["status"], row["format"], row["width"], row["height"]) == ("ok", "HEIF", 300, 400)


def test_classify_gives_a_heic_an_ok_row(tmp_path, tiny_model):
    from tests.helpers import run_classify

    _, rows = run_classify(heic_folder(tmp_path), tmp_path / "out", tiny_model)
    assert (rows["IMG_0001.HEIC"]["status"], rows["IMG_0001.HEIC"]["error"]) == ("ok", None)
    assert (rows["IMG_0001.HEIC"]["width"], rows["IMG_0001.HEIC"]["height"]) == (300, 400)


def test_without_the_extra_classify_gives_a_heic_an_error_row_naming_it(tmp_path, tiny_model, without_pillow_heif):
    from tests.helpers import run_classify

    summary, rows = run_classify(heic_folder(tmp_path), tmp_path / "out", tiny_model)
    assert (rows["IMG_0001.HEIC"]["status"], rows["IMG_0001.HEIC"]["error"]) == ("error", HEIF_MISSING)
    assert rows["b.jpg"]["status"] == "ok"
