"""A reviewer's decisions, never lost: an append-only journal and the decisions.csv rebuilt from it.

Every decision is one JSON line appended to CURATE_OUT/decisions.jsonl and fsynced before it is
acknowledged; decisions.csv (the file `dinobatch relabel` takes) is then rewritten whole from the
journal (temporary file, fsync, rename), one row per file, the latest decision winning. "undo" takes
back a file's last decision. A line cut short by a kill is skipped (and reported) on read, so a killed
server loses at most the decision it had not yet acknowledged. Writers are serialised by a lock on
the journal (threads of one server, and two servers on the same folder), each catching up on lines
the other appended before adding its own.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import getpass
import json
import logging
import os
import threading
import unicodedata
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from dinobatch.curation.relabel import ACTIONS, label_problem
from dinobatch.errors import DataError, OutputError
from dinobatch.io.files import atomic_path, fsync_dir
from dinobatch.io.terminal import spreadsheet_safe

__all__ = ["JOURNAL", "DECISIONS_CSV", "CSV_COLUMNS", "UNDO", "Decision", "Journal", "read_journal", "replay",
           "new_decision", "csv_text", "queue_progress"]

log = logging.getLogger(__name__)

JOURNAL = "decisions.jsonl"
DECISIONS_CSV = "decisions.csv"
CSV_COLUMNS = ("path", "action", "label", "note", "reviewer", "decided_at")  # what relabel reads
UNDO = "undo"
NOTE_MAX = 2000  # characters: a note is a sentence, not a document
NAME_MAX = 100  # characters of a reviewer's name


@dataclass(frozen=True)
class Decision:
    """One event of the journal: a decision about one file (or the undo of its last one)."""

    path: str  # as the queue spells it (relabel resolves it against the manifest's root)
    action: str  # keep, relabel, remove or undo
    label: str  # the new label of a relabel, else ""
    note: str
    reviewer: str
    decided_at: str  # UTC, ISO 8601


def _text_problem(what: str, text: str, limit: int) -> str | None:
    """Why a free-text value cannot be stored (too long, or a character CSV readers refuse), or None."""
    if len(text) > limit:
        return f"{what} is longer than {limit} characters"
    if "\0" in text:
        return f"{what} holds a NUL character, which CSV readers refuse"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} is not valid Unicode text (a lone surrogate)"
    return None


def new_decision(path: str, action: str, label: str = "", note: str = "", reviewer: str | None = None) -> Decision:
    """A checked decision stamped with who and when; DataError naming what is wrong otherwise."""
    action = (action or "").strip().lower()
    label = (label or "").strip() if action == "relabel" else ""
    note = (note or "").strip()
    reviewer = reviewer or _login()
    problems = [p for p in (_text_problem("path", path or "", 4096), _text_problem("note", note, NOTE_MAX)) if p]
    if not (path or "").strip():
        problems.append("path is empty")
    if action not in (*ACTIONS, UNDO):
        problems.append(f"unknown action {action!r}; use {', '.join((*ACTIONS, UNDO))}")
    elif action == "relabel":
        why = label_problem(label) if label else "a relabel needs a label"
        if why:
            problems.append(f"label {label!r}: {why}")
    if len(reviewer) > NAME_MAX or not reviewer.strip() or any(unicodedata.category(c)[0] == "C" for c in reviewer):
        problems.append(f"reviewer {reviewer[:NAME_MAX]!r}: a name of at most {NAME_MAX} characters, "
                        f"without control characters")
    if problems:
        raise DataError("; ".join(problems))
    return Decision(path, action, label, note, reviewer, datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _login() -> str:
    """The login name, the reviewer when the page names none (a container may have no user entry)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _event(line: bytes) -> Decision | None:
    """A journal line as a Decision, or None when it is not one (cut short, or edited by hand)."""
    try:
        data = json.loads(line)
        event = Decision(**{k: data[k] for k in Decision.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, str) for v in asdict(event).values()) or event.action not in (*ACTIONS, UNDO):
        return None
    return event


def read_journal(path: str | os.PathLike) -> tuple[list[Decision], list[int]]:
    """The journal's events in order, and the numbers of the lines skipped (a line cut short by a kill)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], []
    return _parse(data, 1)


def _parse(data: bytes, first_line: int) -> tuple[list[Decision], list[int]]:
    events, bad = [], []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, first_line):
        last = number == first_line + len(lines) - 1
        if not line.strip():
            continue
        event = None if last else _event(line)  # a last line without its newline was never acknowledged
        if event is None:
            bad.append(number)
        else:
            events.append(event)
    return events, bad


def replay(events: list[Decision]) -> dict[str, Decision]:
    """Each file's current decision: the latest, after undos took back the ones they name; files in the
    order they were first decided."""
    stacks: dict[str, list[Decision]] = {}
    for event in events:
        stack = stacks.setdefault(event.path, [])
        if event.action != UNDO:
            stack.append(event)
        elif stack:
            stack.pop()
    return {path: stack[-1] for path, stack in stacks.items() if stack}


def csv_text(current: dict[str, Decision]) -> str:
    """decisions.csv's text: relabel's columns, one row per file, text cells spreadsheet-safe
    (relabel reads a path's ' guard back off), CRLF line ends and minimal quoting, as Python's csv writes."""
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for d in current.values():
        writer.writerow([spreadsheet_safe(d.path), d.action, d.label, spreadsheet_safe(d.note),
                         spreadsheet_safe(d.reviewer), d.decided_at])
    return buf.getvalue()


