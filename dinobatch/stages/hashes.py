"""Scan's stage: each file's sha256, image facts and perceptual hashes, from one read of its bytes.

hash_batch is the stage (an Arrow table of files in, one row of facts per file out); hash_file is
its per-file kernel, which scan's local engine (engines.local_scan) runs in its crash-isolating
pool a chunk at a time, and training.manifest on each labelled file. Neither knows how it is
scheduled: an engine that holds a memory gate hands it in as `heavy`. A file that cannot be read
or decoded is a row with its reason, never a gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, ContextManager

import pyarrow as pa

from dinobatch.imaging.decode import DecodeError, Hashes, decode_hashes, quiet_decoding
from dinobatch.io.arrow import table_from_columns
from dinobatch.io.walk import read_bytes, read_error
from dinobatch.runtime import faults
from dinobatch.schema import Col, scan_schema

__all__ = ["HASH_COLUMNS", "Record", "hash_file", "hash_batch", "hashes_schema", "records_table"]

# What hash_batch adds to each file, in this order; types as in scan's output (schema.scan_schema)
HASH_COLUMNS = (Col.SHA256, Col.BYTES, Col.FORMAT, Col.WIDTH, Col.HEIGHT, Col.MODE, Col.PHASH, Col.DHASH,
                Col.ERROR)

# (sha256, bytes read, (format, width, height, mode, phash, dhash), error): one file's facts, small
# enough to hand back from a worker process
Record = tuple[str | None, int | None, tuple | None, str | None]
# heavy(nbytes): what to hold while reading or decoding that much (an engine's memory gate)
Gate = Callable[[int], ContextManager[Any]]
# decoder(data, heavy=gate): facts and hashes of image bytes (imaging.decode's decode_hashes or decode)
Decoder = Callable[..., Hashes]


def _no_gate(nbytes: int) -> ContextManager[None]:
    return contextlib.nullcontext()


def hash_file(abspath: str, size: int | None, *, heavy: Gate = _no_gate, decoder: Decoder = decode_hashes) -> Record:
    """sha256, facts and hashes of one file from a single read of its bytes, or why it has none.

    decoder: scan's hash-only decode by default; training.manifest passes imaging.decode.decode,
    whose hashes (classify's, from a larger JPEG scale) its splits have always been made from."""
    with heavy(size or 0):
        try:
            data = read_bytes(abspath)
        except OSError as exc:
            return None, None, None, read_error(exc)
        sha = hashlib.sha256(data).hexdigest()
        try:
            faults.point("decode", abspath)
            h = decoder(data, heavy=heavy)
        except DecodeError as exc:
            return sha, len(data), None, str(exc)
    return sha, len(data), (h.format, h.width, h.height, h.mode, h.phash, h.dhash), None


def hashes_schema() -> pa.Schema:
    """The columns hash_batch returns (HASH_COLUMNS), typed as scan's output types them."""
    scan = scan_schema()
    return pa.schema([scan.field(name) for name in HASH_COLUMNS])


def hash_batch(batch: pa.Table, *, heavy: Gate = _no_gate) -> pa.Table:
    """HASH_COLUMNS for each file of `batch` (its abspath, str or os.fsencode bytes, and its size
    if it has that column), one row per row in the same order."""
    paths = batch[Col.ABSPATH].to_pylist()
    sizes = batch[Col.BYTES].to_pylist() if Col.BYTES in batch.column_names else [None] * len(paths)
    with quiet_decoding():  # once per batch, not per file
        records = [hash_file(os.fsdecode(path), size, heavy=heavy) for path, size in zip(paths, sizes)]
    return records_table(records)


def records_table(records: list[Record]) -> pa.Table:
    """hash_file's records as hash_batch's table."""
    facts = [r[2] or (None,) * 6 for r in records]
    columns: dict[str, list[Any]] = {Col.SHA256: [r[0] for r in records], Col.BYTES: [r[1] for r in records],
                                     Col.ERROR: [r[3] for r in records]}
    for k, name in enumerate((Col.FORMAT, Col.WIDTH, Col.HEIGHT, Col.MODE, Col.PHASH, Col.DHASH)):
        columns[name] = [f[k] for f in facts]
    return table_from_columns(columns, hashes_schema())
