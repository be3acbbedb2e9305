"""Checks a predictions table (a classify rows file) against the row schema before anything trusts
its values: one vectorised pass that names each wrong column, the problem and the first rows."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.errors import DataError
from dinobatch.io.terminal import printable
from dinobatch.schema import DUPLICATE_EXACT, DUPLICATE_NEAR, STATUS_DUPLICATE, STATUS_OK, STATUSES, Col, row_schema

__all__ = ["CURATE_READS", "check_predictions"]

# The columns curate reads; their types are row_schema()'s.
CURATE_READS = (Col.PATH, Col.SHA256, Col.STATUS, Col.ERROR, Col.WIDTH, Col.HEIGHT, Col.DHASH, Col.DUPLICATE_OF,
                Col.DUPLICATE_KIND, Col.DUPLICATE_GROUP, Col.LABEL, Col.CONFIDENCE, Col.PROBS, Col.EMBEDDING)
_SHOWN = 5  # offending rows named per problem
_SUM_TOLERANCE = 1e-3  # a float32 softmax over 1,000 classes sums to 1 within about 1e-5
_HASH = "^[0-9a-fA-F]{16}$"  # pHash and dHash: 64 bits as 16 hex digits


def check_predictions(table: pa.Table, labels: Sequence[str], source: str,
                      columns: Sequence[str] = CURATE_READS) -> pa.Table:
    """table with columns cast to row_schema()'s types (numbers of another width are fine), once each
    holds what classify writes; a DataError naming every problem and its first rows otherwise.

    Rows with status "error" carry no prediction by design: their prediction columns are not checked."""
    problems: list[str] = []
    table, usable = _cast(table, columns, problems)
    if not labels:
        problems.append("the file's metadata lists no labels (dinobatch.labels), so probs cannot be read")
    paths = table[Col.PATH] if Col.PATH in usable else None
    for name, problem, bad in _value_problems(table, usable, list(labels)):
        if bad.any():
            problems.append(_describe(name, problem, bad, paths))
    if problems:
        raise DataError(f"{source}: {'; '.join(problems)}; nothing was written")
    return table


def _cast(table: pa.Table, columns: Sequence[str], problems: list[str]) -> tuple[pa.Table, set[str]]:
    """table with each of columns cast to its schema type where that is a change of width only; the
    names of the columns that are present and of the right kind (the others are problems)."""
    schema = row_schema()
    usable: set[str] = set()
    for name in columns:
        if name not in table.column_names:
            problems.append(f"column {name}: missing")
            continue
        have, want = table.schema.field(name).type, schema.field(name).type
        if have != want:
            if _kind(have) != _kind(want) and not pa.types.is_null(have):
                problems.append(f"column {name}: holds {have} values, expected {want}")
                continue
            try:
                column = table[name].cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                problems.append(f"column {name}: cannot be read as {want} ({exc})")
                continue
            table = table.set_column(table.schema.get_field_index(name), pa.field(name, want), column)
        usable.add(name)
    return table, usable


def _kind(kind: pa.DataType) -> str:
    """What a type holds, whatever its width: number, text, bytes, time, or list of a kind."""
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_timestamp(kind):
        return "time"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return f"list of {_kind(kind.value_type)}"
    return str(kind)


def _value_problems(table: pa.Table, usable: set[str], labels: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(column, problem, rows that have it) for each check whose column is usable."""
    everything = np.ones(table.num_rows, bool)
    status = table[Col.STATUS] if Col.STATUS in usable else None
    if status is not None:
        yield Col.STATUS, f"not one of {', '.join(STATUSES)}", ~_mask(pc.is_in(status, value_set=pa.array(STATUSES)))
    # with no usable status every row is held to the rules of a prediction (the status is reported)
    predicted = everything if status is None else _mask(pc.is_in(status, pa.array([STATUS_OK, STATUS_DUPLICATE])))
    if Col.PATH in usable:
        yield Col.PATH, "missing (null)", _mask(table[Col.PATH].is_null())
    if Col.LABEL in usable and labels:
        known = _mask(pc.is_in(table[Col.LABEL], value_set=pa.array(labels, pa.string())))
        yield Col.LABEL, "missing or not one of the model's labels", predicted & ~known
    if Col.CONFIDENCE in usable:
        confidence = table[Col.CONFIDENCE].to_numpy()  # nulls become NaN
        with np.errstate(invalid="ignore"):
            yield Col.CONFIDENCE, "missing, NaN or outside [0, 1]", predicted & ~((confidence >= 0) & (confidence <= 1))
    if Col.PROBS in usable:
        yield from _probs_problems(table[Col.PROBS], predicted, len(labels))
    if Col.EMBEDDING in usable:
        ok = everything if status is None else _mask(pc.equal(status, STATUS_OK))
        yield from _embedding_problems(table[Col.EMBEDDING], ok)
    for name in (Col.WIDTH, Col.HEIGHT):
        if name in usable:
            yield name, "negative", _mask(pc.less(table[name], 0))
    if Col.DHASH in usable:
        column = table[Col.DHASH]
        yield Col.DHASH, "not 16 hex digits", _mask(column.is_valid()) & ~_mask(pc.match_substring_regex(column, _HASH))
    if Col.DUPLICATE_KIND in usable:
        column = table[Col.DUPLICATE_KIND]
        kinds = pa.array([DUPLICATE_EXACT, DUPLICATE_NEAR])
        yield Col.DUPLICATE_KIND, f"not {DUPLICATE_EXACT} or {DUPLICATE_NEAR}", \
            _mask(column.is_valid()) & ~_mask(pc.is_in(column, value_set=kinds))


