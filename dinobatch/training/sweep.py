"""The seed's grid search: train and evaluate every combination, one row per trial, resumable."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from dinobatch.config import TrainConfig
from dinobatch.errors import DinobatchError
from dinobatch.io.arrow import read_table, write_table
from dinobatch.io.lock import exclusive
from dinobatch.io.walk import sha256_file
from dinobatch.schema import STATUS_ERROR, STATUS_OK, Col
from dinobatch.training.train import train

__all__ = ["trials", "sweep", "best_trial"]

log = logging.getLogger(__name__)


def trials(grid: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order (keys sorted, values as given)."""
    keys = sorted(k for k, v in grid.items() if v)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


_COLUMNS = (Col.TRIAL, Col.STATUS, Col.ERROR, Col.CONFIG, Col.MODEL, Col.BEST_EPOCH, Col.VAL_LOSS, Col.VAL_TOP1,
            Col.VAL_TOP3, Col.VAL_MACRO_F1, Col.UNREADABLE, Col.SECONDS)
_FIGURES = (Col.VAL_LOSS, Col.VAL_TOP1, Col.VAL_TOP3, Col.VAL_MACRO_F1)  # of the best epoch's metrics row


def _trial_ids(base: TrainConfig, overrides: dict[str, Any], manifest_sha: str) -> tuple[str, str]:
    """Names the whole configuration and the data, not a position: reruns find exactly their trials.
    The data is the manifest's sha256, whatever the spelling of its path; the second id is the one
    sweeps gave before (the path as typed), so their finished trials are found too."""
    config = {**base.to_dict(), **overrides, "out": None, "manifest_sha256": manifest_sha}
    return (hashlib.sha256(json.dumps({**config, "manifest": None}, sort_keys=True).encode()).hexdigest()[:12],
            hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12])


def sweep(base: TrainConfig, grid: dict[str, Sequence[Any]], out: str | Path,
          progress: Callable[[str, int, int], None] | None = None, wait: float = 0.0) -> list[dict[str, Any]]:
    """Run every trial of the grid not finished before; a failed trial is a row with its error (and is
    tried again by the next run). Returns this grid's rows; trials.parquet also keeps other grids'.
    One sweep at a time per OUT: a second gets LockedError after `wait` seconds."""
    out = Path(out)
    with exclusive(out / ".lock", wait=wait):
        return _sweep(base, grid, out, progress)


def _sweep(base: TrainConfig, grid: dict[str, Sequence[Any]], out: Path, progress) -> list[dict[str, Any]]:
    table_path = out / "trials.parquet"
    earlier = read_table(table_path).to_pylist() if table_path.exists() else []
    manifest_sha = sha256_file(base.manifest)
    rows, seen = [], set()
    for overrides in trials(grid):
        trial, legacy = _trial_ids(base, overrides, manifest_sha)
        seen.update((trial, legacy))
        finished = [r for r in earlier if r[Col.TRIAL] in (trial, legacy) and r[Col.STATUS] == STATUS_OK]
        if finished:  # failed trials are tried again
            rows.append(finished[-1])
            continue
        log.info("trial %s: %s", trial, json.dumps(overrides, sort_keys=True))
        t0 = time.monotonic()
        row: dict[str, Any] = {Col.TRIAL: trial, Col.CONFIG: json.dumps(overrides, sort_keys=True),
                               **{k: str(v) for k, v in overrides.items()}}
        try:
            cfg = dataclasses.replace(base, out=str(out / "trials" / trial / "model.pt"), **overrides)
            row[Col.CONFIG] = json.dumps(cfg.to_dict(), sort_keys=True)
            result = train(cfg, resume=True, progress=progress)
            best = result.metrics[result.best_epoch - 1]
            row.update({Col.STATUS: STATUS_OK, Col.ERROR: None, Col.MODEL: result.model,
                        Col.BEST_EPOCH: result.best_epoch, **{k: best[k] for k in _FIGURES},
                        Col.UNREADABLE: len(result.unreadable)})
        except DinobatchError as exc:
            row.update({Col.STATUS: STATUS_ERROR, Col.ERROR: str(exc)})
        except Exception as exc:  # a trial that crashes is recorded; the sweep goes on
            log.exception("trial %s failed", trial)
            row.update({Col.STATUS: STATUS_ERROR, Col.ERROR: f"{type(exc).__name__}: {exc}"})
        row[Col.SECONDS] = round(time.monotonic() - t0, 2)
        rows.append({**dict.fromkeys(_COLUMNS), **row})
        kept = [r for r in earlier if r[Col.TRIAL] not in seen]
        write_table(_table(kept + rows), table_path)  # after every trial: a kill loses one at most
    return rows


def _table(rows: list[dict[str, Any]]):
    """Rows of different grids have different override columns: take their union."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest validation macro F1, then lowest validation loss, among the trials that finished."""
    ok = [r for r in rows if r.get(Col.STATUS) == STATUS_OK and r.get(Col.VAL_MACRO_F1) is not None]
    return max(ok, key=lambda r: (r[Col.VAL_MACRO_F1], -(r[Col.VAL_LOSS] or 0.0)), default=None)
