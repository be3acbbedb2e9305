"""The seed's augmentation levels: photo-taking conditions, then a horizontal flip; seeded.

Level 0: none (x1). Level 1: horizontal flip (x2). Levels 2-6: photo-taking conditions x2, x4,
x6, x8, x10, each followed by the flip (x2), so x4, x8, x12, x16, x20 in all. Condition 0 is
the picture as it is; conditions 1.. are random camera effects. Variant v of an image is
condition v // 2, flipped when v is odd (levels >= 1).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from dinobatch.errors import ConfigError

__all__ = ["LEVELS", "multiplier", "variant_of", "augment_image", "materialize", "augment", "Augmented"]

log = logging.getLogger(__name__)

LEVELS = {0: 1, 1: 1, 2: 2, 3: 4, 4: 6, 5: 8, 6: 10}  # level -> photo-taking conditions


def _check(level: int) -> None:
    if level not in LEVELS:
        raise ConfigError(f"augmentation level must be 0-6, got {level}")


def multiplier(level: int) -> int:
    """How many training samples each original becomes at this level."""
    _check(level)
    return LEVELS[level] * (2 if level >= 1 else 1)


def variant_of(level: int, v: int) -> tuple[int, bool]:
    """(condition index, flipped) of variant v; condition 0 is the unaltered picture."""
    _check(level)
    if not 0 <= v < multiplier(level):
        raise ConfigError(f"variant {v} out of range for level {level}")
    return (v // 2, v % 2 == 1) if level >= 1 else (0, False)


def _photo_conditions():
    """What a phone camera does to a picture of a model or a book (torchvision transforms v2)."""
    import torch
    from torchvision.transforms import v2

    white = (255, 255, 255)
    return v2.Compose([
        v2.RandomAffine(degrees=8, translate=(0.05, 0.05), scale=(1.0, 1.25), fill=white),  # tilt, crop, zoom
        v2.RandomPerspective(distortion_scale=0.15, p=0.5, fill=white),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.03),  # exposure and colour cast
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.3),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=0.02)], p=0.5),  # sensor noise
        v2.ToDtype(torch.uint8, scale=True),
        v2.ToPILImage(),
        _recompress,  # JPEG re-compression, quality 50-95
    ])


def _recompress(img: Image.Image) -> Image.Image:
    """JPEG re-compression with Pillow (torchvision's v2.JPEG goes through its deprecated io codecs)."""
    import io

    import torch

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(torch.randint(50, 96, ()).item()))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _seed(key: Sequence[Any]) -> int:
    return int.from_bytes(hashlib.sha256(repr(tuple(key)).encode()).digest()[:8], "little")


def augment_image(img: Image.Image, level: int, v: int, key: Sequence[Any]) -> Image.Image:
    """Variant v of an RGB picture; the same key and v always give the same pixels."""
    import torch

    condition, flipped = variant_of(level, v)
    if condition > 0:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(_seed((*key, condition)))
            img = _photo_conditions()(img)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


@dataclass
class Augmented:
    """materialize's result: the new manifest table, and the originals that could not be read."""

    table: Any  # pyarrow.Table in schema.manifest_schema
    unreadable: dict[str, str]  # original's path -> why; each is a row with status error in the table


def augment(manifest_path: str | Path, level: int, out: str | Path, *, splits: Sequence[str] = ("train",),
            seed: int = 0, wait: float = 0.0, progress=None) -> tuple[Augmented, Path]:
    """Write the variants and OUT/manifest.parquet, one run at a time per OUT (LockedError after `wait`)."""
    from dinobatch.io.lock import exclusive
    from dinobatch.training.manifest import load_manifest, write_manifest

    with exclusive(Path(out) / ".lock", wait=wait):
        result = materialize(load_manifest(manifest_path), level, out, splits=splits, seed=seed, progress=progress)
        return result, write_manifest(result.table, Path(out) / "manifest.parquet", out)


