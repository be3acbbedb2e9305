"""Stage rows: one row per listed file, in path order, from its own facts, its content's prediction
(a duplicate carries the kept file's) and its error; with the counts the summary gives."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.dedupe.groups import Groups
from dinobatch.schema import (
    DUPLICATE_EXACT,
    DUPLICATE_NEAR,
    FACT_COLUMNS,
    PREDICTION_COLUMNS,
    SPECIES_COLUMNS,
    STATUS_DUPLICATE,
    STATUS_ERROR,
    STATUS_OK,
    Col,
    row_schema,
)
from dinobatch.stages.decode import CHANGED

__all__ = ["MISSING", "ERRORS_KEPT", "RowContext", "FileOutcomes", "RowStats", "file_errors", "path_order",
           "row_stats", "row_batches", "top_k"]

MISSING = "no prediction was produced for this file; rerun"
ERRORS_KEPT = 20  # errors listed in the summary (all of them are in the rows)
_ROWS_PER_BATCH = 2048


@dataclass(frozen=True)
class RowContext:
    """What every row of a run carries besides its file's own: the run, the model, the options."""

    run_id: str
    model_name: str
    model_fingerprint: str
    labels: Sequence[str]
    top_k: int
    embeddings: bool  # without, the embedding column is null even where the cache holds one
    species: Mapping[str, Mapping[str, Any]]  # label -> species facts


@dataclass(frozen=True)
class FileOutcomes:
    """Per listed file (aligned with files): its sha256, its final error, its row in the content
    table (-1 where it has an error) and its duplicate group; order is the files in path order."""

    files: pa.Table
    shas: pa.ChunkedArray
    errors: pa.ChunkedArray
    own: np.ndarray
    groups: Groups
    order: np.ndarray


@dataclass(frozen=True)
class RowStats:
    """What the summary says about the rows: files per status, the first errors, duplicate groups."""

    counts: dict[str, int]
    errors: list[dict[str, str]]
    groups: int


def file_errors(shas: pa.ChunkedArray, errors: pa.ChunkedArray, *, abspaths: pa.ChunkedArray, changed: pa.Array,
                failed: pa.Table, content: pa.Table) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Every file's error and, for the files without one, their row in content (-1 for the others).

    The error is the file's own (errors: the walk's or fingerprint's; CHANGED for a file in changed,
    whose bytes were not its sha256 any more), else its content's (failed: sha256 -> error), else
    MISSING where content has no row for it."""
    errors = pc.if_else(pc.is_in(abspaths, value_set=changed), CHANGED, errors)
    failed_error = failed[Col.ERROR].combine_chunks().take(
        pc.index_in(shas, value_set=failed[Col.SHA256].combine_chunks()))
    row = pc.index_in(shas, value_set=content[Col.SHA256].combine_chunks())
    missing = pc.if_else(row.is_null(), MISSING, pa.scalar(None, pa.string()))
    errors = pc.coalesce(errors, failed_error, missing)
    own = pc.if_else(errors.is_null(), pc.fill_null(row, -1), -1)
    return errors, own.to_numpy(zero_copy_only=False).astype(np.int64)


def path_order(files: pa.Table) -> np.ndarray:
    """The files' indices sorted by path, in code point order (as sorted() sorts str)."""
    return pc.sort_indices(files[Col.PATH]).to_numpy()


def row_stats(outcomes: FileOutcomes) -> RowStats:
    """Files per status (ok, duplicate, error), the first ERRORS_KEPT errors in path order, groups."""
    in_error = outcomes.errors.is_valid().to_numpy(zero_copy_only=False)
    duplicate = int(np.count_nonzero((outcomes.groups.keeper >= 0) & ~in_error))
    failed = int(np.count_nonzero(in_error))
    counts = {STATUS_OK: len(in_error) - duplicate - failed, STATUS_DUPLICATE: duplicate, STATUS_ERROR: failed}
    first: list[int] = []
    for lo in range(0, len(outcomes.order), _ROWS_PER_BATCH):
        chunk = outcomes.order[lo:lo + _ROWS_PER_BATCH]
        first.extend(chunk[in_error[chunk]][:ERRORS_KEPT - len(first)].tolist())
        if len(first) == ERRORS_KEPT:
            break
    take = pa.array(first, pa.int64())
    errors = [{"path": p, "error": e} for p, e in zip(outcomes.files[Col.PATH].take(take).to_pylist(),
                                                      outcomes.errors.take(take).to_pylist())]
    return RowStats(counts, errors, int(outcomes.groups.group.max(initial=-1)) + 1)


