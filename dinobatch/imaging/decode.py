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
           "decode_hashes", "SCAN_MIN_SIDE", "quiet_decoding", "HEIF_MISSING"]

log = logging.getLogger(__name__)

# Declared sizes above this are refused before any pixel is allocated (Pillow's own default limit).
MAX_PIXELS = 89_478_485
# Pictures are decoded (JPEG: at a reduced DCT scale) or reduced to a shorter side of at least
# max(this, the model's resize); for every model that resizes to <= 256 (all torchvision ResNet
# recipes) hashes are therefore the same whichever model asked for the decode.
HASH_MIN_SIDE = 256
# Formats Pillow may try, in this order. Anything else (EPS, which runs Ghostscript; PDF; WMF; ...)
# is refused. HEIF (phone photos, iPhones' HEIC) comes from pillow-heif, registered on first use
# (_heif_registered); it comes after AVIF so that AVIF stays Pillow's own.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "ICO", "CUR", "AVIF",
           "JPEG2000", "PPM", "PCX", "TGA", "PSD", "QOI", "DDS", "XBM", "ICNS", "SGI", "HEIF")
# The reason a HEIC/HEIF file gets where pillow-heif is not installed.
HEIF_MISSING = "HEIC/HEIF image, but HEIF support is not installed: pip install 'dinobatch[heif]'"
# ftyp major brands of HEIF files coded in HEVC (HEIC) or of plain HEIF (mif1, msf1; AVIF also uses
# these, so a file listing the avif brand is not taken for HEIC), as pillow-heif accepts them.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")

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
    # the EXIF orientation that was applied to image (1: none). HEIF is 1: libheif applies the
    # container's rotation and mirroring while decoding and pillow-heif resets the EXIF tag to 1.
    orientation: int = 1


def decode(data: bytes, *, min_side: int = HASH_MIN_SIDE,
           heavy: Callable[[int], ContextManager[Any]] | None = None) -> Decoded:
    """Decode bytes once: refuse bombs, take frame 0, orient, reduce, convert to RGB, hash.

    The picture is exactly what orienting, converting to RGB (transparency on white) and then
    reducing would give, but it is reduced before any conversion, so memory is about one copy of the
    decoded image whatever its mode. heavy(n), when given, is entered around the decode with the
    bytes it allocates, as in decode_hashes()."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with _decode_errors():
        return _decode(data, min_side, heavy or _no_gate)


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (plugins register lazily, hence init())."""
    Image.init()
    heif = _heif_registered()
    return tuple(f for f in FORMATS if f in Image.OPEN and (heif or f != "HEIF"))


