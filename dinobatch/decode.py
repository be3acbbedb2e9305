"""Decode image bytes once into facts, perceptual hashes and an RGB picture for the model."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["Decoded", "DecodeError", "decode", "to_rgb", "MAX_PIXELS", "HASH_MIN_SIDE", "Hashes",
           "decode_hashes", "SCAN_MIN_SIDE", "quiet_decoding"]

log = logging.getLogger(__name__)

# Declared sizes above this are refused before any pixel is allocated (Pillow's own default limit).
MAX_PIXELS = 89_478_485
# Pictures are decoded (JPEG: at a reduced DCT scale) or reduced to a shorter side of at least
# max(this, the model's resize); for every model that resizes to <= 256 (all torchvision ResNet
# recipes) hashes are therefore the same whichever model asked for the decode.
HASH_MIN_SIDE = 256
# Formats Pillow may try. Anything else (EPS, which runs Ghostscript; PDF; WMF; ...) is refused.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "CUR", "AVIF",
           "JPEG2000", "PPM", "PCX", "TGA", "PSD", "QOI", "DDS", "XBM", "ICNS", "SGI")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


class DecodeError(Exception):
    """The bytes are not an image Pillow can decode safely; the message is shown to the user."""


@dataclass(frozen=True)
class Hashes:
    """What a hash-only decode yields: facts about the file and its hashes, no picture."""

    format: str
    width: int  # as displayed (EXIF orientation applied), full resolution
    height: int
    mode: str  # the stored pixel mode, before conversion
    phash: str
    dhash: str


@dataclass(frozen=True)
class Decoded(Hashes):
    """What one decode yields: facts about the file, its hashes and the picture."""

    image: Image.Image  # RGB, oriented, possibly reduced in size by JPEG draft decoding
    orientation: int = 1  # the EXIF orientation that was applied to image (1: none)


def decode(data: bytes, *, min_side: int = HASH_MIN_SIDE) -> Decoded:
    """Decode bytes once: refuse bombs, take frame 0, orient, convert to RGB, hash."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _decode_errors():
        return _decode(data, min_side)


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (plugins register lazily, hence init())."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


