"""Helpers shared by the tests, in one place: generated pictures and folders, a classify run, the CLI's commands.

Fixtures (`tiny_model`, `inbox`) live in tests/conftest.py and use these; a test imports plain helpers from
here (`from tests.helpers import picture, save`), never from conftest or from another test file.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ("triceratops", "stegosaurus", "velociraptor")


def picture(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A distinct RGB picture per seed: coloured shapes on a coloured background."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(8):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randrange(w // 6, w // 2), y0 + rng.randrange(h // 6, h // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> Path:
    """Save img at path (parent folders made), in fmt or the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kwargs)
    return path


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    """img as JPEG file contents (quality 92), without touching the disk."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kwargs)
    return buf.getvalue()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 and mode of every file under root: proof that a command left the input alone."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


def odd_picture(mode: str, size=(2601, 1553)) -> tuple[Image.Image, dict]:
    """A picture in mode and how to save it; by default reduced by 6, leaving partial blocks on two
    edges, and converted in four bands of rows (1 MP each)."""
    img = picture(11, size)
    if mode in ("P", "P+t"):
        return img.convert("P", palette=Image.ADAPTIVE), {"transparency": 0} if mode == "P+t" else {}
    if mode in ("L+t", "RGB+t"):
        return img.convert(mode[:-2]), {"transparency": 77 if mode == "L+t" else (12, 34, 56)}
    if mode.startswith("I;16"):
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 40 + 300  # 12 bits used of 16
        return Image.fromarray(arr), {"transparency": int(arr[0, 0])} if mode == "I;16+t" else {}
    if mode in ("I", "F"):
        arr = (np.asarray(img.convert("L"), dtype=np.float64) - 100) * (7.5 if mode == "F" else 1000)
        return Image.fromarray(arr.astype(np.int32 if mode == "I" else np.float32), mode), {}
    if mode in ("RGBA", "LA"):
        alpha = Image.linear_gradient("L").resize(size)
        return Image.merge(mode, (*img.convert(mode[0] if mode == "LA" else "RGB").split(), alpha)), {}
    return img.convert(mode), {}


def encode_oriented(img: Image.Image, orientation: int = 1, **kwargs) -> bytes:
    """img as PNG (TIFF for modes PNG cannot hold) with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "TIFF" if img.mode in ("CMYK", "I", "F") else "PNG", exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


def run_classify(folder, out, model, **kw):
    """classify FOLDER into OUT in process (no workers, batches of 4 unless kw says otherwise);
    returns the summary and the rows written, by path."""
    # imported here, not at the top: tests of the torch-free packages import this module
    from dinobatch.config import ClassifyConfig
    from dinobatch.jobs.classify import classify

    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    cfg = ClassifyConfig(folder=str(folder), out=str(out), model=str(model),
                         species=str(REPO / "manifests" / "species.csv"), **kw)
    summary = classify(cfg)
    return summary, {r["path"]: r for r in pq.read_table(summary.rows_file).to_pylist()}


def cli_commands(group, prefix=""):
    """(full name, command) of every leaf command under a Click group: 'classify', 'model import', ..."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from cli_commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command
