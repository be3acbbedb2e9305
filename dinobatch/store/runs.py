"""An output folder's runs: which rows file is current, for all models or one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dinobatch.errors import InputError
from dinobatch.io.arrow import read_table
from dinobatch.schema import read_metadata, row_schema
from dinobatch.store.results import RUN_ID

log = logging.getLogger(__name__)


def _run_files(folder: Path) -> list[tuple[Path, dict[str, object]]]:
    """Complete rows files of classify runs (named by run id), oldest first, with their metadata.

    Other Parquet files a user put there (an export, say) and unreadable ones are skipped."""
    runs = []
    for path in sorted(folder.glob("*.parquet")):  # run ids sort by start time
        if not RUN_ID.match(path.stem):
            continue
        try:
            meta = read_metadata(pq.read_schema(path))
        except (OSError, pa.ArrowException) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if "model_fingerprint" in meta:  # a classify run's; empty for torchvision's weights on an empty night
            runs.append((path, meta))
    return runs


def latest_run(folder: str | os.PathLike) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of the newest complete classify run in an output folder, and its summary.

    The same rule as current_rows: a run whose rows file was committed counts even if it was killed
    before its summary was written (the classified folder is also in the rows file's metadata)."""
    folder = Path(folder)
    runs = _run_files(folder)
    if not runs:
        raise InputError(f"{folder} holds no classify results; run dinobatch classify first")
    path, meta = runs[-1]
    summary_path = folder / "_runs" / f"{path.stem}.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {"run_id": path.stem, "config": {"folder": meta.get("folder")}}
    return read_table(path), summary


def current_rows(folder: str | os.PathLike, model: str | None = None) -> pa.Table:
    """The current rows of an output folder: for each model, its newest run's rows (one per file).

    A run's rows file only appears once complete, so interrupted runs contribute nothing, and a
    file that changed or vanished since is current only as the newest run saw it. model narrows
    to fingerprints starting with it."""

    newest: dict[str, Path] = {}
    for path, meta in _run_files(Path(folder)):
        fingerprint = str(meta["model_fingerprint"])
        if model is None or fingerprint.startswith(model):
            newest[fingerprint] = path
    if not newest:
        raise InputError(f"{folder} holds no classify rows" + (f" for model {model}" if model else ""))
    # read with the current schema: files from older versions get nulls for columns added since
    return pa.concat_tables([pq.read_table(p, schema=row_schema()) for p in newest.values()])