def row_batches(outcomes: FileOutcomes, content: pa.Table, ctx: RowContext) -> Iterator[pa.RecordBatch]:
    """The rows (row_schema) in path order, built a slice at a time so memory stays one slice."""
    for lo in range(0, len(outcomes.order), _ROWS_PER_BATCH):
        yield from _row_batch(outcomes.order[lo:lo + _ROWS_PER_BATCH], outcomes, content, ctx)


def _row_batch(chunk: np.ndarray, outcomes: FileOutcomes, content: pa.Table,
               ctx: RowContext) -> Iterator[pa.RecordBatch]:
    """The rows of the files at chunk (indices into files), in that order."""
    files, groups = outcomes.files, outcomes.groups
    take = pa.array(chunk, pa.int64())
    error = outcomes.errors.take(take)
    keeper = groups.keeper[chunk]
    duplicate = keeper >= 0
    status = np.where(error.is_null().to_numpy(zero_copy_only=False),
                      np.where(duplicate, STATUS_DUPLICATE, STATUS_OK), STATUS_ERROR)
    own_rows = outcomes.own[chunk]
    pred_rows = np.where(duplicate, outcomes.own[np.maximum(keeper, 0)], own_rows)
    facts = content.select(list(FACT_COLUMNS)).take(pa.array(own_rows, pa.int64(), mask=own_rows < 0))
    preds = content.select(list(PREDICTION_COLUMNS)).take(pa.array(pred_rows, pa.int64(), mask=pred_rows < 0))
    labels = preds[Col.LABEL].to_pylist()
    topk_labels, topk_probs = top_k(preds[Col.PROBS].to_pylist(), ctx.labels, ctx.top_k)
    in_group = groups.group[chunk] >= 0
    arrays = {
        Col.RUN_ID: [ctx.run_id] * len(chunk), Col.PATH: files[Col.PATH].take(take),
        Col.PATH_BYTES: files[Col.PATH_BYTES].take(take), Col.BYTES: files[Col.BYTES].take(take),
        Col.MTIME: [_utc(ns) for ns in files[Col.MTIME_NS].take(take).to_pylist()],
        Col.SHA256: outcomes.shas.take(take), Col.STATUS: status.tolist(), Col.ERROR: error,
        Col.DUPLICATE_OF: files[Col.PATH].take(pa.array(keeper, pa.int64(), mask=~duplicate)),
        Col.DUPLICATE_KIND: pa.array(np.where(groups.exact[chunk], DUPLICATE_EXACT, DUPLICATE_NEAR), pa.string(),
                                     mask=~duplicate),
        Col.DUPLICATE_GROUP: pa.array(groups.group[chunk], pa.int64(), mask=~in_group),
        **{c: facts[c] for c in FACT_COLUMNS}, **{c: preds[c] for c in PREDICTION_COLUMNS},
        Col.TOPK_LABELS: topk_labels, Col.TOPK_PROBS: topk_probs,
        Col.MODEL: [ctx.model_name] * len(chunk), Col.MODEL_FINGERPRINT: [ctx.model_fingerprint] * len(chunk)}
    if not ctx.embeddings:
        arrays[Col.EMBEDDING] = pa.nulls(len(chunk), pa.list_(pa.float32()))
    for c in SPECIES_COLUMNS:
        arrays[c] = [ctx.species.get(label, {}).get(c) if label else None for label in labels]
    schema = row_schema()
    yield from pa.Table.from_pydict({f.name: arrays[f.name] for f in schema}, schema=schema).to_batches()


def top_k(probs: list[list[float] | None], labels: Sequence[str], k: int) -> tuple[list, list]:
    """topk_labels and topk_probs from probs, best first (null where probs is null)."""
    names, values = [], []
    for p in probs:
        if p is None:
            names.append(None)
            values.append(None)
            continue
        order = np.argsort(-np.asarray(p, dtype=np.float32), kind="stable")[:k]
        names.append([labels[i] for i in order])
        values.append([p[i] for i in order])
    return names, values


def _utc(mtime_ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc) if mtime_ns is not None else None
