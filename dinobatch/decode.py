"""Decode image bytes once into facts, perceptual hashes and an RGB picture for the model."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Decoded", "DecodeError", "decode", "to_rgb", "MAX_PIXELS", "HASH_MIN_SIDE"]

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


@dataclass
class Decoded:
    """What one decode yields: facts about the file, its hashes and the picture."""

    format: str
    width: int  # as displayed (EXIF orientation applied), full resolution
    height: int
    mode: str  # the stored pixel mode, before conversion
    phash: str
    dhash: str
    image: Image.Image  # RGB, oriented, possibly reduced in size by JPEG draft decoding
    orientation: int = 1  # the EXIF orientation that was applied to image (1: none)


def decode(data: bytes, *, min_side: int = HASH_MIN_SIDE) -> Decoded:
    """Decode bytes once: refuse bombs, take frame 0, orient, convert to RGB, hash."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; a warning is a refusal here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "corrupt EXIF" and the like: not actionable
        try:
            with _silenced_c_stderr():
                return _decode(data, min_side)
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


def _decode(data: bytes, min_side: int) -> Decoded:
    img = Image.open(io.BytesIO(data), formats=_available_formats())
    fmt, mode = img.format or "unknown", img.mode
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DecodeError(f"refused: declared size {width}x{height} exceeds the limit of "
                          f"{MAX_PIXELS} pixels (possible decompression bomb)")
    if width == 0 or height == 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    side = max(min_side, HASH_MIN_SIDE)
    if fmt in ("JPEG", "MPO"):
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (side, side))
    img.load()  # before any EXIF read: PNG's getexif() would load (and swallow a truncation) itself
    orientation = _orientation(img)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    img = _oriented(img)
    rgb = to_rgb(img)
    factor = min(rgb.size) // side
    if factor >= 2:  # what JPEG's draft does while decoding, done after decoding for other formats
        rgb = rgb.reduce(factor)
    return Decoded(fmt, width, height, mode, str(imagehash.phash(rgb)), str(imagehash.dhash(rgb)), rgb,
                   orientation)


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


def _oriented(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block: keep the pixels as stored
        log.debug("EXIF orientation not applied: %s", exc)
        return img


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