def materialize(manifest, level: int, out: str | Path, *, splits: Sequence[str] = ("train",),
                seed: int = 0, progress=None) -> Augmented:
    """Write every variant of the manifest's images in splits under out/<label>/, and return the new
    manifest table (in an Augmented): the variants (named by their original's sha256, so no two originals collide)
    plus the other rows (other splits, files that are not images) unchanged but pointing at the
    original files, so the result trains with its validation split. Variants keep their original's
    label, split and kind, carry one group per original and name it in 'source': augmented copies
    can never cross splits. An original that cannot be read stays as a row with status error."""
    import pyarrow as pa

    from dinobatch.imaging.decode import DecodeError, decode
    from dinobatch.io.walk import read_bytes, read_error
    from dinobatch.schema import STATUS_ERROR, STATUS_OK, Col, manifest_schema
    from dinobatch.training.manifest import describe_unreadable

    out = Path(out)
    rows = manifest.table.to_pylist()
    next_group = 1 + max((r[Col.GROUP] for r in rows if r[Col.GROUP] is not None), default=-1)
    new_rows, unreadable, done = [], {}, 0
    todo = sum(1 for r in rows if r[Col.STATUS] == STATUS_OK and r[Col.SPLIT] in splits)
    for row in rows:
        if row[Col.STATUS] != STATUS_OK or row[Col.SPLIT] not in splits:
            new_rows.append(_passed_through(row, manifest.abspath(row), out))
            continue
        try:
            rgb, why = decode(read_bytes(manifest.abspath(row))).image, None
        except OSError as exc:
            why = read_error(exc)
        except DecodeError as exc:
            why = str(exc)
        if why is not None:
            unreadable[row[Col.PATH]] = why
            new_rows.append({**_passed_through(row, manifest.abspath(row), out), Col.STATUS: STATUS_ERROR,
                             Col.ERROR: why, Col.SPLIT: None})
        else:
            group = row[Col.GROUP]
            if group is None:
                group, next_group = next_group, next_group + 1
            new_rows.extend(_variants(rgb, row, level, seed, group, out))
        done += 1
        if progress:
            progress("augment", done, todo)
    if unreadable:
        log.warning("%s; each is a row with status error in the new manifest", describe_unreadable(unreadable,
                                                                                                  "original"))
    return Augmented(pa.Table.from_pylist(new_rows, schema=manifest_schema()), unreadable)


def _passed_through(row: dict[str, Any], abspath: str, out: Path) -> dict[str, Any]:
    """A row as it is, its path made relative to out (where the new manifest's root is)."""
    import os

    from dinobatch.training.manifest import name_columns

    return {**row, **name_columns(os.path.relpath(abspath, out))}


def _variants(rgb: Image.Image, row: dict[str, Any], level: int, seed: int, group: int, out: Path) -> list[dict]:
    """Write every variant of one decoded original; their manifest rows."""
    from dinobatch.io.files import atomic_path
    from dinobatch.io.walk import sha256_file
    from dinobatch.schema import STATUS_OK, Col
    from dinobatch.training.manifest import label_folder, name_columns

    rows = []
    for v in range(multiplier(level)):
        img = augment_image(rgb, level, v, (seed, row[Col.PATH]))
        rel = f"{label_folder(row[Col.LABEL])}/{row[Col.SHA256][:16]}__v{v:02d}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / rel) as tmp:
            img.save(tmp, "JPEG", quality=92)
        rows.append({**name_columns(rel), Col.LABEL: row[Col.LABEL], Col.SPLIT: row[Col.SPLIT],
                     Col.STATUS: STATUS_OK, Col.WIDTH: img.width, Col.HEIGHT: img.height,
                     Col.SHA256: sha256_file(str(out / rel)), Col.GROUP: group, Col.KIND: row.get(Col.KIND),
                     Col.SOURCE: row[Col.PATH], Col.VARIANT: v})
    return rows