@contextlib.contextmanager
def _silenced_c_stderr():
    """libtiff and friends print warnings straight to fd 2; keep cron mail clean unless debugging."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _open_checked(data: bytes) -> Image.Image:
    """Open (no pixels yet) an allowed format; refuse bombs and empty sizes before any allocation."""
    img = Image.open(io.BytesIO(data), formats=_available_formats())
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DecodeError(f"refused: declared size {width}x{height} exceeds the limit of "
                          f"{MAX_PIXELS} pixels (possible decompression bomb)")
    if width == 0 or height == 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    return img


def _decode(data: bytes, min_side: int) -> Decoded:
    img = _open_checked(data)
    fmt, mode = img.format or "unknown", img.mode
    width, height = img.size
    side = max(min_side, HASH_MIN_SIDE)
    if fmt in ("JPEG", "MPO"):
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (side, side))
    img.load()  # before any EXIF read: PNG's getexif() would load (and swallow a truncation) itself
    orientation = _orientation(img)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    if orientation in _TRANSPOSE:  # exif_transpose's transforms, without its copy of upright pictures
        img = img.transpose(_TRANSPOSE[orientation])
    rgb = to_rgb(img)
    factor = min(rgb.size) // side
    if factor >= 2:  # what JPEG's draft does while decoding, done after decoding for other formats
        rgb = rgb.reduce(factor)
    grey = rgb.convert("L")  # what both hash functions start with: convert once (same hashes)
    return Decoded(fmt, width, height, mode, _phash(grey), _dhash(grey), rgb, orientation)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image: {text}"
    return f"cannot decode image: {text}"


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF must not fail the image; orientation is then unknown
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img)
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError as exc:
            raise DecodeError(f"cannot convert pixel mode {img.mode} to RGB") from exc
    return img


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit and float greyscale to 8-bit L (or LA where a tRNS value marks transparency)."""
    arr = np.asarray(img)
    trns = img.info.get("transparency")
    mask = (arr == trns) if isinstance(trns, int) else None
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float32))
        lo, hi = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (float(arr.min()), float(arr.max()))
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0:  # the bit depth actually used (8, 12, 16, ...): 12-bit data in 16-bit files is common
            lo, hi = 0.0, float(2 ** max(8, int(np.ceil(np.log2(hi + 1)))) - 1)
    scaled = np.clip((arr - lo) * np.float32(255.0 / max(hi - lo, 1e-12)), 0, 255).round().astype(np.uint8)
    grey = Image.fromarray(scaled, "L")
    if mask is None:
        return grey
    alpha = Image.fromarray(np.where(mask, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


# ---- hash-only decoding, for `dinobatch scan` -------------------------------------------------

# scan decodes JPEG at the smallest DCT scale (up to 1/8) that keeps the shorter side >= this:
# pHash resizes to 32x32 and dHash to 9x8, so 64 px keeps every detail they look at. Pictures
# are then reduced, like decode()'s, only to a shorter side >= HASH_MIN_SIDE, so that scan hashes
# the picture classify hashes, but for JPEGs that classify decodes at 1/2 or 1/4 scale and scan at 1/8.
SCAN_MIN_SIDE = 64
# Modes reduce() takes as they are: for L and RGB, reduce-then-to_rgb is exactly to_rgb-then-reduce
# (decode()'s order); 32-bit I and F get their 8-bit scaling from the reduced copy. Other modes are
# converted then reduced a band of rows at a time.
_REDUCE_AS_IS = ("L", "RGB", "I", "F")
_BAND_PIXELS = 1 << 22  # pixels converted at once in _reduce_in_bands: ~16 MB of extra memory
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}



def decode_hashes(data: bytes, *, heavy: Callable[[int], ContextManager[Any]] | None = None) -> Hashes:
    """Facts, pHash and dHash from as small a decode as the hashes allow, keeping no picture.

    Every safety of decode() holds (format allowlist, bombs refused before allocation, frame 0,
    EXIF orientation, C-library stderr silenced, every failure a DecodeError). JPEG is decoded at
    the smallest DCT scale keeping the shorter side >= SCAN_MIN_SIDE (greyscale where it is YCbCr
    or grey); other formats are reduced by an integer factor before any conversion, so memory is
    about one copy of the decoded image. JPEGs between about 512 and 2048 px on the shorter side are
    thus hashed from a smaller picture than decode()'s and their hashes may differ by a few bits.
    heavy(n), when given, is entered around a decode that allocates n bytes, so that a caller running
    several decodes at once can let only one big one in at a time.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _decode_errors():
        return _decode_hashes(data, heavy or _no_gate)


_quiet_depth = 0  # > 0 inside quiet_decoding(): nested decodes skip setting it up again


@contextlib.contextmanager
def quiet_decoding() -> Iterator[None]:
    """Bomb warnings as errors, other Pillow warnings ignored, C-library stderr silenced.

    decode() and decode_hashes() enter it themselves; a worker decoding many files enters it once
    around them all, which saves four file-descriptor calls and a warnings-filter copy per file."""
    global _quiet_depth
    if _quiet_depth:
        yield
        return
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; a warning is a refusal here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "corrupt EXIF" and the like: not actionable
        with _silenced_c_stderr():
            _quiet_depth += 1
            try:
                yield
            finally:
                _quiet_depth -= 1


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Quiet decoding, and any failure a DecodeError (decode, decode_hashes)."""
    try:
        with quiet_decoding():
            yield
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"refused: possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not an image, or a format Pillow cannot identify") from exc
    except MemoryError as exc:
        raise DecodeError("refused: decoding needs more memory than is available") from exc
    except Exception as exc:  # any plugin failure on hostile bytes is this file's error, not the run's
        raise DecodeError(_reason(exc)) from exc


