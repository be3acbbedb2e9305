"""Apply a reviewer's decisions to a manifest (never to the images)."""

from __future__ import annotations

import csv
import difflib
import getpass
import io
import json
import logging
import os
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dinobatch.curation import audit
from dinobatch.errors import ConfigError, DataError, InputError
from dinobatch.io.lock import exclusive
from dinobatch.io.terminal import FORMULA_START
from dinobatch.io.walk import sha256_file
from dinobatch.schema import Col

log = logging.getLogger(__name__)


ACTIONS = ("keep", "relabel", "remove")


COLUMNS = ("path", "action", "label", "note", "reviewer", "decided_at")  # of a decisions CSV; path and action
# are required; reviewer and decided_at (who decided, and when: what `dinobatch serve` writes) go into the audit note


STATUS_REMOVED = "removed"


_NAMED = 20  # refused rows named in one message; the rest are counted


_RECORD_MAX = 64 << 20  # a version's own audit lines: Parquet readers refuse metadata past 100 MB


@dataclass(frozen=True)
class Change:
    path: str  # as tables show it (the manifest's path, normalised)
    action: str
    old_label: str
    new_label: str | None
    note: str
    name: bytes = b""  # the row's exact name (normalised bytes): how the change finds its row
    reviewer: str = ""  # who decided (a decisions file from `dinobatch serve`), else ""
    decided_at: str = ""

    @property
    def audit_note(self) -> str:
        """The note the audit log keeps: the reviewer's note, then who decided and when, if known."""
        who = " ".join(x for x in (f"by {self.reviewer}" if self.reviewer else "",
                                   f"at {self.decided_at}" if self.decided_at else "") if x)
        return f"{self.note} (decided {who})".lstrip() if who else self.note


@dataclass(frozen=True)
class Relabelled:
    """What relabel did: the changes, the version that holds them, and how that version came to be."""

    changes: list[Change]
    target: Path | None
    outcome: str  # written, finished (a killed run's version, its audit completed), already applied, dry run


def label_problem(label: str) -> str | None:
    """Why text cannot become a label (a class name, a folder name, a spreadsheet cell), or None."""
    if not label or label != label.strip():
        return "it is empty or starts or ends with a space"
    bad = next((c for c in label if unicodedata.category(c)[0] == "C"), None)
    if bad is not None:
        return f"it holds the control character {bad!r}"
    if "/" in label or "\\" in label or label in (".", ".."):
        return "labels become folder names, and this one is a path"
    if label.startswith(FORMULA_START):
        return f"it starts with {label[0]!r}, which spreadsheets run as a formula"
    return None


