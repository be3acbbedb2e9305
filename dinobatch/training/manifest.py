"""Labelled datasets: build a manifest from a folder tree, split it without leaks, load it back.

A manifest is a Parquet file (schema.manifest_schema) whose paths are relative to a root folder
stored in its metadata; a CSV with ``path,label[,split][,kind]`` (paths relative to the CSV's
folder) is accepted wherever a manifest is. As in classify's rows, `path` is printable and
`path_bytes` holds the exact bytes of a name that `path` had to escape; readers open
Manifest.abspath, never `path`.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from dinobatch.dedupe.groups import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, DedupeItem, hashes_from_hex, linked_components
from dinobatch.errors import ConfigError, InputError
from dinobatch.imaging.decode import decode, quiet_decoding
from dinobatch.io.arrow import read_table, table_metadata, write_table
from dinobatch.io.walk import name_and_bytes, sha256_file, walk
from dinobatch.schema import SPLITS, STATUS_ERROR, STATUS_OK, Col, manifest_schema
from dinobatch.stages.hashes import hash_file

__all__ = ["Manifest", "build_manifest", "write_manifest", "load_manifest", "assign_splits", "name_columns",
           "exact_name", "unescape_name", "describe_unreadable", "label_folder"]

log = logging.getLogger(__name__)
_ROOT_KEY = b"dinobatch.root"
_ROOT_REL_KEY = b"dinobatch.root_relative"


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
        """The file a row names, exactly (undecodable bytes as surrogates, which os functions take)."""
        return os.path.join(self.root, exact_name(row))


def exact_name(row: dict[str, Any]) -> str:
    """A row's relative name as the file system spells it: path_bytes when `path` is escaped."""
    raw = row.get(Col.PATH_BYTES)
    return os.fsdecode(raw) if raw else row[Col.PATH]


def label_folder(label: str, reserved: tuple[str, ...] = ()) -> str:
    """A label as one folder name that stays inside the folder it is made in (augment's OUT, export's
    TO): a manifest can hold any label, and '..' or 'a/b' must not write outside or nest."""
    name = label.replace("/", "_").replace(os.sep, "_")
    return f"label_{name}" if name in ("", ".", "..", *reserved) else name


def name_columns(raw: str) -> dict[str, Any]:
    """path and path_bytes of a relative name as the file system spells it (the rule of scan's walk)."""
    shown, exact = name_and_bytes(raw)
    return {Col.PATH: shown, Col.PATH_BYTES: exact}


def describe_unreadable(failed: Mapping[str, str], noun: str = "image", limit: int = 3) -> str:
    """'2 images could not be read: a (why); b (why)', naming the first few: for logs and summaries."""
    named = "; ".join(f"{path} ({why})" for path, why in sorted(failed.items())[:limit])
    more = f"; and {len(failed) - limit} more" if len(failed) > limit else ""
    return f"{len(failed)} {noun}{'' if len(failed) == 1 else 's'} could not be read: {named}{more}"


# A file's (pHash, dHash) as 16 hex digits each, or None where it has none: kept beside its row,
# never in it, until the duplicate components are known.
Hashes = tuple[str, str] | None


def _inspect(abspath: str) -> tuple[dict[str, Any], Hashes]:
    """A file's row facts (sha256, status, error, width, height) and its hashes from scan's stage
    kernel (one read), or the row's error and None. Decoded as classify decodes, not with scan's
    smaller hash-only JPEG scale: its hashes differ by a bit or two on some JPEGs, which would move
    files between splits of a manifest rebuilt from the same folder and seed."""
    sha, _, facts, error = hash_file(abspath, None, decoder=decode)
    if facts is None:
        return {Col.SHA256: sha, Col.STATUS: STATUS_ERROR, Col.ERROR: error}, None
    _, width, height, _, phash, dhash = facts
    row = {Col.SHA256: sha, Col.STATUS: STATUS_OK, Col.ERROR: None, Col.WIDTH: width, Col.HEIGHT: height}
    return row, (phash, dhash)


