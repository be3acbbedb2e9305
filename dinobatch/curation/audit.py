"""A manifest's versions and their audit log: published both or neither, finished after a kill.

relabel writes a new version (NAME.vN.parquet) and adds its decisions to NAME.audit.csv: two files,
which no single rename can publish together. So the version carries its own audit lines inside it
(Parquet metadata, written before the rename that publishes it) and the log is then rewritten
whole (temporary file, rename), never appended to in place. A run killed between the two leaves a
version whose lines the log lacks; the next relabel of the family, under the family's lock, copies
them in first. A run killed earlier leaves only hidden .tmp files, which that run deletes.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from dinobatch.errors import ConfigError, OutputError
from dinobatch.io.arrow import table_metadata
from dinobatch.io.files import atomic_path, fsync_dir
from dinobatch.io.terminal import spreadsheet_safe
from dinobatch.runtime import faults

__all__ = ["AUDIT_FIELDS", "Family", "new_record", "record_of", "complete_log", "publish"]

log = logging.getLogger(__name__)

AUDIT_FIELDS = ("time", "user", "manifest", "new_manifest", "path", "action", "old_label", "new_label", "note")
RECORD_KEY = b"dinobatch.relabel"  # a version's own audit lines and origin, as JSON
_PER_RUN = AUDIT_FIELDS[:4]  # the same on every line of one run: stored once in a version
_FORMAT = 1  # of that record; a record of another format is not read (its version is left as it is)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


@dataclass(frozen=True)
class Family:
    """A manifest and its versions (m.parquet, m.v2.parquet, ...), which share a lock and a log."""

    folder: Path
    stem: str

    @classmethod
    def of(cls, manifest: Path) -> "Family":
        base, _, number = manifest.stem.rpartition(".v")
        return cls(manifest.parent, base if base and number.isdigit() else manifest.stem)

    @property
    def lock(self) -> Path:
        return self.folder / f".{self.stem}.lock"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.stem}.audit.csv"

    def versions(self) -> list[Path]:
        """NAME.vN.parquet files here, by number."""
        pattern = re.compile(rf"{re.escape(self.stem)}\.v(\d+)\.parquet")
        found = [(int(m[1]), p) for p in self.folder.glob(f"{glob.escape(self.stem)}.v*.parquet")
                 if (m := pattern.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def next_version(self, after: Path) -> Path:
        """manifest.parquet -> manifest.v2.parquet, m.v2 -> m.v3 (or the next free number)."""
        base, _, number = after.stem.rpartition(".v")
        n = int(number) + 1 if base and number.isdigit() else 2
        while (self.folder / f"{self.stem}.v{n}.parquet").exists():
            n += 1
        return self.folder / f"{self.stem}.v{n}.parquet"

    def remove_leftovers(self, *others: Path) -> None:
        """Delete the hidden .tmp files of killed relabels of this family (only under its lock)."""
        names = [rf"{re.escape(self.stem)}\.v\d+\.parquet", re.escape(self.log.name)]
        places = {self.folder: names}
        for other in others:
            places.setdefault(other.parent, []).append(re.escape(other.name))
        for folder, patterns in places.items():
            # .NAME.<random>.tmp, and ..NAME.<random>.tmp.<random>.tmp of the staged version's own write
            leftover = re.compile(rf"\.\.?(?:{'|'.join(patterns)})\.[\w.]+\.tmp")
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                if leftover.fullmatch(tmp.name):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                        log.info("removed %s, left by a relabel that was killed", tmp)


def new_record(changes: list[tuple[str, ...]], *, origin: dict[str, str], source: Path, target: Path, user: str,
               log_path: Path) -> dict[str, Any]:
    """What a version carries: its audit lines (changes as path, action, old_label, new_label, note)
    and its origin (the sha256 of the manifest and decisions it came from), as JSON-ready values."""
    return {"format": _FORMAT, "origin": origin, "audit_log": os.path.relpath(log_path, target.parent),
            "time": datetime.now(timezone.utc).isoformat(), "user": user, "manifest": str(source),
            "new_manifest": str(target), "changes": [list(c) for c in changes]}


def lines_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record's audit lines, one per change, as the log holds them (before spreadsheet_safe)."""
    run = {f: str(record[f]) for f in _PER_RUN}
    lines = []
    for change in record["changes"]:
        if len(change) != len(AUDIT_FIELDS) - len(_PER_RUN) or not all(isinstance(v, str) for v in change):
            raise ValueError(f"a change that is not {len(AUDIT_FIELDS) - len(_PER_RUN)} strings: {change!r:.80}")
        lines.append({**run, **dict(zip(AUDIT_FIELDS[len(_PER_RUN):], change))})
    return lines


