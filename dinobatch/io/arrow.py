"""Parquet tables in and out, and Arrow arrays from Python values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dinobatch.io.files import output_error, atomic_path


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


def _arrow_column(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    import numpy as np

    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        data = [(v.encode() if isinstance(v, str) else v) if v is not None else b"" for v in values]
        offsets = np.zeros(len(data) + 1, dtype=np.int32)
        np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=len(data)), out=offsets[1:])
        return pa.Array.from_buffers(kind, len(data), [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
    if pa.types.is_integer(kind) or pa.types.is_timestamp(kind):
        dtype = np.int64 if pa.types.is_timestamp(kind) else kind.to_pandas_dtype()
        numbers = np.fromiter((0 if v is None else v for v in values), dtype=dtype, count=len(values))
        return pa.Array.from_buffers(kind, len(values), [bitmap, pa.py_buffer(numbers)])
    return pa.array(values, kind)