def _no_gate(nbytes: int) -> ContextManager[None]:
    return contextlib.nullcontext()


def _decode_hashes(data: bytes, heavy: Callable[[int], ContextManager[Any]]) -> Hashes:
    img = _open_checked(data)
    fmt, mode = img.format or "unknown", img.mode
    width, height = img.size
    if fmt in ("JPEG", "MPO"):  # greyscale straight from the decoder: the hashes are grey anyway
        img.draft("L" if img.mode in ("RGB", "YCbCr", "L") else img.mode, (SCAN_MIN_SIDE, SCAN_MIN_SIDE))
    with heavy(img.width * img.height * _bytes_per_pixel(img.mode)):
        img.load()  # before any EXIF read, as in decode()
        orientation = _orientation(img)
        small = _small_picture(img, HASH_MIN_SIDE)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    if orientation in _TRANSPOSE:  # on the small picture: no second full-size copy
        small = small.transpose(_TRANSPOSE[orientation])
    grey = small if small.mode == "L" else small.convert("L")
    return Hashes(fmt, width, height, mode, _phash(grey), _dhash(grey))


def _bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow allocates per pixel of an image in this mode."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _small_picture(img: Image.Image, min_side: int) -> Image.Image:
    """img reduced by an integer factor to a shorter side >= min_side, in L or RGB (to_rgb's rules)."""
    factor = min(img.size) // min_side
    if factor >= 2 and img.mode in _REDUCE_AS_IS and "transparency" not in img.info:
        img = img.reduce(factor)
    elif factor >= 2:
        img = _reduce_in_bands(img, factor)
    if img.mode == "L" and "transparency" not in img.info:
        return img  # the hashes work in L: no round trip through RGB
    return to_rgb(img)


def _reduce_in_bands(img: Image.Image, factor: int) -> Image.Image:
    """Convert (to_rgb, or 16-bit to 32-bit) then reduce, a band of rows at a time, so that modes
    reduce() cannot average (palette, alpha, CMYK, 16-bit) never need a second full-size copy."""
    high_depth = img.mode in _HIGH_DEPTH_MODES
    rows = max(1, _BAND_PIXELS // (img.width * factor)) * factor  # a multiple of factor: blocks align
    out = None
    for top in range(0, img.height, rows):
        band = img.crop((0, top, img.width, min(top + rows, img.height)))
        if high_depth:
            part = (band if band.mode in ("I", "F") else band.convert("I")).reduce(factor)
        else:
            part = to_rgb(band).reduce(factor)
        if out is None:
            out = Image.new(part.mode, (-(-img.width // factor), -(-img.height // factor)))
        out.paste(part, (0, top // factor))
    if high_depth and "transparency" in img.info:  # 8-bit scaling and the tRNS mask, on the small copy
        out.info["transparency"] = img.info["transparency"]
    return out


# Rows 0-7 of scipy.fftpack's unnormalised DCT-II of length 32 (what imagehash.phash applies).
_DCT_32_LOW = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)


def _phash(grey: Image.Image) -> str:
    """imagehash.phash(grey) as 16 hex digits, computed with numpy so that no process (classify's
    decode workers included) imports scipy (0.2-0.5 s each) just for a 32x32 DCT. Rounding the
    coefficients gives the exact zeros scipy's FFT gives on flat pictures; the result equals
    imagehash's (tested, blank pictures included)."""
    pixels = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = np.round(_DCT_32_LOW @ pixels @ _DCT_32_LOW.T, 7)
    ordered = np.sort(low, axis=None)
    return np.packbits(low > (ordered[31] + ordered[32]) / 2).tobytes().hex()  # above the median


def _dhash(grey: Image.Image) -> str:
    """imagehash.dhash(grey) as 16 hex digits: is each of 9x8 pixels brighter than its left neighbour."""
    pixels = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS))
    return np.packbits(pixels[:, 1:] > pixels[:, :-1]).tobytes().hex()