def read_decisions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a decisions CSV (path,action[,label][,note][,reviewer][,decided_at]); any bad row refuses the whole
    file."""
    reader = csv.DictReader(io.StringIO(_decisions_text(path)))
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        header = reader.fieldnames or []
        _check_header(path, header)
        for line, r in enumerate(reader, 2):
            problems += _row_problems(line, r, len(header))
            # the path as written: a name may end in a space or a control character (_row_for tries both)
            rows.append({"line": line, "path": r.get("path") or "",
                         "action": (r.get("action") or "").strip().lower(), "label": (r.get("label") or "").strip(),
                         **{k: _unguarded((r.get(k) or "").strip()) for k in ("note", "reviewer", "decided_at")}})
    except csv.Error as exc:
        line = len(rows) + 2 if reader.fieldnames else 1
        reason = str(exc).replace("field larger than field limit", "a field is longer than the limit")
        raise DataError(f"{path}, line {line}: {reason}; nothing was written") from exc
    refuse(path, problems)
    return rows


def _decisions_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the decisions file as UTF-8") from exc
    except OSError as exc:
        raise InputError(f"cannot read decisions file {path}: {exc.strerror or exc}") from exc


def _check_header(path: str | os.PathLike, header: list[str]) -> None:
    """path and action present; nothing unknown (a misspelt 'lable' would drop every label silently)."""
    missing = [c for c in ("path", "action") if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    twice = sorted({c for c in header if header.count(c) > 1})
    for what, names in (("missing", missing), ("unknown", unknown), ("repeated", twice)):
        if names:
            raise DataError(f"{path}, line 1: {what} column(s) {', '.join(names)}; the header must be "
                            f"path,action[,label][,note][,reviewer][,decided_at]")


def _row_problems(line: int, row: dict[str | None, Any], width: int) -> list[str]:
    """What is wrong with one decision row, each naming the line and column."""
    out = []
    if None in row:
        out.append(f"line {line}: {width + len(row[None])} fields, but the header has {width}")
    action, label = (row.get("action") or "").strip().lower(), (row.get("label") or "").strip()
    if not (row.get("path") or "").strip():
        out.append(f"line {line}, column path: empty")
    if action not in ACTIONS:
        out.append(f"line {line}, column action: unknown action {action!r}; use {', '.join(ACTIONS)}")
    elif action == "relabel" and not label:
        out.append(f"line {line}, column label: relabel needs a label")
    if "\0" in (row.get("note") or ""):  # other controls are kept exactly, and escaped wherever shown
        out.append(f"line {line}, column note: a NUL character, which CSV readers refuse")
    return out


def refuse(path: str | os.PathLike, problems: list[str]) -> None:
    """DataError naming every problem (the first few, then a count) when there are any."""
    if len(problems) == 1:
        raise DataError(f"{path}, {problems[0]}; nothing was written")
    if problems:
        more = f"; and {len(problems) - _NAMED} more" if len(problems) > _NAMED else ""
        raise DataError(f"{path}: {len(problems)} problems, nothing was written: " + "; ".join(problems[:_NAMED])
                        + more)


def _normalise(path: str, root: Path) -> str | None:
    """The root-relative, normalised spelling of a path (links are not followed: a decision is about
    the manifest's row, not about where a link points), or None when it leaves the root."""
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
    rel = os.path.relpath(full, os.path.normpath(root))
    return None if rel == ".." or rel.startswith(".." + os.sep) else Path(rel).as_posix()


def relabel(decisions_path: str, manifest_path: str, *, out: str | None = None, dry_run: bool = False,
            user: str | None = None, new_labels: Iterable[str] = (), wait: float = 0.0) -> Relabelled:
    """Check every decision, then write a new manifest version and add the changes to the audit log.

    Nothing is written when any decision is refused, or with dry_run. One relabel at a time per
    manifest family (the lock classify uses, waiting up to `wait` seconds); a rerun of a killed run
    finishes it instead of writing a second version. Image files are never touched."""
    from dinobatch.training.manifest import load_manifest

    user = _checked_user(user)  # before anything is written: a failure here writes nothing
    allowed = _checked_new_labels(new_labels)
    manifest = load_manifest(manifest_path)
    changes = _changes(read_decisions(decisions_path), manifest, decisions_path, manifest_path, allowed)
    source, wanted = Path(manifest_path), _wanted(out)
    family = audit.Family.of(source)
    if dry_run:
        if wanted is not None and wanted.exists():
            raise ConfigError(f"{wanted} exists; a new manifest version never replaces a file")
        return Relabelled(changes, None, "dry run")
    origin = {"manifest_sha256": manifest.sha256, "decisions_sha256": sha256_file(str(decisions_path))}
    with exclusive(family.lock, wait=wait, what=f"the manifest {source}"):
        family.remove_leftovers(*([wanted] if wanted else []))
        candidates = [wanted] if wanted is not None else family.versions()
        completed = audit.complete_log(family, [*family.versions(), *([wanted] if wanted else [])])
        earlier = [v for v in candidates if v.exists() and (audit.record_of(v) or {}).get("origin") == origin]
        if earlier:  # a rerun: these decisions, on this very manifest, are in a version already
            return Relabelled(changes, earlier[-1], "finished" if earlier[-1] in completed else "already applied")
        target = wanted or family.next_version(source)
        if target.exists():
            raise ConfigError(f"{target} exists; a new manifest version never replaces a file")
        record = audit.new_record([(c.path, c.action, c.old_label, c.new_label or "", c.audit_note) for c in changes],
                                  origin=origin, source=source, target=target, user=user, log_path=family.log)
        if len(json.dumps(record)) > _RECORD_MAX:
            raise DataError(f"{decisions_path}: its notes add up to more than {_RECORD_MAX >> 20} MiB, more than a "
                            f"manifest version can carry; split it into several files")
        audit.publish(_applied(manifest, changes), target, manifest.root, record, family.log)
    return Relabelled(changes, target, "written")


def _wanted(out: str | None) -> Path | None:
    """The -o target, as Parquet (a manifest read from CSV is written as Parquet)."""
    if not out:
        return None
    target = Path(out)
    return target.with_suffix(".parquet") if target.suffix.lower() == ".csv" else target


def _checked_user(user: str | None) -> str:
    user = user or getpass.getuser()
    if not user.strip() or any(unicodedata.category(c)[0] == "C" for c in user):
        raise ConfigError(f"--user {user!r}: a name for the audit log, without control characters")
    return user


def _checked_new_labels(labels: Iterable[str]) -> set[str]:
    """--new-label values, each one a label a manifest and a model can safely hold."""
    for label in labels:
        why = label_problem(label)
        if why:
            raise ConfigError(f"--new-label {label!r} cannot be a label: {why}")
    return set(labels)


def _changes(decisions: list[dict[str, Any]], manifest, decisions_path, manifest_path,
             allowed: set[str]) -> list[Change]:
    """Each decision as a change to one manifest row; any that cannot be refuses them all."""
    by_name = _by_exact_name(manifest.table.to_pylist())
    known = {r[Col.LABEL] for r in by_name.values()} | allowed
    changes, decided, problems = [], {}, []
    for d in decisions:
        where = f"line {d['line']}, column path"
        name, why = _row_for(d["path"], manifest.root, by_name, manifest_path)
        if name is None:
            problems.append(f"{where}: {d['path']} {why}")
        elif name in decided:
            problems.append(f"{where}: {d['path']} was already decided on line {decided[name]}")
        elif d["action"] == "relabel" and d["label"] not in known:
            problems.append(_unknown_label(d["line"], d["label"], manifest_path, known))
        else:
            new, row = d["label"] if d["action"] == "relabel" else None, by_name[name]
            changes.append(Change(_normalise(row[Col.PATH], manifest.root) or row[Col.PATH], d["action"],
                                  row[Col.LABEL] or "", new, d["note"], name, d["reviewer"], d["decided_at"]))
        if name is not None:
            decided.setdefault(name, d["line"])
    refuse(decisions_path, problems)
    return changes


def _by_exact_name(rows: list[dict[str, Any]]) -> dict[bytes, dict[str, Any]]:
    """Manifest rows by their exact name (normalised bytes): two files are told apart by their bytes,
    whatever `path` shows (as export opens files by manifest.exact_name)."""
    from dinobatch.training.manifest import exact_name

    return {os.fsencode(os.path.normpath(exact_name(r))): r for r in rows}


def _row_for(path: str, root: Path, by_name: dict[bytes, Any], manifest_path: str) -> tuple[bytes | None, str]:
    """(exact name, "") of the row a decision's path names, or (None, why not). The path is read as
    written, then stripped, then without the ' a spreadsheet guard added (queue.csv), each as tables
    spell names (\\xNN a byte, a doubled backslash one) and as the file system does; the first
    spelling that names a row wins, and one naming two different rows is refused."""
    from dinobatch.training.manifest import unescape_name

    texts = list(dict.fromkeys([path, path.strip()]))
    texts += [t[1:] for t in texts if _guarded(t)]
    outside = False
    for text in texts:
        rel = _normalise(text, root)
        if rel is None:
            outside = True
            continue
        hits = sorted({n for n in (unescape_name(rel), os.fsencode(rel)) if n in by_name})
        if len(hits) > 1:
            shown = " and ".join(repr(os.fsdecode(n)) for n in hits)
            return None, f"could name two files, {shown}; write the one meant as its path column shows it"
        if hits:
            return hits[0], ""
    return None, f"is outside the dataset root {root}" if outside else f"is not in the manifest {manifest_path}"


def _unguarded(text: str) -> str:
    """A cell without the ' that spreadsheet_safe put before a formula character (a note or reviewer of
    decisions.csv), as a spreadsheet reads it; the audit log guards it again."""
    return text[1:] if _guarded(text) else text


def _guarded(path: str) -> bool:
    """Whether a path is a CSV cell that spreadsheet_safe guarded with a leading ' (queue.csv)."""
    return path.startswith("'") and path[1:].startswith(FORMULA_START)


def _unknown_label(line: int, label: str, manifest_path: str, known: set[str]) -> str:
    """The refusal of a label the manifest does not have, with the way to add it when it can be one."""
    text = f"line {line}, column label: {label!r} is not a label in {manifest_path}"
    why = label_problem(label)
    if why:
        return f"{text}, and cannot be one: {why}"
    close = difflib.get_close_matches(label, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{text} ({hint}a new label needs --new-label {shlex.quote(label)})"


def _applied(manifest, changes: list[Change]):
    """The manifest's table with the changes made; removed rows stay, as a record, out of every split."""
    import pyarrow as pa

    rows = manifest.table.to_pylist()
    by_name = _by_exact_name(rows)
    for c in changes:
        row = by_name[c.name]
        if c.action == "relabel":
            row[Col.LABEL] = c.new_label
        elif c.action == "remove":
            row[Col.STATUS], row[Col.SPLIT] = STATUS_REMOVED, None
    return pa.Table.from_pylist(rows, schema=manifest.table.schema)
