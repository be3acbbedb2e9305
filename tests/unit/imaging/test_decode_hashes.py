"""Hash-only decoding (dinobatch scan): decode()'s safety and facts, hashes close to decode()'s."""

from __future__ import annotations

import io
import struct
import zlib

import imagehash
import pytest
from PIL import Image

from dinobatch.imaging.decode import HASH_MIN_SIDE, DecodeError, decode, decode_hashes, to_rgb
from tests.helpers import jpeg_bytes, picture


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def bits(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def facts(d) -> tuple:
    return d.format, d.width, d.height, d.mode


@pytest.mark.parametrize("seed", range(12))
def test_hashes_agree_with_decode(seed):
    img = picture(seed, (1200, 900))
    exif = Image.Exif()
    exif[0x0112] = 6
    others = [png_bytes(im) for im in (img, img.convert("RGBA"), img.convert("P", palette=Image.ADAPTIVE),
                                       img.convert("L"), img.convert("LA"))]
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, "TIFF")
    for data in others + [buf.getvalue()]:  # not JPEG: the same picture as decode()'s, so the same hashes
        full, small = decode(data), decode_hashes(data)
        assert facts(small) == facts(full)
        assert (small.phash, small.dhash) == (full.phash, full.dhash)
    for data in (jpeg_bytes(img), jpeg_bytes(img, exif=exif.tobytes()), jpeg_bytes(img.convert("CMYK"))):
        full, small = decode(data), decode_hashes(data)  # decoded at 1/8 instead of 1/4: a few bits
        assert facts(small) == facts(full)
        assert bits(small.phash, full.phash) <= 4 and bits(small.dhash, full.dhash) <= 4


def test_large_jpeg_hashes_equal_decode_and_orientation_swaps_size():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = jpeg_bytes(picture(3, (4400, 3300)), exif=exif.tobytes())  # both decode at 1/8
    full, small = decode(data), decode_hashes(data)
    assert (small.width, small.height) == (3300, 4400)
    assert bits(small.phash, full.phash) <= 2 and bits(small.dhash, full.dhash) <= 1  # L vs RGB->L rounding


def test_transparent_pixels_are_hashed_as_white_in_a_reduced_picture():
    img = Image.new("RGBA", (1600, 1200), (255, 0, 0, 0))  # invisible red
    img.paste((0, 0, 255, 255), (400, 300, 1200, 900))
    on_white = Image.new("RGB", img.size, (255, 255, 255))
    on_white.paste((0, 0, 255), (400, 300, 1200, 900))
    expect = on_white.reduce(1200 // HASH_MIN_SIDE)
    got = decode_hashes(png_bytes(img))
    assert got.phash == str(imagehash.phash(expect)) and got.dhash == str(imagehash.dhash(expect))


def test_big_palette_and_16_bit_images_reduce_without_a_full_size_conversion():
    pal = picture(5, (3000, 2000)).convert("P", palette=Image.ADAPTIVE)
    data = png_bytes(pal, transparency=0)
    got = decode_hashes(data)
    expect = to_rgb(Image.open(io.BytesIO(data))).reduce(2000 // HASH_MIN_SIDE)  # what decode() hashes
    assert got.phash == str(imagehash.phash(expect))
    grey16 = Image.new("I;16", (3000, 2000), 1000)
    grey16.paste(40000, (0, 0, 1500, 2000))
    got = decode_hashes(png_bytes(grey16))
    assert (got.mode, got.width, got.height) == ("I;16", 3000, 2000)
    assert bits(got.dhash, decode(png_bytes(grey16)).dhash) <= 1


def test_heavy_gate_is_entered_with_the_size_of_the_decode():
    import contextlib

    seen = []

    def gate(nbytes):
        seen.append(nbytes)
        return contextlib.nullcontext()

    decode_hashes(png_bytes(Image.new("RGB", (2000, 1000))), heavy=gate)
    decode_hashes(jpeg_bytes(Image.new("RGB", (2000, 1000))), heavy=gate)
    assert seen == [2000 * 1000 * 4, 250 * 125 * 1]  # RGB as 4 bytes a pixel; JPEG: 1/8 scale, greyscale


def _png_with_declared_size(width: int, height: int) -> bytes:
    data = png_bytes(Image.new("L", (1, 1)))
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[8 + 25:]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
    (jpeg_bytes(picture(1))[:600], "truncated"),
    (_png_with_declared_size(20_000, 20_000), "decompression bomb"),
    (_png_with_declared_size(10_000, 10_000), "decompression bomb"),  # Pillow only warns: refused here
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),  # never handed to Ghostscript
])
def test_bad_bytes_are_decode_errors_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_hashes(data)


def test_first_frame_of_an_animation_is_hashed():
    frames = [picture(1, (200, 150)), picture(2, (200, 150))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert decode_hashes(buf.getvalue()).dhash == decode(buf.getvalue()).dhash


def test_thin_strip_is_hashed():
    got = decode_hashes(png_bytes(Image.new("RGB", (300_000, 1), (10, 200, 30))))
    assert (got.width, got.height) == (300_000, 1) and len(got.phash) == len(got.dhash) == 16


@pytest.mark.parametrize("img", [
    Image.new("L", (64, 64), 0), Image.new("L", (300, 200), 128), Image.new("RGB", (100, 80), (255, 255, 255)),
    Image.new("RGB", (1, 1), (3, 200, 9)), Image.linear_gradient("L"), Image.radial_gradient("L"),
    Image.linear_gradient("L").rotate(90).resize((700, 300)), Image.effect_noise((333, 222), 60),
], ids=["black", "grey", "white", "1x1", "gradient", "radial", "rotated-gradient", "noise"])
def test_flat_and_symmetric_pictures_hash_exactly_as_imagehash(img):
    # pHash is computed without scipy: flat pictures (exact zeros in scipy's DCT) must agree too
    data = png_bytes(img)
    full, small = decode(data), decode_hashes(data)
    grey = to_rgb(img).convert("L")
    assert (full.phash, full.dhash) == (str(imagehash.phash(grey)), str(imagehash.dhash(grey)))
    assert (small.phash, small.dhash) == (full.phash, full.dhash)


@pytest.mark.parametrize("seed", range(6))
def test_decode_hashes_its_picture_exactly_as_imagehash(seed):
    exif = Image.Exif()
    exif[0x0112] = 6
    for data in (jpeg_bytes(picture(seed, (1200, 900)), exif=exif.tobytes()), png_bytes(picture(seed, (333, 500)))):
        got = decode(data)
        grey = got.image.convert("L")
        assert (got.phash, got.dhash) == (str(imagehash.phash(grey)), str(imagehash.dhash(grey)))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["P+t", "RGB", "I;16", "F"])
def test_scan_hashes_the_picture_classify_hashes_whatever_the_mode_and_orientation(mode, orientation):
    # reduced by 3 with partial blocks on two edges: scan and classify now reduce the same blocks of
    # the displayed picture, and scale 16-bit and float images from the whole image's range
    from tests.helpers import encode_oriented as encode
    from tests.helpers import odd_picture

    img, options = odd_picture(mode)
    data = encode(img, orientation, **options)
    full, small = decode(data), decode_hashes(data)
    assert facts(small) == facts(full)
    assert (small.phash, small.dhash) == (full.phash, full.dhash)
