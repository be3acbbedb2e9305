"""Decoding: what a user sees of odd files is a correct picture or a readable reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import imagehash
import pytest
from PIL import Image

from dinobatch.imaging.decode import DecodeError, decode
from tests.helpers import encode_oriented as encode
from tests.helpers import jpeg_bytes, odd_picture, picture


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def test_transparent_pixels_are_composited_on_white_not_on_hidden_colour():
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # invisible red
    img.paste((0, 0, 255, 255), (10, 10, 30, 30))
    dec = decode(png_bytes(img))
    assert dec.image.mode == "RGB"
    assert dec.image.getpixel((0, 0)) == (255, 255, 255)
    assert dec.image.getpixel((20, 20)) == (0, 0, 255)


def test_palette_transparency_becomes_white():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    dec = decode(png_bytes(img, transparency=0))
    assert dec.image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied_and_size_reported_as_displayed():
    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    dec = decode(jpeg_bytes(img, exif=exif.tobytes()))
    assert (dec.width, dec.height) == (30, 60)
    assert dec.image.size == (30, 60)
    r, g, b = dec.image.getpixel((25, 4))  # the mark is now in the top-right corner
    assert r > 200 and g < 60 and b < 60


def test_cmyk_jpeg_is_converted_to_rgb():
    img = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan ink
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    dec = decode(buf.getvalue())
    assert dec.mode == "CMYK" and dec.image.mode == "RGB"
    r, g, b = dec.image.getpixel((16, 16))
    assert r < 40 and g > 215 and b > 215


def test_16_bit_grey_keeps_its_tones_instead_of_clipping_to_white():
    img = Image.new("I;16", (16, 16), 32768)
    dec = decode(png_bytes(img))
    value = dec.image.getpixel((8, 8))[0]
    assert 120 <= value <= 136


def test_first_frame_of_an_animation_is_used():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    dec = decode(buf.getvalue())
    r, g, b = dec.image.getpixel((10, 10))
    assert r > 200 and b < 50


def test_format_is_recognised_by_content_not_name():
    dec = decode(png_bytes(picture(1)))
    assert dec.format == "PNG"


def test_large_jpeg_is_decoded_reduced_but_reports_full_size():
    img = picture(3, (2048, 1536))
    dec = decode(jpeg_bytes(img), min_side=224)
    assert (dec.width, dec.height) == (2048, 1536)
    assert 256 <= min(dec.image.size) < 1536


def test_truncated_jpeg_is_an_error_that_says_truncated():
    with pytest.raises(DecodeError, match="truncated"):
        decode(jpeg_bytes(picture(2))[:600])


def test_non_image_and_empty_bytes_are_errors():
    with pytest.raises(DecodeError, match="not an image"):
        decode(b"hello, this is text\n" * 10)
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")


def _png_with_declared_size(width: int, height: int) -> bytes:
    data = png_bytes(Image.new("L", (1, 1)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + patched + data[8 + 25:]


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode(_png_with_declared_size(side, side))


def test_same_picture_in_two_formats_has_close_hashes():
    img = picture(5)
    a, b = decode(png_bytes(img)), decode(jpeg_bytes(img))
    ph = bin(int(a.phash, 16) ^ int(b.phash, 16)).count("1")
    dh = bin(int(a.dhash, 16) ^ int(b.dhash, 16)).count("1")
    assert ph <= 8 and dh <= 3


def test_declared_size_between_one_and_two_times_the_limit_is_refused_by_dinobatch():
    # Pillow itself only warns below twice its limit; dinobatch refuses from the limit on.
    with pytest.raises(DecodeError, match="decompression bomb|exceeds the limit"):
        decode(_png_with_declared_size(10_000, 10_000))


def test_thin_strip_becomes_a_crop_sized_model_input():
    from dinobatch.imaging.preprocess import model_input
    from dinobatch.models.file import Preprocessing

    strip = Image.new("RGB", (300_000, 1), (10, 200, 30))
    dec = decode(png_bytes(strip))
    tensor = model_input(dec.image, Preprocessing(resize=256, crop=224))
    assert tuple(tensor.shape) == (3, 224, 224)
    assert tensor[:, 112, 112].tolist() == [10, 200, 30]


def test_model_input_matches_torchvision_resize_then_crop():
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    from dinobatch.imaging.preprocess import model_input
    from dinobatch.models.file import Preprocessing

    for size in ((160, 120), (333, 1000)):
        img = picture(3, size)
        expected = F.pil_to_tensor(F.center_crop(F.resize(img, 256, InterpolationMode.BILINEAR), [224, 224]))
        got = model_input(img, Preprocessing(resize=256, crop=224))
        assert (got.int() - expected.int()).abs().max() <= 1


def test_formats_outside_the_allowlist_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(DecodeError, match="not an image"):
        decode(eps)


# ---- memory and exactness of reduce-before-convert ----------------------------------------------

_PEAK_OF_DECODE = """
import resource, sys
from dinobatch.imaging.decode import decode
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dec = decode(data)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, dec.image.size[0], dec.image.size[1], dec.phash, dec.dhash)
"""


@pytest.mark.parametrize("mode, fmt", [("P", "GIF"), ("RGBA", "PNG")])
def test_big_palette_and_alpha_images_decode_without_full_size_rgb_copies(tmp_path, mode, fmt):
    # 6000x6000 solid: a few KB on disk. Converting and compositing at full size, as decode did,
    # cost four to five full-size RGB(A) copies (~700 MB here); reduced first, the decoded image and
    # a band of rows at a time.
    import subprocess
    import sys

    side = 6000
    img = Image.new(mode, (side, side), 3 if mode == "P" else (200, 30, 60, 128))
    if mode == "P":
        img.putpalette([(i * 7) % 256 for i in range(768)])
    path = tmp_path / f"big.{fmt.lower()}"
    img.save(path, fmt)
    done = subprocess.run([sys.executable, "-c", _PEAK_OF_DECODE, str(path)], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2])
    grew, width, height, phash, dhash = done.stdout.split()
    decoded = side * side * (1 if mode == "P" else 4)  # what Pillow allocates for the stored image
    rgb_copy = side * side * 4  # one full-size RGB or RGBA picture
    assert int(grew) < decoded + rgb_copy
    assert (int(width), int(height)) == (261, 261)  # reduced by 6000 // 256 = 23
    flat = Image.new("L", (261, 261), 128)  # any flat grey but black hashes alike
    assert (phash, dhash) == (str(imagehash.phash(flat)), str(imagehash.dhash(flat)))


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def full_size_picture(data: bytes, min_side: int = 256) -> Image.Image:
    """What decode() gave before it reduced first: orient, convert at full size, then reduce."""
    from dinobatch.imaging.decode import to_rgb

    img = Image.open(io.BytesIO(data))
    img.load()
    orientation = img.getexif().get(0x0112, 1)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    rgb = to_rgb(img)
    factor = min(rgb.size) // min_side
    return rgb.reduce(factor) if factor >= 2 else rgb


@pytest.mark.parametrize("mode", ["P", "P+t", "RGBA", "LA", "L", "L+t", "RGB", "RGB+t", "1", "CMYK",
                                  "I;16", "I;16+t", "I", "F"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_first_picture_is_exactly_the_full_size_conversion(mode, orientation):
    img, options = odd_picture(mode)
    data = encode(img, orientation, **options)
    dec = decode(data)
    expect = full_size_picture(data)
    assert dec.image.mode == "RGB" and dec.image.size == expect.size
    assert dec.image.tobytes() == expect.tobytes()
    grey = expect.convert("L")
    assert (dec.phash, dec.dhash) == (str(imagehash.phash(grey)), str(imagehash.dhash(grey)))
    assert (dec.width, dec.height) == ((1553, 2601) if orientation == 6 else (2601, 1553))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["P", "RGB"])
def test_every_orientation_reduces_as_the_displayed_picture_would(mode, orientation):
    img, options = odd_picture(mode, (2601, 1031))  # reduced by 4 with partial blocks, in three bands
    data = encode(img, orientation, **options)
    assert decode(data).image.tobytes() == full_size_picture(data).tobytes()
