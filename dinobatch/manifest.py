"""Labelled datasets: build a manifest from a folder tree, split it without leaks, load it back.

A manifest is a Parquet file (schema.manifest_schema) whose paths are relative to a root folder
stored in its metadata; a CSV with ``path,label[,split][,kind]`` (paths relative to the CSV's
folder) is accepted wherever a manifest is.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from .decode import DecodeError, decode
from .dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, DedupeItem, group_duplicates
from .errors import ConfigError, InputError
from .results import read_table, table_metadata, write_table
from .scan import read_bytes, sha256_file, walk
from .schema import SPLITS, STATUS_ERROR, STATUS_OK, Col, manifest_schema

__all__ = ["Manifest", "build_manifest", "write_manifest", "load_manifest", "assign_splits"]

log = logging.getLogger(__name__)
_ROOT_KEY = b"dinobatch.root"


@dataclass
class Manifest:
    """A loaded manifest: its rows, the folder its paths are relative to, and its fingerprint."""

    table: pa.Table
    root: Path
    path: Path
    sha256: str

    def rows(self, split: str | None = None) -> list[dict[str, Any]]:
        """Usable rows (status ok), optionally of one split, in file order."""
        rows = [r for r in self.table.to_pylist() if r[Col.STATUS] == STATUS_OK]
        return [r for r in rows if split is None or r[Col.SPLIT] == split]

    def labels(self) -> tuple[str, ...]:
        """Sorted labels of the usable rows: the class order of a model trained on it."""
        return tuple(sorted({r[Col.LABEL] for r in self.rows()}))

    def abspath(self, row: dict[str, Any]) -> str:
        return str(self.root / row[Col.PATH])


def _inspect(abspath: str) -> dict[str, Any]:
    """sha256, size and hashes of one file (decoded once), or its error."""
    try:
        data = read_bytes(abspath)
    except OSError as exc:
        return {Col.STATUS: STATUS_ERROR, Col.ERROR: f"cannot read file: {exc.strerror or exc}"}
    out: dict[str, Any] = {Col.SHA256: hashlib.sha256(data).hexdigest()}
    try:
        dec = decode(data)
    except DecodeError as exc:
        return {**out, Col.STATUS: STATUS_ERROR, Col.ERROR: str(exc)}
    return {**out, Col.STATUS: STATUS_OK, Col.ERROR: None, Col.WIDTH: dec.width, Col.HEIGHT: dec.height,
            "_phash": int(dec.phash, 16), "_dhash": int(dec.dhash, 16)}


def assign_splits(groups: Sequence[tuple[int, str, int]], fractions: Sequence[float],
                  seed: int) -> dict[int, str]:
    """Split (group id, label, files) so that each label's files follow fractions; a group stays whole.

    Per label, groups are shuffled (seeded), then placed largest first into the split furthest below
    its target, so duplicates never straddle splits and every split gets its share of every label."""
    by_label: dict[str, list[tuple[int, int]]] = {}
    for gid, label, size in groups:
        by_label.setdefault(label, []).append((gid, size))
    out: dict[int, str] = {}
    for label in sorted(by_label):
        members = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(members)
        members.sort(key=lambda m: -m[1])  # stable: ties keep the shuffled order
        total = sum(size for _, size in members)
        filled = {s: 0 for s in SPLITS}
        for gid, size in members:
            split = max(SPLITS, key=lambda s: (fractions[SPLITS.index(s)] * total - filled[s], -SPLITS.index(s)))
            out[gid] = split
            filled[split] += size
    return out


def build_manifest(folder: str | os.PathLike, *, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                   kind: str | None = None, phash_max: int = DEFAULT_PHASH_MAX, dhash_max: int = DEFAULT_DHASH_MAX,
                   progress: Callable[[str, int, int], None] | None = None) -> pa.Table:
    """List FOLDER/<label>/... as a manifest table with leak-free, label-stratified splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    found = list(walk(folder))
    entries = [e for e in found if "/" in e.path]  # label = first folder under FOLDER
    skipped = [e.path for e in found if "/" not in e.path]
    if skipped:
        log.info("ignoring %d file(s) directly in %s (no label folder)", len(skipped), folder)
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes without the GIL
        facts = pool.map(lambda e: {Col.STATUS: STATUS_ERROR, Col.ERROR: e.error} if e.error else _inspect(e.abspath),
                         entries)
        for done, (entry, fact) in enumerate(zip(entries, facts), 1):
            rows.append({Col.PATH: entry.path, Col.LABEL: entry.path.split("/", 1)[0], Col.KIND: kind, **fact})
            if progress:
                progress("manifest", done, len(entries))
    _group_and_split(rows, fractions, seed, phash_max, dhash_max)
    for r in rows:
        r.pop("_phash", None)
        r.pop("_dhash", None)
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def _group_and_split(rows: list[dict[str, Any]], fractions, seed, phash_max, dhash_max) -> None:
    ok = [r for r in rows if r[Col.STATUS] == STATUS_OK]
    items = [DedupeItem(r[Col.PATH], r[Col.SHA256], r["_phash"], r["_dhash"], r[Col.WIDTH] * r[Col.HEIGHT]) for r in ok]
    assigned = {a.path: a.group for a in group_duplicates(items, phash_max=phash_max, dhash_max=dhash_max)}
    next_id = max(assigned.values(), default=-1) + 1
    units: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        gid = assigned.get(r[Col.PATH])
        if gid is None:
            gid, next_id = next_id, next_id + 1
        else:
            r[Col.GROUP] = gid
        units.setdefault(gid, []).append(r)
    splits = assign_splits([(gid, members[0][Col.LABEL], len(members)) for gid, members in units.items()],
                           fractions, seed)
    for gid, members in units.items():
        for r in members:
            r[Col.SPLIT] = splits[gid]


