"""Parquet tables in and out, and Arrow arrays from Python values and numpy buffers (no pandas)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinobatch.io.files import atomic_path, output_error


def write_table(table: pa.Table, target: str | os.PathLike) -> Path:
    """Write one Parquet file atomically (manifests, evaluation and sweep tables)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error("create folder", target.parent, exc) from exc
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read one Parquet file, with an InputError that names it when it is not one."""
    from dinobatch.errors import InputError

    try:
        return pq.read_table(path)
    except FileNotFoundError as exc:
        raise InputError(f"file not found: {path}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc


def table_metadata(path: str | os.PathLike) -> dict[bytes, bytes]:
    """Key-value metadata of a Parquet file without reading its rows."""
    return pq.read_schema(path).metadata or {}


def table_from_columns(columns: dict[str, Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """pa.Table.from_pydict for string, binary, integer and timestamp columns (timestamps given as
    integers in the type's unit), built from buffers: pa.array() on Python values first imports
    pandas when it is installed, 0.2-0.4 s, longer than dinobatch scan takes over a small folder."""
    return pa.Table.from_arrays([_arrow_column(columns[f.name], f.type) for f in schema], schema=schema)


# Arrow <-> numpy below goes through buffers too: pyarrow's own conversions (to_numpy, numpy
# arguments, Python scalars) import pandas where it is installed, 0.5 s, half of a scan of 600 photos.


def _arrow_column(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        data = [(v.encode() if isinstance(v, str) else v) if v is not None else b"" for v in values]
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return _variable_array(kind, lengths, b"".join(data), valid)
    if pa.types.is_integer(kind) or pa.types.is_timestamp(kind):
        dtype = np.int64 if pa.types.is_timestamp(kind) else kind.to_pandas_dtype()
        return numbers_array(np.fromiter((0 if v is None else v for v in values), dtype=dtype, count=len(values)),
                             valid, kind)
    return pa.array(values, kind)


def _validity(valid: np.ndarray) -> pa.Buffer | None:
    """Arrow's validity bitmap for `valid`; None (no bitmap) where every value is."""
    return None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))


def _variable_array(kind: pa.DataType, lengths: np.ndarray, data: bytes, valid: np.ndarray) -> pa.Array:
    """A string or binary array of values laid end to end in `data`, each `lengths` long."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(kind, len(lengths), [_validity(valid), pa.py_buffer(offsets), pa.py_buffer(data)])


def numbers_array(values: np.ndarray, valid: np.ndarray, kind: pa.DataType) -> pa.Array:
    """numpy integers (timestamps: integers in the type's unit) as an Arrow array, null where not valid."""
    dtype = np.int64 if pa.types.is_timestamp(kind) else np.dtype(kind.to_pandas_dtype())
    data = np.where(valid, values, 0).astype(dtype)
    return pa.Array.from_buffers(kind, len(values), [_validity(valid), pa.py_buffer(data)])


def indices_array(indices: np.ndarray) -> pa.Array:
    """Row numbers as an Arrow int64 array, for take()."""
    return numbers_array(np.asarray(indices, np.int64), np.ones(len(indices), bool), pa.int64())


def ascii_array(values: np.ndarray, valid: np.ndarray) -> pa.ChunkedArray:
    """Fixed-width ASCII (numpy S<w>) as an Arrow string column, null where not valid: in chunks of
    under 2 GiB, what one Arrow string array can hold (33 million sha256 digests)."""
    width = values.dtype.itemsize
    step = (2**31 - 1) // max(1, width)
    chunks = []
    for lo in range(0, len(values), step):
        part, ok = values[lo:lo + step], valid[lo:lo + step]
        chunks.append(_variable_array(pa.string(), np.where(ok, width, 0), part[ok].tobytes(), ok))
    return pa.chunked_array(chunks, pa.string())


def words_array(words: list[str], codes: np.ndarray) -> pa.Array:
    """words[code] per row as an Arrow string array; null where the code is -1."""
    dictionary = table_from_columns({"w": words}, pa.schema([pa.field("w", pa.string())]))[0]
    return dictionary.take(numbers_array(np.maximum(codes, 0), codes >= 0, pa.int64()))


def true_positions(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Where a boolean Arrow array is true, as numpy int64."""
    import pyarrow.compute as pc  # here: most importers of this module never need it

    found = pc.indices_nonzero(mask)
    return np.frombuffer(found.buffers()[1], np.uint64, count=len(found), offset=found.offset * 8).astype(np.int64)


def true_flags(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow array (no nulls) as a numpy bool array."""
    flags = np.zeros(len(mask), bool)
    flags[true_positions(mask)] = True
    return flags


def numpy_values(column: pa.Array | pa.ChunkedArray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-width Arrow column as numpy: its values (0 where null) and where it is valid."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    values = np.frombuffer(arr.buffers()[1], dtype, count=n, offset=arr.offset * np.dtype(dtype).itemsize)
    if arr.null_count == 0:
        return values.copy(), np.ones(n, bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[0], np.uint8), bitorder="little")
    valid = bits[arr.offset:arr.offset + n].astype(bool)
    return np.where(valid, values, 0), valid
