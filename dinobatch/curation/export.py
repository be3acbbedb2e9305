"""Sort an inbox into label folders by copying (never moving) its files."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dinobatch.errors import ConfigError, InputError, OutputError
from dinobatch.io.files import atomic_path
from dinobatch.io.walk import sha256_file
from dinobatch.schema import Col

log = logging.getLogger(__name__)

OUTSIDE = "_outside"  # export's count of links to files outside the classified folder, not copied


def export(predictions: str, to: str, *, min_confidence: float, outside_links: bool = False) -> dict[str, int]:
    """Copy (never move) each classified file to TO/<label>/ when confident, else to TO/_review/.

    TO may not be inside the classified folder (the next classify would take the copies for new
    images); a link to a file outside that folder is copied only with outside_links."""
    from dinobatch.store.runs import latest_run

    table, summary = latest_run(predictions)
    folder = summary.get("config", {}).get("folder")
    if not folder or not Path(folder).is_dir():
        raise InputError(f"the folder classified in {predictions} ({folder}) is not there any more")
    inside, rows = os.path.realpath(folder), table.to_pylist()
    # TO itself, or one of its buckets: TO/_review is the classified folder when that is named _review
    buckets = {"", "_review", *(_bucket(r[Col.LABEL]) for r in rows if r[Col.STATUS] != "error" and r[Col.LABEL])}
    if any(_within(os.path.realpath(Path(to) / b), inside) for b in buckets):
        raise ConfigError(f"--to {to} is inside the classified folder {folder}, or holds it as a label's or "
                          f"_review's folder: the next classify would take the copies for new images and the next "
                          f"export would copy them again; export outside it")
    counts: dict[str, int] = {}
    for r in rows:
        bucket = _copy_one(r, folder, inside, Path(to), min_confidence, outside_links)
        if bucket:
            counts[bucket] = counts.get(bucket, 0) + 1
    return counts


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _copy_one(row: dict[str, Any], folder: str, inside: str, to: Path, min_confidence: float,
              outside_links: bool) -> str | None:
    """Copy one classified file; the count it adds to (its bucket, _skipped, _outside), or None."""
    from dinobatch.training.manifest import exact_name  # the exact name: path_bytes where path is escaped

    confident = row[Col.STATUS] != "error" and (row[Col.CONFIDENCE] or 0) >= min_confidence
    bucket = _bucket(row[Col.LABEL]) if confident else "_review"
    rel = exact_name(row)
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
        log.warning("not copied: %r is not a path inside %s", rel, folder)
        return "_skipped"
    source = os.path.join(folder, rel)
    real = os.path.realpath(source)  # copied from here, so a link swapped after this check changes nothing
    if not outside_links and not _within(real, inside):
        log.warning("not copied: %s is a link to %s, outside %s (--copy-outside-links copies it)", source, real, folder)
        return OUTSIDE
    if not os.path.isfile(real):
        log.warning("not copied, no longer there: %s", source)
        return None
    target = to / bucket / rel
    if target.exists():  # never overwrite: the same bytes are already there, or something else is
        if target.is_file() and sha256_file(str(target)) == sha256_file(real):
            return None
        log.warning("not copied: %s exists with other content", target)
        return "_skipped"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {target.parent}: {exc.strerror or exc}") from exc
    with atomic_path(target, "copy to") as tmp:
        shutil.copy2(real, tmp)
    return bucket


def _bucket(label: str) -> str:
    """A label as a folder name that stays inside TO and never merges with _review."""
    from dinobatch.training.manifest import label_folder

    return label_folder(label, reserved=("_review",))