def write_manifest(table: pa.Table, out: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Write a manifest Parquet file that remembers the folder its paths are relative to."""
    meta = {_ROOT_KEY: os.path.abspath(root).encode()}
    return write_table(table.replace_schema_metadata(meta), out)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Load a Parquet manifest or a path,label[,split][,kind] CSV."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    if path.suffix.lower() == ".csv":
        table, root = _load_csv(path), path.resolve().parent
    else:
        table = read_table(path)
        missing = {Col.PATH, Col.LABEL, Col.SPLIT, Col.STATUS} - set(table.column_names)
        if missing:
            raise InputError(f"{path} is not a dinobatch manifest (missing {', '.join(sorted(missing))})")
        root_meta = table_metadata(path).get(_ROOT_KEY)
        root = Path(root_meta.decode()) if root_meta else path.resolve().parent
        table = table.select([n for n in manifest_schema().names if n in table.column_names])
    return Manifest(table, root, path, sha256_file(str(path)))


def _load_csv(path: Path) -> pa.Table:
    """CSV manifest: path and label columns required; split and kind optional."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{path}: CSV manifest needs columns path,label (missing {', '.join(sorted(missing))})")
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read CSV manifest {path}: {exc}") from exc
    rows = []
    for line, r in enumerate(raw, 2):
        split = (r.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise InputError(f"{path}, line {line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        full = path.parent / r["path"]
        try:
            sha, status, error = sha256_file(str(full)), STATUS_OK, None
        except OSError as exc:
            sha, status, error = None, STATUS_ERROR, f"cannot read file: {exc.strerror or exc}"
        rows.append({Col.PATH: r["path"], Col.LABEL: r["label"].strip(), Col.SPLIT: split if status == STATUS_OK else None,
                     Col.SHA256: sha, Col.STATUS: status, Col.ERROR: error, Col.KIND: (r.get("kind") or "").strip() or None})
    return pa.Table.from_pylist(rows, schema=manifest_schema())