def record_of(version: Path) -> dict[str, Any] | None:
    """The audit lines and origin a version carries, or None (written by hand or by an older dinobatch)."""
    try:
        raw = table_metadata(version).get(RECORD_KEY)
        record = json.loads(raw) if raw else None
        if record is None or record.get("format") != _FORMAT:
            return None
        lines_of(record)  # every field there, every change complete
        str(record["origin"]["manifest_sha256"]), str(record["audit_log"])
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as exc:
        log.warning("ignoring the relabel record of %s, which cannot be read: %s", version, exc)
        return None


def _line(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(spreadsheet_safe(row[f] or "") for f in AUDIT_FIELDS)


def _logged(path: Path) -> set[tuple[str, ...]]:
    """Every line of an audit log, as written (a damaged tail ends the reading, with a warning)."""
    if not path.exists():
        return set()
    lines: set[tuple[str, ...]] = set()
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                lines.add(tuple(row.get(f) or "" for f in AUDIT_FIELDS))
        except csv.Error as exc:
            log.warning("%s is damaged after line %d (%s); its later lines are not checked", path,
                        reader.line_num, exc)
    return lines


def _same_file(a: Path, b: Path) -> bool:
    if os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def complete_log(family: Family, versions: list[Path]) -> list[Path]:
    """Copy into the family's log the lines of versions that carry lines it lacks (a killed run's)."""
    logged = _logged(family.log)
    missing: list[dict[str, str]] = []
    completed = []
    for version in versions:
        record = record_of(version)
        if record is None or not _same_file(version.parent / record["audit_log"], family.log):
            continue
        rows = [r for r in lines_of(record) if _line(r) not in logged]
        if rows:
            missing += rows
            completed.append(version)
    if missing:
        append_lines(family.log, missing)
        for version in completed:
            log.warning("added the audit lines of %s to %s: the relabel that wrote it was killed before it "
                        "could", version, family.log)
    return completed


def append_lines(path: Path, rows: list[dict[str, str]]) -> None:
    """Add rows to the audit log by writing the whole log anew, so a kill leaves the old one whole."""
    old = path.read_bytes() if path.exists() else b""
    text = io.StringIO()
    writer = csv.writer(text)
    if not old:
        writer.writerow(AUDIT_FIELDS)
    writer.writerows(_line(r) for r in rows)
    with atomic_path(path, "write the audit log") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(old)
            if old and not old.endswith(b"\n"):  # a line torn by an older dinobatch: keep it, on its own
                fh.write(b"\r\n")
            fh.write(text.getvalue().encode("utf-8"))
        if old:
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # a log someone made private stays private


def publish(table: pa.Table, target: Path, root: Path, record: dict[str, Any], log_path: Path) -> None:
    """Write target carrying its audit lines, never over an existing file, then add them to the log.

    On any failure before the log has them, target is removed again: both or neither."""
    from dinobatch.training.manifest import write_manifest

    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    published = logged = False
    try:
        write_manifest(table, staging, root, extra={RECORD_KEY: json.dumps(record).encode()})
        _link_new(staging, target)
        published = True
        staging.unlink()
        fsync_dir(target.parent)  # a power cut must not lose a version its log names
        faults.point("relabel", "published")
        try:
            append_lines(log_path, lines_of(record))
        except OutputError as exc:
            raise OutputError(f"{exc}; {target} was removed again, so nothing was changed") from exc
        logged = True
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            staging.unlink(missing_ok=True)
        if published and not logged and not _holds(log_path, record):  # an interrupt after the log's rename
            with contextlib.suppress(OSError):
                target.unlink()


def _holds(log_path: Path, record: dict[str, Any]) -> bool:
    """Whether the log has every line of record, so that the version it names must stay."""
    try:
        logged = _logged(log_path)
    except (OSError, ValueError):  # unreadable: not the log this run wrote
        return False
    return all(_line(r) in logged for r in lines_of(record))


def _link_new(staging: Path, target: Path) -> None:
    """Give staging the name target, failing if target exists: a version never replaces a file."""
    try:
        os.link(staging, target)
    except FileExistsError:
        raise ConfigError(f"{target} exists; a new manifest version never replaces a file") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
        # no hard links on this file system: the family's lock keeps other relabels out of the gap
        if target.exists():
            raise ConfigError(f"{target} exists; a new manifest version never replaces a file") from None
        os.replace(staging, target)
