"""Stage decode as a pure function: its batch form over an Arrow table gives facts, errors, changed
files and pixels, from the same per-record kernel the local engine's workers run."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from dinobatch.imaging.preprocess import model_input
from dinobatch.models.file import Preprocessing
from dinobatch.schema import Col
from dinobatch.stages.decode import ABSPATHS, CHANGED, CHANGED_PATHS, Contents, WorkItem, decode_batch, decode_item
from tests.helpers import picture, save

PREP = Preprocessing(resize=40, crop=32)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_batch_of_a_good_jpeg_a_corrupt_file_and_a_changed_one(tmp_path):
    good = save(picture(1, (120, 90)), tmp_path / "good.jpg", quality=90)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:200])
    changed = save(picture(2), tmp_path / "changed.png")
    stale = "f" * 64  # the sha256 fingerprint saw, before the file was rewritten
    batch = pa.table({ABSPATHS: [[os.fsencode(good)], [os.fsencode(corrupt)], [os.fsencode(changed)]],
                      Col.SHA256: [_sha(good), _sha(corrupt), stale]})
    table, pixels = decode_batch(batch, PREP)
    rows = table.to_pylist()
    assert [r[Col.SHA256] for r in rows] == [_sha(good), _sha(corrupt), stale]
    assert rows[0][Col.ERROR] is None and rows[0][CHANGED_PATHS] == []
    assert (rows[0][Col.FORMAT], rows[0][Col.WIDTH], rows[0][Col.HEIGHT]) == ("JPEG", 120, 90)
    assert len(rows[0][Col.PHASH]) == len(rows[0][Col.DHASH]) == 16
    assert rows[1][Col.ERROR] and rows[1][Col.FORMAT] is None  # a reason, no facts
    assert rows[2][Col.ERROR] == CHANGED and rows[2][CHANGED_PATHS] == [os.fsencode(changed)]
    assert pixels.shape == (3, 32, 32, 3) and pixels.dtype == np.uint8
    assert not pixels[1].any() and not pixels[2].any()  # rows in error have no pixels
    # the model input the DataLoader path prepares from the same kernel: the same pixels
    record = decode_item(WorkItem((str(good),), _sha(good)), PREP, lambda image: {"t": model_input(image, PREP)})
    assert np.array_equal(record["t"].permute(1, 2, 0).numpy(), pixels[0])
    assert record["facts"] == {c: rows[0][c] for c in record["facts"]}


def test_any_copy_with_the_right_bytes_will_do(tmp_path):
    first = save(picture(3), tmp_path / "a.png")
    second = tmp_path / "b.png"
    second.write_bytes(first.read_bytes())
    sha = _sha(first)
    save(picture(4), first)  # the first copy changed since it was hashed; its twin did not
    record = decode_item(WorkItem((str(first), str(second)), sha), PREP, lambda image: {})
    assert record["error"] is None and record["changed"] == (str(first),) and record["facts"][Col.FORMAT] == "PNG"


def test_contents_are_the_new_shas_first_seen_first_each_with_all_its_files():
    abspaths = pa.chunked_array([[b"/a", b"/b", b"/c"], [b"/d", b"/e"]])
    shas = pa.chunked_array([["s1", "s2", None], ["s1", "s3"]])
    contents = Contents(abspaths, shas, cached=pa.array(["s3"]))
    assert list(contents) == [WorkItem(("/a", "/d"), "s1"), WorkItem(("/b",), "s2")]
    assert contents[-1] == WorkItem(("/b",), "s2")
    assert contents.table().to_pylist() == [{ABSPATHS: [b"/a", b"/d"], Col.SHA256: "s1"},
                                            {ABSPATHS: [b"/b"], Col.SHA256: "s2"}]