def _unreadable(error: str) -> tuple[dict[str, Any], Hashes]:
    """The row facts of a file the walk could not list or stat."""
    return {Col.STATUS: STATUS_ERROR, Col.ERROR: error}, None


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
    hashes: list[Hashes] = []
    # quiet_decoding entered once, here: the threads' decodes then never swap fd 2 under each other
    with quiet_decoding(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow frees the GIL
        facts = pool.map(lambda e: _unreadable(e.error) if e.error else _inspect(e.abspath), entries)
        for done, (entry, (fact, hashed)) in enumerate(zip(entries, facts), 1):
            rows.append({Col.PATH: entry.path, Col.PATH_BYTES: entry.raw, Col.LABEL: entry.path.split("/", 1)[0],
                         Col.KIND: kind, **fact})
            hashes.append(hashed)
            if progress:
                progress("manifest", done, len(entries))
    _group_and_split(rows, hashes, fractions, seed, phash_max, dhash_max)
    return pa.Table.from_pylist(rows, schema=manifest_schema())


def _group_and_split(rows: list[dict[str, Any]], hashes: Sequence[Hashes], fractions, seed, phash_max,
                     dhash_max) -> None:
    """Give every usable row a split, keeping each duplicate component (chains included) together.

    hashes: each row's (pHash, dHash), None for a row in error. Rows that already have a split
    (from a CSV) keep it; the others are split among themselves."""
    ok = [r for r in rows if r[Col.STATUS] == STATUS_OK]
    phash, dhash = (hashes_from_hex([h[k] for h in hashes if h is not None]).tolist() for k in (0, 1))
    items = [DedupeItem(r[Col.PATH], r[Col.SHA256], p, d, r[Col.WIDTH] * r[Col.HEIGHT])
             for r, p, d in zip(ok, phash, dhash, strict=True)]
    component = {x.path: number for number, members in enumerate(linked_components(items, phash_max, dhash_max))
                 for x in members}
    next_id = max(component.values(), default=-1) + 1
    units: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        gid = component.get(r[Col.PATH])
        if gid is None:
            gid, next_id = next_id, next_id + 1
        else:
            r[Col.GROUP] = gid
        units.setdefault(gid, []).append(r)
    todo = {gid: members for gid, members in units.items() if not any(m.get(Col.SPLIT) for m in members)}
    splits = assign_splits([(gid, members[0][Col.LABEL], len(members)) for gid, members in todo.items()],
                           fractions, seed)
    for gid, members in units.items():
        given = {m[Col.SPLIT] for m in members if m.get(Col.SPLIT)}
        if len(given) > 1:
            log.warning("duplicates of %s are in splits %s: that leaks between splits", members[0][Col.PATH],
                        ", ".join(sorted(given)))
        for r in members:
            r[Col.SPLIT] = r.get(Col.SPLIT) or (splits[gid] if gid in splits else sorted(given)[0])


def write_manifest(table: pa.Table, out: str | os.PathLike, root: str | os.PathLike,
                   extra: dict[bytes, bytes] | None = None) -> Path:
    """Write a manifest Parquet file that remembers the folder its paths are relative to, both
    absolutely and relative to the manifest itself (so data and manifest can move together);
    `extra` metadata (relabel's audit lines) travels inside the same file."""
    out_dir = Path(out).resolve().parent
    meta = {**(extra or {}), _ROOT_KEY: os.fsencode(os.path.abspath(root)),
            _ROOT_REL_KEY: os.fsencode(os.path.relpath(os.path.abspath(root), out_dir))}
    return write_table(table.replace_schema_metadata(meta), out)


def _root_of(path: Path) -> Path:
    meta = table_metadata(path)
    candidates = [Path(os.fsdecode(meta[_ROOT_KEY]))] if _ROOT_KEY in meta else []
    if _ROOT_REL_KEY in meta:
        candidates.append(path.resolve().parent / os.fsdecode(meta[_ROOT_REL_KEY]))
    for root in candidates:
        if root.is_dir():
            return root
    if candidates:
        raise InputError(f"the images of manifest {path} are not where it says ({candidates[0]}); "
                         f"keep the manifest beside its data or rebuild it")
    return path.resolve().parent


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
        root = _root_of(path)
        table = table.select([n for n in manifest_schema().names if n in table.column_names])
        if Col.PATH_BYTES not in table.column_names:
            table = table.add_column(1, manifest_schema().field(Col.PATH_BYTES), _legacy_names(table, root))
    return Manifest(table, root, path, sha256_file(str(path)))


_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def unescape_name(shown: str) -> bytes:
    """The bytes of a name scan.display_path showed: a doubled backslash is one, \\xNN is byte NN."""
    return _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]), shown.encode())


def _legacy_names(table: pa.Table, root: Path) -> pa.Array:
    """path_bytes for a manifest written before the column: its paths were shown escaped (the first
    ones kept a backslash as it was), so a row whose unescaped name is a file there gets it."""
    out: list[bytes | None] = []
    for shown in table.column(Col.PATH).to_pylist():
        raw = unescape_name(shown) if "\\" in shown else None
        keep = raw is not None and raw != shown.encode() and os.path.isfile(os.path.join(os.fsencode(root), raw))
        out.append(raw if keep else None)
    return pa.array(out, pa.binary())


def _load_csv(path: Path) -> pa.Table:
    """CSV manifest: path and label required; split and kind optional. Each file is decoded like a
    built manifest's; rows without a split get one (duplicate components kept together)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label"} - set(reader.fieldnames or [])
            if missing:
                raise InputError(f"{path}: CSV manifest needs columns path,label (missing {', '.join(sorted(missing))})")
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read CSV manifest {path}: {exc}") from exc
    rows, hashes = [], []
    for line, r in enumerate(raw, 2):
        rel, label = (r.get("path") or "").strip(), (r.get("label") or "").strip()
        if not rel or not label:
            raise InputError(f"{path}, line {line}: path and label must not be empty")
        split = (r.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise InputError(f"{path}, line {line}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        fact, hashed = _inspect(os.path.join(path.parent, rel))
        rows.append({**name_columns(rel), Col.LABEL: label, Col.SPLIT: split,
                     Col.KIND: (r.get("kind") or "").strip() or None, **fact})
        hashes.append(hashed)
    _group_and_split(rows, hashes, (0.8, 0.1, 0.1), 0, DEFAULT_PHASH_MAX, DEFAULT_DHASH_MAX)
    for r in rows:
        if r[Col.STATUS] != STATUS_OK:
            r[Col.SPLIT] = None
    return pa.Table.from_pylist(rows, schema=manifest_schema())
