"""The output folder: rows per run, the content cache, the file index and the summaries."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dinobatch.errors import OutputError
from dinobatch.io.files import atomic_path, output_error, write_json
from dinobatch.runtime import faults
from dinobatch.schema import Col, cache_schema, file_index_schema, read_metadata

log = logging.getLogger(__name__)


# More cache parts than this are merged into one at the end of a run: a nightly run adds a few
# parts, and reading thousands of small files would cost an unchanged rerun more than the work.
COMPACT_PARTS = 16


# A file changed within this long before it was hashed could change again within the same
# timestamp tick unnoticed ('racily clean' in git's terms): its stat is not trusted next run.
_RACY_NS = 2_000_000_000


_ROW_GROUP_BYTES = 8 << 20  # a compacted cache part's row groups: about this much data each


_READ_BATCH = 8192  # rows decoded at a time when reading the cache and the file index


RUN_ID = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]+$")


class CacheWriter:
    """Streams per-content predictions to the cache, one Parquet part per finished batch."""

    def __init__(self, folder: Path, run_id: str, metadata: dict[bytes, bytes]):
        self.folder = folder
        self.run_id = run_id
        self.schema = cache_schema(metadata)
        self.parts = 0

    def write(self, rows: Sequence[dict[str, Any]] | pa.Table) -> None:
        """Write rows (sha256 + facts + prediction columns: dicts, or a cache_schema table) as one
        atomically committed part."""
        if not len(rows):
            return
        table = rows.cast(self.schema) if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows),
                                                                                               schema=self.schema)
        target = self.folder / f"part-{self.run_id}-{self.parts:05d}.parquet"
        with atomic_path(target, "write results to") as tmp:
            pq.write_table(table, tmp)
        self.parts += 1


class ResultsDir:
    """An output folder: per-run rows, summaries and the per-model content cache."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def ensure(self) -> None:
        """Create the folder tree, failing early and clearly when it cannot be written."""
        try:
            (self.path / "_runs").mkdir(parents=True, exist_ok=True)
            (self.path / "_cache").mkdir(exist_ok=True)
        except OSError as exc:
            raise output_error("create output folder", self.path, exc) from exc
        if not os.access(self.path, os.W_OK):
            raise OutputError(f"output folder is not writable: {self.path}")

    def newest_run_time(self) -> datetime:
        """Start time encoded in the newest run id here (the epoch when there is none)."""
        newest = datetime.fromtimestamp(0, timezone.utc)
        for path in [*self.path.glob("*.parquet"), *(self.path / "_runs").glob("*.json")]:
            match = RUN_ID.match(path.stem)
            if match:
                when = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)
                newest = max(newest, when)
        return newest

    def remove_leftovers(self) -> None:
        """Delete the hidden temporary files of killed runs (call only while holding the lock)."""
        folders = [self.path, self.path / "_runs", self.path / "_cache", *(self.path / "_cache").glob("*")]
        for folder in folders:
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    log.info("removed %s, left by an interrupted run", tmp)

    def _cache_folder(self, fingerprint: str) -> Path:
        return self.path / "_cache" / fingerprint[:16]

    def _cache_parts(self, fingerprint: str) -> list[Path]:
        folder = self._cache_folder(fingerprint)
        return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []

    def cache_writer(self, fingerprint: str, run_id: str, metadata: dict[bytes, bytes]) -> CacheWriter:
        folder = self._cache_folder(fingerprint)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error("create cache folder", folder, exc) from exc
        return CacheWriter(folder, run_id, metadata)

    def cached_shas(self, fingerprint: str, *, with_embeddings: bool) -> pa.Array:
        """sha256 of every content this model already has a prediction for, each once."""
        cols = [Col.SHA256, Col.EMBEDDING] if with_embeddings else [Col.SHA256]

        def shas(batch: pa.RecordBatch) -> pa.Array:
            if with_embeddings:
                batch = batch.filter(batch.column(Col.EMBEDDING).is_valid())
            return pc.unique(batch.column(Col.SHA256)).cast(pa.string())

        found = [a for part in self._cache_parts(fingerprint) for a in _read_part_batches(part, cols, shas) or ()]
        return pc.unique(pa.chunked_array(found, pa.string()))

    def read_cache(self, fingerprint: str, shas: pa.Array | pa.ChunkedArray, *, with_embeddings: bool) -> pa.Table:
        """The newest cached row of each wanted sha256 (later parts win), as one table.

        With with_embeddings only rows that carry an embedding count; without, the embedding
        column is not even read. Two passes: the sha256 column alone says which rows are wanted,
        then each part is read a batch at a time and only those rows are kept (copied out tight),
        so memory is the rows returned plus one batch, whatever the size of the cache."""
        schema = cache_schema()
        if not with_embeddings:
            schema = schema.remove(schema.get_field_index(Col.EMBEDDING))
        wanted = shas.combine_chunks() if isinstance(shas, pa.ChunkedArray) else pa.array(shas, pa.string())
        parts = self._cache_parts(fingerprint)
        keys, sizes = _part_keys(parts, with_embedding=with_embeddings)
        sha = keys[Col.SHA256]  # a row with no embedding cannot serve an embeddings read
        if with_embeddings:
            sha = pc.if_else(keys[Col.EMBEDDING], sha, pa.scalar(None, pa.string()))
        del keys
        candidates = np.flatnonzero(pc.fill_null(pc.is_in(sha, value_set=wanted), False).to_numpy(zero_copy_only=False))
        rows = candidates[_last_of_each(sha.take(pa.array(candidates, pa.int64())))]  # sorted global rows
        del sha, candidates
        batches, start = [], 0
        for part, size in zip(parts, sizes):
            if size is None:  # unreadable: its contents are simply inferred again next run
                continue
            end = start + size
            mine = rows[np.searchsorted(rows, start):np.searchsorted(rows, end)] - start
            if len(mine):
                batches.extend(_take_rows(part, schema, mine) or ())
            start = end
        table = pa.Table.from_batches(batches, schema)
        if not with_embeddings:
            table = table.append_column(cache_schema().field(Col.EMBEDDING),
                                        pa.nulls(table.num_rows, pa.list_(pa.float32())))
        return table

    def cache_labels(self, fingerprint: str) -> list[str] | None:
        """The class labels stored with a model's newest cache part (None: no readable part), so that an
        unchanged rerun can write the rows without loading the model."""
        for part in reversed(self._cache_parts(fingerprint)):
            try:
                labels = read_metadata(pq.read_schema(part)).get("labels")
            except (OSError, pa.ArrowException, ValueError):
                continue
            if isinstance(labels, list):
                return labels
        return None

    def compact_cache(self, fingerprint: str, run_id: str, metadata: dict[bytes, bytes]) -> int:
        """Merge a model's cache parts into one when there are many; returns the parts removed.

        Keeps, per content, exactly the rows read_cache can pick (the newest, and the newest with an
        embedding), in their original order, streaming one part at a time; the merged part is
        committed before any old part is deleted, so a kill at any point loses nothing."""
        parts = self._cache_parts(fingerprint)
        if len(parts) <= COMPACT_PARTS:
            return 0
        keep = _rows_to_keep(parts)
        target = self._cache_folder(fingerprint) / f"part-{run_id}-zcompact.parquet"
        with atomic_path(target, "compact the cache in") as tmp:
            with pq.ParquetWriter(tmp, cache_schema(metadata)) as writer:
                pending: list[pa.Table] = []  # kept rows of small parts, written as one row group
                pending_bytes = 0
                for part, rows in zip(parts, keep):
                    table = _read_part(part, None)
                    if table is not None and len(rows):  # an unreadable part's work is redone anyway
                        pending.append(_conform(table, writer.schema).take(pa.array(rows, pa.int64())))
                        pending_bytes += pending[-1].nbytes
                    if pending_bytes >= _ROW_GROUP_BYTES:
                        _write_row_group(writer, pending)
                        pending_bytes = 0
                _write_row_group(writer, pending)
        for part in parts:
            if part != target:
                with contextlib.suppress(OSError):
                    part.unlink()
        log.info("merged %d cache parts into %s", len(parts), target.name)
        return len(parts)

    def _index_path(self) -> Path:
        return self.path / "_cache" / "files.parquet"

    def read_file_index(self) -> pa.Table:
        """Each file's stat (size, mtime_ns, ctime_ns, inode) when its sha256 was last computed, by
        abspath (file_index_schema); no rows if absent or unreadable."""
        schema, path = file_index_schema(), self._index_path()
        batches = _read_part_batches(path, None, lambda b: b) if path.exists() else None  # a batch at a time
        if not batches or batches[0].schema.names != schema.names:
            return schema.empty_table()
        return pa.Table.from_batches([b.cast(schema) for b in batches], schema)

    def write_file_index(self, index: pa.Table, hashed_at_ns: int) -> None:
        """Save the file index (file_index_schema columns), leaving out files changed too close to
        when they were hashed."""
        schema = file_index_schema()
        index = index.select(schema.names)
        settled = pc.less(pc.max_element_wise(index[Col.MTIME_NS], index[Col.CTIME_NS]), hashed_at_ns - _RACY_NS)
        table = index.filter(settled).cast(schema)
        with atomic_path(self._index_path(), "write the file index") as tmp:
            pq.write_table(table, tmp)

    def write_rows(self, run_id: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> Path:
        """Stream record batches into DIR/<run_id>.parquet, committed only when complete."""
        target = self.path / f"{run_id}.parquet"
        with atomic_path(target, "write results to") as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                    faults.point("rows")
        return target

    def latest_summary(self) -> dict[str, Any] | None:
        """DIR/_summary.json, the latest run's summary (None when absent or unreadable)."""
        try:
            summary = json.loads((self.path / "_summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def write_summary(self, run_id: str, summary: dict[str, Any]) -> Path:
        """DIR/_runs/<run_id>.json for the record, and DIR/_summary.json for monitoring.

        A _summary.json that describes an earlier run is never left claiming to be the latest when
        this one's cannot be written: it is removed (that run's copy stays in _runs/) and, as that
        frees about the space a summary needs on a full disk, the write is tried once more."""
        latest = self.path / "_summary.json"
        try:
            write_json(summary, self.path / "_runs" / f"{run_id}.json")
        except OutputError:
            if _summary_run_id(latest) != run_id:
                _remove(latest)
            raise
        try:
            write_json(summary, latest)
        except OutputError:
            if _summary_run_id(latest) == run_id:  # this run's summary, written before, stands
                raise
            _remove(latest)
            write_json(summary, latest)
        return latest


def _remove(path: Path) -> None:
    """Delete path if it is there; a file that cannot be deleted is left as it is."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _summary_run_id(path: Path) -> str | None:
    """The run id a summary file describes (None when it is absent or unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _write_row_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    """tables written as one row group, and the list emptied. A run's parts hold one batch each;
    as row groups of their own (3,125 at 100,000 files) they made every later read of the cache
    about twice as slow and ~30 MiB larger (measured)."""
    if tables:
        table = pa.concat_tables([t.cast(writer.schema) for t in tables])
        writer.write_table(table, row_group_size=max(1, table.num_rows))
        tables.clear()


def _read_part(path: Path, columns: list[str] | None) -> pa.Table | None:
    """One cache part; an unreadable one is skipped with a warning (its work is simply redone)."""
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        log.warning("ignoring unreadable cache part %s: %s", path, exc)
        return None


def _read_part_batches(path: Path, columns: list[str] | None,
                       each: Callable[[pa.RecordBatch], Any]) -> list[Any] | None:
    """each(batch) over one Parquet file read a batch at a time, so that reading costs a batch, not
    the file; None for an unreadable file (warned about, and its work simply redone)."""
    try:
        with pq.ParquetFile(path) as reader:
            return [each(b) for b in reader.iter_batches(batch_size=_READ_BATCH, columns=columns)]
    except (OSError, pa.ArrowException) as exc:
        log.warning("ignoring unreadable cache part %s: %s", path, exc)
        return None


def _take_rows(path: Path, schema: pa.Schema, rows: np.ndarray) -> list[pa.RecordBatch] | None:
    """The rows (sorted row numbers) of one Parquet file, read a batch at a time, as schema."""
    out, lo = [], 0

    def take(batch: pa.RecordBatch) -> None:
        nonlocal lo
        hi = lo + batch.num_rows
        mine = rows[np.searchsorted(rows, lo):np.searchsorted(rows, hi)] - lo
        if len(mine):
            out.append(_conform(batch, schema).take(pa.array(mine, pa.int64())))
        lo = hi

    return None if _read_part_batches(path, schema.names, take) is None else out


def _conform(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table | pa.RecordBatch:
    """table's columns as schema has them: a column a part written by an earlier version lacks (precision)
    comes back null, so its predictions are still reused rather than inferred again."""
    columns = [table.column(f.name) if f.name in table.schema.names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    kind = pa.Table if isinstance(table, pa.Table) else pa.RecordBatch
    return kind.from_arrays(columns, names=schema.names).cast(schema)


def _part_keys(parts: list[Path], *, with_embedding: bool) -> tuple[pa.Table, list[int | None]]:
    """Every row of the cache parts in turn, by its sha256 (and, with_embedding, whether it has an
    embedding), read a batch at a time; and each part's row count (None: unreadable, skipped).
    A run leaves thousands of one-batch parts: their rows are merged every 256 parts as they
    are read, not held as thousands of slivers."""
    columns = [Col.SHA256, Col.EMBEDDING] if with_embedding else [Col.SHA256]
    schema = pa.schema([(Col.SHA256, pa.string())] + ([(Col.EMBEDDING, pa.bool_())] if with_embedding else []))

    def keys(batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = [batch.column(Col.SHA256).cast(pa.string())]
        if with_embedding:
            arrays.append(batch.column(Col.EMBEDDING).is_valid())
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    batches: list[pa.RecordBatch] = []
    sizes: list[int | None] = []
    for part in parts:
        found = _read_part_batches(part, columns, keys)
        sizes.append(None if found is None else sum(b.num_rows for b in found))
        batches.extend(found or ())
        if len(batches) >= 256:
            batches = pa.Table.from_batches(batches, schema).combine_chunks().to_batches()
    return pa.Table.from_batches(batches, schema), sizes


def _last_of_each(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Sorted positions of the last occurrence of each distinct value of keys (no nulls)."""
    codes = pc.index_in(keys, value_set=pc.unique(keys)).to_numpy()
    _, first_from_end = np.unique(codes[::-1], return_index=True)
    return np.sort(len(codes) - 1 - first_from_end)


def _rows_to_keep(parts: list[Path]) -> list[np.ndarray]:
    """Per part, the row numbers read_cache could still pick: each sha256's newest row, and its
    newest row with an embedding (with_embeddings reads skip rows without one)."""
    keys, sizes = _part_keys(parts, with_embedding=True)
    sha = keys[Col.SHA256]
    has_embedding = keys[Col.EMBEDDING].to_numpy(zero_copy_only=False)
    with_embedding = np.flatnonzero(has_embedding)
    keep = np.union1d(_last_of_each(sha), with_embedding[_last_of_each(sha.take(pa.array(with_embedding, pa.int64())))])
    starts = np.cumsum([0, *(size or 0 for size in sizes)])
    return [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]