def _probs_problems(column: pa.ChunkedArray, predicted: np.ndarray, classes: int
                    ) -> Iterator[tuple[str, str, np.ndarray]]:
    """Rows that should carry a probability per label and do not: each row is named once, for its
    first problem (missing, wrong length, NaN, then range and sum)."""
    lengths, nan, outside, sums = _list_stats(column, probabilities=True)
    yield Col.PROBS, "missing where status is ok or duplicate", predicted & (lengths < 0)
    if classes:
        yield Col.PROBS, f"not {classes} values (the model has {classes} labels)", \
            predicted & (lengths >= 0) & (lengths != classes)
        shaped = predicted & (lengths == classes)
    else:
        shaped = predicted & (lengths >= 0)
    yield Col.PROBS, "NaN, infinite or null values", shaped & nan
    yield Col.PROBS, f"values outside [0, 1] or not summing to 1 (within {_SUM_TOLERANCE:g})", \
        shaped & ~nan & (outside | (np.abs(sums - 1) > _SUM_TOLERANCE))


def _embedding_problems(column: pa.ChunkedArray, ok: np.ndarray) -> Iterator[tuple[str, str, np.ndarray]]:
    """Embeddings (where there are any) of another length than most, or holding NaN."""
    lengths, nan, _, _ = _list_stats(column, probabilities=False)
    present = ok & (lengths >= 0)
    if not present.any():
        return
    usual = int(np.bincount(lengths[present]).argmax())
    yield Col.EMBEDDING, f"not {usual} values like the other embeddings", present & (lengths != usual)
    yield Col.EMBEDDING, "NaN, infinite or null values", present & nan


def _list_stats(column: pa.ChunkedArray, *, probabilities: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a list column of floats: its length (-1 where null), whether it holds a NaN,
    infinite or null value, and (probabilities only) whether a value lies outside [0, 1] and the sum
    of its finite values. A chunk at a time, in the values' own type: memory is one chunk's values."""
    n = len(column)
    lengths = np.empty(n, np.int64)
    nan, outside, sums = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n)
    start = 0
    for chunk in column.chunks:
        end = start + len(chunk)
        lengths[start:end] = pc.fill_null(pc.list_value_length(chunk), -1).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)  # null values as NaN
        owner = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False) + start
        finite = np.isfinite(values)
        nan[owner[~finite]] = True
        if probabilities:
            with np.errstate(invalid="ignore"):
                outside[owner[(values < 0) | (values > 1)]] = True
            sums[start:end] = np.bincount(owner - start, weights=np.where(finite, values, 0), minlength=len(chunk))
        start = end
    return lengths, nan, outside, sums


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _describe(name: str, problem: str, bad: np.ndarray, paths: pa.ChunkedArray | None) -> str:
    """'column NAME: PROBLEM in N rows, e.g. row 3 'a.jpg', ...' (rows counted from 0, names escaped)."""
    rows = np.flatnonzero(bad)
    shown = rows[:_SHOWN]
    names = paths.take(pa.array(shown)).to_pylist() if paths is not None else [None] * len(shown)
    examples = ", ".join(f"row {i}" + (f" '{printable(p)}'" if p is not None else "") for i, p in zip(shown, names))
    return f"column {name}: {problem} in {len(rows)} row{'s' if len(rows) != 1 else ''}, e.g. {examples}"