def _heif_registered() -> bool:
    """Register pillow-heif's HEIF opener with Pillow, once per process; False without the heif extra.

    Done on the first decode, not at import: `dinobatch --help` and processes that never decode
    do not load libheif."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _looks_like_heif(data: bytes) -> bool:
    """The bytes start with an ISO-BMFF ftyp box of a HEIF brand (and do not list AVIF's)."""
    if data[4:8] != b"ftyp" or data[8:12] not in _HEIF_BRANDS:
        return False
    end = min(int.from_bytes(data[:4], "big"), len(data), 256)
    return b"avif" not in (data[i:i + 4] for i in range(16, end - 3, 4))  # the compatible brands


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
    formats = _available_formats()
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        if "HEIF" not in formats and _looks_like_heif(data):
            raise DecodeError(HEIF_MISSING) from None
        raise
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DecodeError(f"refused: declared size {width}x{height} exceeds the limit of "
                          f"{MAX_PIXELS} pixels (possible decompression bomb)")
    if width == 0 or height == 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    return img


def _decode(data: bytes, min_side: int, heavy: Callable[[int], ContextManager[Any]]) -> Decoded:
    side = max(min_side, HASH_MIN_SIDE)
    facts, orientation, small = _oriented_small(data, grey_jpeg=False, draft_side=side, min_side=side, heavy=heavy)
    grey = small if small.mode == "L" else small.convert("L")  # what both hash functions start with
    rgb = small if small.mode == "RGB" else small.convert("RGB")
    return Decoded(*facts, _phash(grey), _dhash(grey), rgb, orientation)


def _oriented_small(data: bytes, *, grey_jpeg: bool, draft_side: int, min_side: int,
                    heavy: Callable[[int], ContextManager[Any]]) -> tuple[tuple[str, int, int, str], int, Image.Image]:
    """(format, width, height, mode) as displayed, the EXIF orientation, and the picture oriented and
    reduced to a shorter side >= min_side, in L or RGB; JPEG decoded at the smallest DCT scale
    keeping draft_side (in greyscale where grey_jpeg and the hashes are all that is wanted)."""
    img = _open_checked(data)
    fmt, mode = img.format or "unknown", img.mode
    width, height = img.size
    if fmt in ("JPEG", "MPO"):
        colour = img.mode in ("RGB", "YCbCr")
        target = "L" if grey_jpeg and (colour or img.mode == "L") else "RGB" if colour else img.mode
        img.draft(target, (draft_side, draft_side))
    with heavy(img.width * img.height * _bytes_per_pixel(img.mode)):
        img.load()  # before any EXIF read: PNG's getexif() would load (and swallow a truncation) itself
        orientation = _orientation(img)
        small = _small_picture(img, min_side, orientation)
        if small is not img:
            img.close()  # the full-size pixels go while heavy() still counts them
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return (fmt, width, height, mode), orientation, small


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


def to_rgb(img: Image.Image, depth_range: tuple[float, float] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white.

    16/32-bit and float images are scaled to 8 bits from depth_range (values that become 0 and
    255), by default their own (_depth_range); a band of a larger image passes the whole image's."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img, depth_range or _depth_range(img))
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


def _depth_range(img: Image.Image) -> tuple[float, float]:
    """The values of a 16/32-bit or float image that become 0 and 255 in 8 bits: [0, 1] for floats
    within it, else the image's range, or for non-negative integers the bit depth actually used
    (8, 12, 16, ...: 12-bit data in 16-bit files is common). Read a band of rows at a time."""
    rows = max(1, _BAND_PIXELS // img.width)
    lo, hi, floating = np.inf, -np.inf, False
    for top in range(0, img.height, rows):
        band = img if rows >= img.height else img.crop((0, top, img.width, min(top + rows, img.height)))
        arr = np.asarray(band)
        floating = arr.dtype.kind == "f"
        arr = np.nan_to_num(arr.astype(np.float32)) if floating else arr.astype(np.float32)
        lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
    if floating:
        return (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi)
    if lo >= 0:
        return 0.0, float(2 ** max(8, int(np.ceil(np.log2(hi + 1)))) - 1)
    return lo, hi


def _high_depth_to_8bit(img: Image.Image, depth_range: tuple[float, float]) -> Image.Image:
    """16/32-bit and float greyscale to 8-bit L (or LA where a tRNS value marks transparency)."""
    arr = np.asarray(img)
    trns = img.info.get("transparency")
    mask = (arr == trns) if isinstance(trns, int) else None
    arr = np.nan_to_num(arr.astype(np.float32)) if arr.dtype.kind == "f" else arr.astype(np.float32)
    lo, hi = depth_range
    scaled = np.clip((arr - lo) * np.float32(255.0 / max(hi - lo, 1e-12)), 0, 255).round().astype(np.uint8)
    grey = Image.fromarray(scaled, "L")
    if mask is None:
        return grey
    alpha = Image.fromarray(np.where(mask, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


# ---- reducing before converting (decode and decode_hashes) -------------------------------------

# Modes reduce() averages as they are, where reduce-then-to_rgb is exactly to_rgb-then-reduce.
# Other modes (palette, alpha, CMYK, 16-bit, float, a tRNS colour) are converted a band of rows at
# a time, so that no full-size converted copy is ever made.
_REDUCE_AS_IS = ("L", "RGB")
# Pixels converted at once: a palette band's RGBA, white, composite and RGB copies (16 B a pixel).
_BAND_PIXELS = 1 << 20
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# (right, bottom): the corner of the stored image that each orientation displays top left. Reducing
# the stored image with its whole blocks aligned there is reducing the displayed picture.
_TOP_LEFT_CORNER = {2: (True, False), 3: (True, True), 4: (False, True), 6: (False, True),
                    7: (True, True), 8: (True, False)}


def _bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow allocates per pixel of an image in this mode."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _small_picture(img: Image.Image, min_side: int, orientation: int = 1) -> Image.Image:
    """img oriented and reduced by an integer factor to a shorter side >= min_side, in L or RGB:
    exactly what orienting, to_rgb and reduce at full size give, without their full-size copies."""
    factor = max(1, min(img.size) // min_side)
    right, bottom = _TOP_LEFT_CORNER.get(orientation, (False, False))
    skip = (img.width % factor if right else 0, img.height % factor if bottom else 0)
    if img.mode in _REDUCE_AS_IS and "transparency" not in img.info:
        small = _reduce(img, factor, skip)
    else:
        small = _converted_in_bands(img, factor, skip)
    if orientation in _TRANSPOSE:  # on the small picture: no second full-size copy
        small = small.transpose(_TRANSPOSE[orientation])
    return small


def _reduce(img: Image.Image, factor: int, skip: tuple[int, int] = (0, 0)) -> Image.Image:
    """img.reduce(factor) with its blocks starting skip (x, y) pixels in: the partial blocks on the
    left and top edges instead of the right and bottom ones, as reducing the flipped image has them."""
    if factor == 1:
        return img
    if skip == (0, 0):
        return img.reduce(factor)
    (sx, sy), (w, h) = skip, img.size
    out = Image.new(img.mode, (-(-w // factor), -(-h // factor)))
    for x0, x1 in ((0, sx), (sx, w)):
        for y0, y1 in ((0, sy), (sy, h)):
            if x1 > x0 and y1 > y0:
                out.paste(img.reduce(factor, (x0, y0, x1, y1)), (-(-x0 // factor), -(-y0 // factor)))
    return out


def _converted_in_bands(img: Image.Image, factor: int, skip: tuple[int, int]) -> Image.Image:
    """_reduce(to_rgb(img), factor, skip), converting a band of rows at a time (bands that hold whole
    blocks); 16-bit and float bands are scaled to 8 bits by the whole image's range."""
    depth = _depth_range(img) if img.mode in _HIGH_DEPTH_MODES else None
    rows = max(1, _BAND_PIXELS // (img.width * factor)) * factor
    if rows >= img.height:
        return _reduce(to_rgb(img, depth), factor, skip)
    sx, sy = skip
    tops = ([0] if sy else []) + list(range(sy, img.height, rows))
    out = Image.new("RGB", (-(-img.width // factor), -(-img.height // factor)))
    for top, end in zip(tops, tops[1:] + [img.height]):
        band = to_rgb(img.crop((0, top, img.width, end)), depth)
        out.paste(_reduce(band, factor, (sx, 0)), (0, -(-top // factor)))
    return out


# ---- hash-only decoding, for `dinobatch scan` -------------------------------------------------

# scan decodes JPEG at the smallest DCT scale (up to 1/8) that keeps the shorter side >= this:
# pHash resizes to 32x32 and dHash to 9x8, so 64 px keeps every detail they look at. Pictures
# are then reduced, like decode()'s, only to a shorter side >= HASH_MIN_SIDE, so that scan hashes
# the picture classify hashes, but for JPEGs that classify decodes at 1/2 or 1/4 scale and scan at 1/8.
SCAN_MIN_SIDE = 64


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
    facts, _, small = _oriented_small(data, grey_jpeg=True, draft_side=SCAN_MIN_SIDE, min_side=HASH_MIN_SIDE,
                                      heavy=heavy)
    grey = small if small.mode == "L" else small.convert("L")
    return Hashes(*facts, _phash(grey), _dhash(grey))


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
