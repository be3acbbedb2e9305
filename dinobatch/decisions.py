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
    rows, seen = [], {}
    for line, r in enumerate(reader, 2):
        p, action = (r.get("path") or "").strip(), (r.get("action") or "").strip().lower()
        label = (r.get("label") or "").strip()
        if action not in ACTIONS:
            raise InputError(f"{path}, line {line}: unknown action {action!r}; use {', '.join(ACTIONS)}")
        if action == "relabel" and not label:
            raise InputError(f"{path}, line {line}: relabel needs a label")
        if not p:
            raise InputError(f"{path}, line {line}: empty path")
        if p in seen:
            raise InputError(f"{path}, line {line}: {p} was already decided on line {seen[p]}")
        seen[p] = line
        rows.append({"line": line, "path": p, "action": action, "label": label, "note": (r.get("note") or "").strip()})
    return rows


def _normalise(path: str, root: Path, line: int, source: str) -> str:
    """The manifest-relative form of a decision's path; refuses paths that leave the dataset root."""
    full = (root / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    try:
        return full.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise InputError(f"{source}, line {line}: {path} is outside the dataset root {root}") from None


def relabel(decisions_path: str, manifest_path: str, *, out: str | None = None, dry_run: bool = False,
            user: str | None = None) -> tuple[list[Change], Path | None]:
    """Check every decision, then write a new manifest version and append the changes to the audit log.

    Nothing is written when any decision is refused, or with dry_run. Image files are never touched."""
    from .manifest import load_manifest, write_manifest

    manifest = load_manifest(manifest_path)
    decisions = read_decisions(decisions_path)
    rows = manifest.table.to_pylist()
    by_path = {r[Col.PATH]: r for r in rows}
    changes = []
    for d in decisions:
        rel = _normalise(d["path"], manifest.root, d["line"], decisions_path)
        row = by_path.get(rel)
        if row is None:
            raise InputError(f"{decisions_path}, line {d['line']}: {d['path']} is not in the manifest {manifest_path}")
        new = d["label"] if d["action"] == "relabel" else None
        changes.append(Change(rel, d["action"], row[Col.LABEL], new, d["note"]))
    if dry_run:
        return changes, None
    for c in changes:
        row = by_path[c.path]
        if c.action == "relabel":
            row[Col.LABEL] = c.new_label
        elif c.action == "remove":  # kept in the manifest as a record, out of every split
            row[Col.STATUS], row[Col.SPLIT] = STATUS_REMOVED, None
    import pyarrow as pa

    target = Path(out) if out else _next_version(Path(manifest_path))
    if target.suffix.lower() == ".csv":
        target = target.with_suffix(".parquet")
    table = pa.Table.from_pylist(rows, schema=manifest.table.schema)
    write_manifest(table, target, manifest.root)
    _append_audit(Path(manifest_path), target, changes, user or getpass.getuser())
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
    stem = manifest.stem.rpartition(".v")[0] if ".v" in manifest.stem else manifest.stem
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
        bucket = r[Col.LABEL].replace("/", "_") if confident else "_review"
        rel = os.fsdecode(r[Col.PATH_BYTES]) if r.get(Col.PATH_BYTES) else r[Col.PATH]  # the exact name
        source, target = Path(folder) / rel, Path(to) / bucket / rel
        if not source.is_file():
            log.warning("not copied, no longer there: %s", source)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, "copy to") as tmp:
            shutil.copy2(source, tmp)
        counts[bucket] = counts.get(bucket, 0) + 1
    return counts
