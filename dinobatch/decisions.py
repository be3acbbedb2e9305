"""Apply a reviewer's decisions to a manifest (never to the images), and sort an inbox by copying."""

from __future__ import annotations

import csv
import getpass
import io
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import InputError
from .results import atomic_path
from .scan import sha256_file
from .schema import Col

__all__ = ["ACTIONS", "Change", "read_decisions", "relabel", "export"]

log = logging.getLogger(__name__)

ACTIONS = ("keep", "relabel", "remove")
STATUS_REMOVED = "removed"
AUDIT_FIELDS = ("time", "user", "manifest", "new_manifest", "path", "action", "old_label", "new_label", "note")


@dataclass(frozen=True)
class Change:
    path: str
    action: str
    old_label: str
    new_label: str | None
    note: str


def read_decisions(path: str | os.PathLike) -> list[dict[str, str]]:
    """Parse a decisions CSV (path,action[,label][,note]); any bad line refuses the whole file."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); save the decisions file as UTF-8") from exc
    except OSError as exc:
        raise InputError(f"cannot read decisions file {path}: {exc.strerror or exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = {"path", "action"} - set(reader.fieldnames or [])
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(sorted(missing))}; the header must be "
                         f"path,action[,label][,note]")
    rows = []
    for line, r in enumerate(reader, 2):
        p, action = (r.get("path") or "").strip(), (r.get("action") or "").strip().lower()
        label = (r.get("label") or "").strip()
        if action not in ACTIONS:
            raise InputError(f"{path}, line {line}: unknown action {action!r}; use {', '.join(ACTIONS)}")
        if action == "relabel" and not label:
            raise InputError(f"{path}, line {line}: relabel needs a label")
        if not p:
            raise InputError(f"{path}, line {line}: empty path")
        rows.append({"line": line, "path": p, "action": action, "label": label, "note": (r.get("note") or "").strip()})
    return rows


def _normalise(path: str, root: Path) -> str | None:
    """The root-relative, normalised spelling of a path (links are not followed: a decision is about
    the manifest's row, not about where a link points), or None when it leaves the root."""
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    rel = os.path.relpath(full, os.path.normpath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else Path(rel).as_posix()


def relabel(decisions_path: str, manifest_path: str, *, out: str | None = None, dry_run: bool = False,
            user: str | None = None) -> tuple[list[Change], Path | None]:
    """Check every decision, then write a new manifest version and append the changes to the audit log.

    Nothing is written when any decision is refused, or with dry_run. Image files are never touched."""
    from .manifest import load_manifest, write_manifest

    manifest = load_manifest(manifest_path)
    decisions = read_decisions(decisions_path)
    user = user or getpass.getuser()  # before anything is written: a failure here writes nothing
    rows = manifest.table.to_pylist()
    by_path = {_normalise(r[Col.PATH], manifest.root): r for r in rows}
    changes, decided = [], {}
    for d in decisions:
        rel = _normalise(d["path"], manifest.root)
        where = f"{decisions_path}, line {d['line']}"
        if rel is None:
            raise InputError(f"{where}: {d['path']} is outside the dataset root {manifest.root}")
        if rel not in by_path:
            raise InputError(f"{where}: {d['path']} is not in the manifest {manifest_path}")
        if rel in decided:
            raise InputError(f"{where}: {d['path']} was already decided on line {decided[rel]}")
        decided[rel] = d["line"]
        new = d["label"] if d["action"] == "relabel" else None
        changes.append(Change(rel, d["action"], by_path[rel][Col.LABEL], new, d["note"]))
    target = Path(out) if out else _next_version(Path(manifest_path))
    if target.suffix.lower() == ".csv":
        target = target.with_suffix(".parquet")
    if target.exists():
        raise InputError(f"{target} exists; a new manifest version never replaces a file")
    if dry_run:
        return changes, None
    for c in changes:
        row = by_path[c.path]
        if c.action == "relabel":
            row[Col.LABEL] = c.new_label
        elif c.action == "remove":  # kept in the manifest as a record, out of every split
            row[Col.STATUS], row[Col.SPLIT] = STATUS_REMOVED, None
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=manifest.table.schema)
    write_manifest(table, target, manifest.root)
    try:
        _append_audit(Path(manifest_path), target, changes, user)
    except OSError as exc:  # no version without its audit lines
        target.unlink(missing_ok=True)
        raise InputError(f"cannot append to the audit log beside {manifest_path}: {exc.strerror or exc}; "
                         f"nothing was changed") from exc
    return changes, target


def _next_version(path: Path) -> Path:
    """manifest.parquet -> manifest.v2.parquet (or the next free number); the original stays."""
    stem = path.stem
    base, _, number = stem.rpartition(".v")
    if base and number.isdigit():
        stem, n = base, int(number) + 1
    else:
        n = 2
    while (path.parent / f"{stem}.v{n}.parquet").exists():
        n += 1
    return path.parent / f"{stem}.v{n}.parquet"


def _append_audit(manifest: Path, new: Path, changes: list[Change], user: str) -> Path:
    """Append one line per change to <manifest stem>.audit.csv beside the manifest."""
    base, _, number = manifest.stem.rpartition(".v")
    stem = base if base and number.isdigit() else manifest.stem
    log_path = manifest.parent / f"{stem}.audit.csv"
    now = datetime.now(timezone.utc).isoformat()
    new_file = not log_path.exists()
    with open(log_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=AUDIT_FIELDS)
        if new_file:
            writer.writeheader()
        for c in changes:
            writer.writerow({"time": now, "user": user, "manifest": str(manifest), "new_manifest": str(new),
                             "path": c.path, "action": c.action, "old_label": c.old_label,
                             "new_label": c.new_label or "", "note": c.note})
        fh.flush()
        os.fsync(fh.fileno())
    return log_path


def export(predictions: str, to: str, *, min_confidence: float) -> dict[str, int]:
    """Copy (never move) each classified file to TO/<label>/ when confident, else to TO/_review/."""
    from .results import latest_run

    table, summary = latest_run(predictions)
    folder = summary.get("config", {}).get("folder")
    if not folder or not Path(folder).is_dir():
        raise InputError(f"the folder classified in {predictions} ({folder}) is not there any more")
    counts: dict[str, int] = {}
    for r in table.to_pylist():
        confident = r[Col.STATUS] != "error" and (r[Col.CONFIDENCE] or 0) >= min_confidence
        bucket = _bucket(r[Col.LABEL]) if confident else "_review"
        rel = os.fsdecode(r[Col.PATH_BYTES]) if r.get(Col.PATH_BYTES) else r[Col.PATH]  # the exact name
        source, target = Path(folder) / rel, Path(to) / bucket / rel
        if not source.is_file():
            log.warning("not copied, no longer there: %s", source)
            continue
        if target.exists():  # never overwrite: the same bytes are already there, or something else is
            same = target.is_file() and sha256_file(str(target)) == sha256_file(str(source))
            if not same:
                log.warning("not copied: %s exists with other content", target)
                counts["_skipped"] = counts.get("_skipped", 0) + 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, "copy to") as tmp:
            shutil.copy2(source, tmp)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts


def _bucket(label: str) -> str:
    """A label as a folder name that stays inside TO and never merges with _review."""
    name = label.replace("/", "_").replace(os.sep, "_")
    return f"label_{name}" if name in ("", ".", "..", "_review") else name