class Journal:
    """decisions.jsonl and decisions.csv of one curate output folder, for one server process."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self.csv_path = self.folder / DECISIONS_CSV
        self._guard = threading.Lock()  # threads of this process; the file lock excludes other processes
        self._events: list[Decision] = []
        self._offset = 0  # bytes of the journal read so far
        self._newlines = 0  # line ends in them: the number of the next line to read, less one
        self.skipped: list[int] = []  # journal lines ignored (cut short by a kill)
        with self._locked() as fd:
            self._catch_up(fd)
            if self._events or self.csv_path.exists():
                self._write_csv()  # a kill between the journal and the CSV: the CSV catches up now

    def current(self) -> dict[str, Decision]:
        """Each decided file's current decision (what decisions.csv holds), first decided first."""
        with self._guard:
            return replay(self._events)

    def record(self, decision: Decision) -> dict[str, Decision]:
        """Append one decision durably, then rewrite decisions.csv; returns the current decisions.

        An undo of a file with no decision left is refused (DataError)."""
        with self._locked() as fd:
            self._catch_up(fd)
            if decision.action == UNDO and decision.path not in replay(self._events):
                raise DataError(f"{decision.path}: no decision to undo")
            self._append(fd, decision)
            try:
                self._write_csv()
            except (OSError, OutputError) as exc:  # the journal holds it: acknowledged, and the CSV catches up later
                log.error("decision on %s journalled, but %s could not be rewritten (%s); it is rebuilt at the next "
                          "decision, at Apply and when the server starts", decision.path, self.csv_path, exc)
            return replay(self._events)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No decision is written during the block, and decisions.csv holds every journalled one (relabel
        reads it as it is)."""
        with self._locked() as fd:
            self._catch_up(fd)
            self._write_csv()
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The journal open for appending, held exclusively by this thread and process."""
        with self._guard:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    def _catch_up(self, fd: int) -> None:
        """Read what was appended since last time (by another process, or before a restart)."""
        size = os.fstat(fd).st_size
        if size <= self._offset:
            return
        data = os.pread(fd, size - self._offset, self._offset)
        events, bad = _parse(data, self._newlines + 1)
        if bad:
            log.warning("%s: skipped line(s) %s, cut short (a server killed while writing); every decision "
                        "acknowledged before is kept", self.path, ", ".join(map(str, bad)))
        self._events += events
        self.skipped += bad
        self._offset = size
        self._newlines += data.count(b"\n")

    def _append(self, fd: int, decision: Decision) -> None:
        """One JSON line, on a line of its own, on disk before the caller acknowledges it."""
        line = json.dumps(asdict(decision)).encode("ascii") + b"\n"  # \uXXXX escapes: any text, one line
        if self._offset and os.pread(fd, 1, self._offset - 1) != b"\n":
            line = b"\n" + line  # a line cut short by a kill stays a line of its own, skipped on read
        created = self._offset == 0
        try:
            os.write(fd, line)
            os.fsync(fd)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}; the decision was not "
                              f"recorded") from exc
        if created:
            fsync_dir(self.folder)
        self._offset += len(line)
        self._newlines += line.count(b"\n")
        self._events.append(decision)

    def _write_csv(self) -> None:
        with atomic_path(self.csv_path) as tmp:
            tmp.write_text(csv_text(replay(self._events)), encoding="utf-8", newline="")


def refuse_earlier_review(folder: str | os.PathLike) -> None:
    """A new queue is never written over a folder holding a review's decisions: they name the old queue's
    files and would be shown as done, and applied, on the new one (ConfigError, nothing written)."""
    journal = Path(folder) / JOURNAL
    if journal.exists():
        from dinobatch.errors import ConfigError

        raise ConfigError(f"{folder} holds the decisions of an earlier review ({journal.name}, {DECISIONS_CSV}); "
                          "apply them (dinobatch relabel, or Apply on the review page) and write the new queue to "
                          "another folder, or move them away first")


def queue_progress(current: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, int]:
    """{"reviewed", "total"}: items with a current decision on any of their files (as the page counts), of all."""
    def decided(item: dict[str, Any]) -> bool:
        return item.get("path") in current or any(m.get("path") in current for m in item.get("members") or ())

    return {"reviewed": sum(1 for item in items if decided(item)), "total": len(items)}
