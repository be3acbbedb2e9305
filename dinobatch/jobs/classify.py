"""The classify job: scan -> fingerprint -> infer what is new -> dedupe -> write rows and summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch import __version__
from dinobatch.config import ClassifyConfig
from dinobatch.dedupe.groups import Groups, group_among
from dinobatch.errors import OutputError
from dinobatch.imaging import decode_budget
from dinobatch.io.lock import exclusive
from dinobatch.io.walk import check_folder, read_error, sha256_file, walk_table
from dinobatch.jobs.predict import WorkItem, predict
from dinobatch.models.file import resolve_model
from dinobatch.runtime import faults
from dinobatch.runtime.device import resolve_runtime
from dinobatch.runtime.memory import release_memory, tune_process
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
    file_index_schema,
    row_schema,
    schema_metadata,
)
from dinobatch.store.results import ResultsDir
from dinobatch.store.species import default_species_csv, load_species

__all__ = ["classify", "RunSummary", "Progress"]

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "fingerprint" or "infer"
Progress = Callable[[str, int, int], None]
_ROWS_PER_BATCH = 2048
_ERRORS_KEPT = 20  # errors listed in the summary (all of them are in the rows)


@dataclass
class RunSummary:
    """What a run did, as written to _summary.json and printed by the CLI."""

    run_id: str
    rows_file: str
    files: int
    counts: dict[str, int]
    inferred: int
    reused: int
    duplicate_groups: int
    seconds: float
    images_per_second: float | None
    model: dict[str, Any]
    runtime: str
    config: dict[str, Any]
    process: dict[str, Any]  # process-wide speed settings applied (allocator, threads, layout)
    started: str
    finished: str
    version: str = __version__
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few, for a quick look
    warnings: list[str] = field(default_factory=list)  # optional steps after the commit that failed

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def new_run_id(now: datetime) -> str:
    """Run id that sorts in start order (microseconds) and stays unique (random suffix)."""
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def _known_shas(files: pa.Table, index: pa.Table) -> pa.ChunkedArray:
    """Per file, the sha256 the file index holds for it where size, mtime, ctime and inode all match
    what the walk saw (null elsewhere): those files are not read again."""
    at = pc.index_in(files[Col.ABSPATH], value_set=index[Col.ABSPATH].combine_chunks())
    same = pa.chunked_array([pa.array(np.ones(files.num_rows, bool))])
    for c in (Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE):  # a column at a time: no copy of the index
        same = pc.and_(same, pc.fill_null(pc.equal(files[c], index[c].take(at)), False))
    return pc.if_else(same, index[Col.SHA256].take(at), pa.scalar(None, pa.string()))


def _fingerprint(files: pa.Table, index: pa.Table, progress: Progress | None
                 ) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """sha256 of each readable file, and the reason for each file that could not be read (null
    elsewhere), aligned with files; a file whose stat matches the index is not read again."""
    shas, errors, done = [], [], 0
    columns = pa.table([files[Col.ABSPATH], files[Col.ERROR], _known_shas(files, index)], names=["a", "e", "k"])
    for batch in columns.to_batches(max_chunksize=4096):  # Python values for one batch at a time
        sha_part, error_part = [], []
        for abspath, error, sha in zip(*(c.to_pylist() for c in batch.columns)):
            if error is None and sha is None:
                try:
                    sha = sha256_file(os.fsdecode(abspath))
                except OSError as exc:
                    error = read_error(exc)
            sha_part.append(None if error else sha)
            error_part.append(error)
            done += 1
            faults.point("fingerprint")
            if progress:
                progress("fingerprint", done, files.num_rows)
        shas.append(pa.array(sha_part, pa.string()))
        errors.append(pa.array(error_part, pa.string()))
    return pa.chunked_array(shas, pa.string()), pa.chunked_array(errors, pa.string())


class _Todo(Sequence[WorkItem]):
    """The contents to infer, first seen first, each with every file that holds it: WorkItems made
    on demand from arrays, so that the list of work holds no Python object per file."""

    def __init__(self, abspaths: pa.ChunkedArray, shas: pa.ChunkedArray, cached: pa.Array):
        new = np.flatnonzero(pc.and_(shas.is_valid(), pc.invert(pc.is_in(shas, value_set=cached))).to_numpy(
            zero_copy_only=False))
        new_shas = shas.take(pa.array(new, pa.int64()))
        self.shas = pc.unique(new_shas)  # in order of first appearance
        content = pc.index_in(new_shas, value_set=self.shas).to_numpy(zero_copy_only=False)
        by_content = new[np.argsort(content, kind="stable")]  # files of each content together, in walk order
        self.abspaths = abspaths.take(pa.array(by_content, pa.int64())).combine_chunks()
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(content, minlength=len(self.shas)))])

    def __len__(self) -> int:
        return len(self.shas)

    def __getitem__(self, i):
        i = range(len(self))[i]  # negative indices and IndexError as a list has them
        if isinstance(i, range):
            return [self[j] for j in i]
        paths = self.abspaths[self.starts[i]:self.starts[i + 1]].to_pylist()
        return WorkItem(tuple(os.fsdecode(p) for p in paths), self.shas[i].as_py())


def classify(cfg: ClassifyConfig, progress: Progress | None = None) -> RunSummary:
    """Run the classify job over cfg.folder and write its rows and summary under cfg.out."""
    t0 = time.monotonic()
    # absolute paths in the saved configuration: curate --html and export run from other folders
    cfg = dataclasses.replace(cfg, folder=check_folder(cfg.folder), out=os.path.abspath(cfg.out))
    decode_budget.from_env()  # a bad DINOBATCH_DECODE_MEMORY is refused now, not after the folder is hashed
    out = ResultsDir(cfg.out)
    out.ensure()
    # the lock first: a run that finds the output in use exits 9 at once, before torch and the model load
    with exclusive(out.path / ".lock", wait=cfg.wait):
        runtime = resolve_runtime(cfg.device, cfg.precision)
        process = tune_process(runtime)  # before the model allocates: the allocator settings apply from here
        model = resolve_model(cfg.model)
        species = load_species(cfg.species if cfg.species else default_species_csv())
        # the run id is taken under the lock and after every earlier run's, so 'newest run' is the
        # run that scanned last, even after a --wait or a clock stepped back
        started = max(datetime.now(timezone.utc), out.newest_run_time() + timedelta(microseconds=1))
        out.remove_leftovers()
        return _classify_locked(cfg, out, new_run_id(started), t0, started, runtime, model, species, progress,
                                process)


def _classify_locked(cfg, out, run_id, t0, started, runtime, model, species, progress, process) -> RunSummary:
    """The run itself, while this process alone writes to cfg.out."""
    files = walk_table(cfg.folder, exclude=cfg.out)  # an --out inside the folder is not input
    log.info("found %d files under %s", files.num_rows, cfg.folder)
    if not files.num_rows:  # a quiet night in cron, or a newcomer's first run: not an error, but say so
        log.info("no files to classify under %s (names starting with '.', such as .gitkeep, are skipped): "
                 "put the images there, in any sub-folders, and run again", cfg.folder)
    hashed_at = time.time_ns()
    index = file_index_schema().empty_table() if cfg.force else out.read_file_index()
    shas, errors = _fingerprint(files, index, progress)
    del index

    cached = pa.array([], pa.string()) if cfg.force else out.cached_shas(model.fingerprint,
                                                                          with_embeddings=cfg.embeddings)
    todo = _Todo(files[Col.ABSPATH], shas, cached)
    reused = pc.count_distinct(shas.filter(pc.is_in(shas, value_set=cached))).as_py()
    del cached
    log.info("%d unique contents to decode and infer, %d already have predictions from this model",
             len(todo), reused)
    release_memory()  # here and below: one stage's freed temporaries never add to the next one's peak

    metadata = schema_metadata(version=__version__, model_name=model.name, model_fingerprint=model.fingerprint,
                               labels=list(model.spec.labels), folder=cfg.folder)
    decode_errors, changed, infer_seconds = _infer(cfg, out, model, runtime, todo, run_id, metadata, progress)
    # contents that fail to decode are not cached, so each run counts them again among those to infer
    log.info("inferred %d new contents, %d could not be decoded (rows with status error; tried again next run)",
             len(todo) - len(decode_errors), len(decode_errors))
    release_memory()
    changed_mask = pc.is_in(files[Col.ABSPATH], value_set=pa.array([os.fsencode(p) for p in changed], pa.binary()))
    errors = pc.if_else(changed_mask, "file changed while dinobatch was reading it; the next run classifies it",
                        errors)

    failed = pa.array(list(decode_errors), pa.string())
    wanted = pc.unique(shas.drop_null())
    content = out.read_cache(model.fingerprint, wanted.filter(pc.invert(pc.is_in(wanted, value_set=failed))),
                             with_embeddings=cfg.embeddings)
    release_memory()
    stats: dict[str, Any] = {}
    rows = _row_batches(files, shas, errors, decode_errors, content, species, cfg, model, run_id, stats)
    rows_file = out.write_rows(run_id, rows, row_schema(metadata))
    release_memory()
    inferred = len(todo) - len(decode_errors)
    summary = RunSummary(
        run_id=run_id, rows_file=str(rows_file), files=files.num_rows, counts=stats["counts"],
        inferred=inferred, reused=reused, duplicate_groups=stats["groups"],
        seconds=round(time.monotonic() - t0, 3),
        images_per_second=round(inferred / infer_seconds, 2) if inferred and infer_seconds > 0 else None,
        model={"name": model.name, "fingerprint": model.fingerprint, "arch": model.spec.arch,
               "classes": len(model.spec.labels)},
        runtime=runtime.describe(), config=cfg.to_dict(), process=process, started=started.isoformat(),
        finished=datetime.now(timezone.utc).isoformat(), errors=stats["errors"])
    seen = files.select([Col.ABSPATH, Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE]).append_column(Col.SHA256, shas)
    return _record(out, summary, seen.filter(shas.is_valid()), hashed_at, metadata)


def _record(out: ResultsDir, summary: RunSummary, seen: pa.Table, hashed_at: int,
            metadata: dict[bytes, bytes]) -> RunSummary:
    """After the rows file: the run's summary first, then the optional work (file index, cache
    compaction), whose failures are added to the summary as warnings."""
    _write_summary(out, summary)
    summary.warnings = _after_commit(out, seen, hashed_at, summary.model["fingerprint"], summary.run_id, metadata)
    if summary.warnings:  # best effort: the summary written above stands if this cannot be written
        try:
            out.write_summary(summary.run_id, summary.to_dict())
        except OutputError as exc:
            log.warning("_summary.json does not list these warnings: %s", exc)
    return summary


def _write_summary(out: ResultsDir, summary: RunSummary) -> None:
    """Record a run whose rows file is committed, before any optional work can use up the space;
    when it cannot be written, say exactly what was committed."""
    try:
        out.write_summary(summary.run_id, summary.to_dict())
    except OutputError as exc:
        raise OutputError(f"{exc}. This run's rows were committed ({summary.rows_file}) and are the current "
                          f"rows; _summary.json was removed rather than left describing an earlier run. Free "
                          f"space and rerun to write a summary") from exc


def _after_commit(out: ResultsDir, seen: pa.Table, hashed_at: int, fingerprint: str, run_id: str,
                  metadata: dict[bytes, bytes]) -> list[str]:
    """Save the file index and compact the cache, once the run is committed and recorded. Both only
    save later runs work, so a failure (a full disk) is a warning, not a failed run: the old index
    and every cache part are left as they were, and the next run tries again."""
    steps = [("the file index was not updated", "the next run hashes again the files it does not list",
              lambda: out.write_file_index(seen, hashed_at)),
             ("the cache was not compacted", "its parts are intact and the next run tries again",
              lambda: out.compact_cache(fingerprint, run_id, metadata))]
    warnings = []
    for what, consequence, step in steps:
        try:
            step()
        except OutputError as exc:
            warnings.append(f"{what} ({exc}); {consequence}")
            log.warning("%s", warnings[-1])
    return warnings


def _infer(cfg, out, model, runtime, items: Sequence[WorkItem], run_id, metadata,
           progress) -> tuple[dict[str, str], set[str], float]:
    """Decode and infer each new content; commit every batch to the cache as it finishes."""
    writer = out.cache_writer(model.fingerprint, run_id, metadata)
    decode_errors: dict[str, str] = {}
    changed: set[str] = set()
    t, done = time.monotonic(), 0
    for results in predict(model, runtime, items, batch_size=cfg.batch_size,
                           workers=cfg.workers, embeddings=cfg.embeddings,
                           compile=cfg.compile, jpeg_on_device=cfg.gpu_decode and runtime.is_cuda):
        writer.write([{Col.SHA256: r.sha256, **r.facts, **r.prediction} for r in results if r.error is None])
        decode_errors.update({r.sha256: r.error for r in results if r.error is not None})
        changed.update(p for r in results for p in r.changed)
        faults.point("batch")
        done += len(results)
        if progress:
            progress("infer", done, len(items))
    return decode_errors, changed, time.monotonic() - t


def _hex64(hashes: pa.ChunkedArray) -> np.ndarray:
    """16-hex-digit hash strings as uint64, converted a slice at a time."""
    out = np.zeros(len(hashes), np.uint64)
    for lo in range(0, len(hashes), 4096):
        out[lo:lo + 4096] = [int(h, 16) for h in hashes.slice(lo, 4096).to_pylist()]
    return out


def _duplicates(path_order: np.ndarray, own: np.ndarray, content: pa.Table, cfg) -> Groups:
    """Duplicate groups over the files that have a prediction (own: their row in content, -1 for a
    file in error, which is in no group), as arrays over all files; keeper holds a file index."""
    ok = path_order[own[path_order] >= 0]  # in path order, as group_arrays wants them
    rows = own[ok]
    pixels = content[Col.WIDTH].to_numpy().astype(np.int64) * content[Col.HEIGHT].to_numpy()
    return group_among(len(own), ok, rows, _hex64(content[Col.PHASH])[rows], _hex64(content[Col.DHASH])[rows],
                       pixels[rows], phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)


def _top_k(probs: list[list[float] | None], labels: Sequence[str], k: int) -> tuple[list, list]:
    """topk_labels and topk_probs from probs, best first (null where probs is null)."""
    import numpy as np

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


def _final_errors(shas, errors, decode_errors: dict[str, str], content: pa.Table) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Every file's error (its own, its content's, or a missing prediction) and, for the files
    without one, their row in content (-1 for the others)."""
    failed = pa.array(list(decode_errors.values()), pa.string()).take(
        pc.index_in(shas, value_set=pa.array(list(decode_errors), pa.string())))
    row = pc.index_in(shas, value_set=content[Col.SHA256].combine_chunks())
    missing = pc.if_else(row.is_null(), "no prediction was produced for this file; rerun", pa.scalar(None, pa.string()))
    errors = pc.coalesce(errors, failed, missing)
    own = pc.if_else(errors.is_null(), pc.fill_null(row, -1), -1)
    return errors, own.to_numpy(zero_copy_only=False).astype(np.int64)


def _row_batches(files: pa.Table, shas, errors, decode_errors, content, species, cfg, model, run_id,
                 stats: dict[str, Any]) -> Iterator:
    """Per-file rows in path order, built in slices; duplicates carry the kept file's prediction.

    Fills stats with counts, duplicate groups and errors as the rows are produced."""
    errors, own = _final_errors(shas, errors, decode_errors, content)
    order = pc.sort_indices(files[Col.PATH]).to_numpy()  # code point order, as sorted() on str
    groups = _duplicates(order, own, content, cfg)
    stats.update(counts={STATUS_OK: 0, STATUS_DUPLICATE: 0, STATUS_ERROR: 0}, errors=[],
                 groups=int(groups.group.max(initial=-1)) + 1)
    for lo in range(0, len(order), _ROWS_PER_BATCH):
        chunk = order[lo:lo + _ROWS_PER_BATCH]
        yield from _row_batch(chunk, files, shas, errors, own, groups, content, species, cfg, model, run_id, stats)


def _row_batch(chunk: np.ndarray, files, shas, errors, own, groups: Groups, content, species, cfg, model, run_id,
               stats: dict[str, Any]) -> Iterator:
    """The rows of the files at chunk (indices into files), in that order."""
    take = pa.array(chunk, pa.int64())
    error = errors.take(take)
    keeper = groups.keeper[chunk]
    duplicate = keeper >= 0
    status = np.where(error.is_null().to_numpy(zero_copy_only=False),
                      np.where(duplicate, STATUS_DUPLICATE, STATUS_OK), STATUS_ERROR)
    for name, count in zip(*np.unique(status, return_counts=True)):
        stats["counts"][str(name)] += int(count)
    if len(stats["errors"]) < _ERRORS_KEPT:  # the summary shows the first few
        stats["errors"].extend({"path": p, "error": e} for p, e in zip(files[Col.PATH].take(take).to_pylist(),
                                                                       error.to_pylist()) if e is not None)
        del stats["errors"][_ERRORS_KEPT:]
    own_rows = own[chunk]
    pred_rows = np.where(duplicate, own[np.maximum(keeper, 0)], own_rows)
    facts = content.select(list(FACT_COLUMNS)).take(pa.array(own_rows, pa.int64(), mask=own_rows < 0))
    preds = content.select(list(PREDICTION_COLUMNS)).take(pa.array(pred_rows, pa.int64(), mask=pred_rows < 0))
    labels = preds[Col.LABEL].to_pylist()
    topk_labels, topk_probs = _top_k(preds[Col.PROBS].to_pylist(), model.spec.labels, cfg.top_k)
    in_group = groups.group[chunk] >= 0
    arrays = {
        Col.RUN_ID: [run_id] * len(chunk), Col.PATH: files[Col.PATH].take(take),
        Col.PATH_BYTES: files[Col.PATH_BYTES].take(take), Col.BYTES: files[Col.BYTES].take(take),
        Col.MTIME: [_utc(ns) for ns in files[Col.MTIME_NS].take(take).to_pylist()], Col.SHA256: shas.take(take),
        Col.STATUS: status.tolist(), Col.ERROR: error,
        Col.DUPLICATE_OF: files[Col.PATH].take(pa.array(keeper, pa.int64(), mask=~duplicate)),
        Col.DUPLICATE_KIND: pa.array(np.where(groups.exact[chunk], DUPLICATE_EXACT, DUPLICATE_NEAR), pa.string(),
                                     mask=~duplicate),
        Col.DUPLICATE_GROUP: pa.array(groups.group[chunk], pa.int64(), mask=~in_group),
        **{c: facts[c] for c in FACT_COLUMNS}, **{c: preds[c] for c in PREDICTION_COLUMNS},
        Col.TOPK_LABELS: topk_labels, Col.TOPK_PROBS: topk_probs,
        Col.MODEL: [model.name] * len(chunk), Col.MODEL_FINGERPRINT: [model.fingerprint] * len(chunk)}
    if not cfg.embeddings:
        arrays[Col.EMBEDDING] = pa.nulls(len(chunk), pa.list_(pa.float32()))
    for c in SPECIES_COLUMNS:
        arrays[c] = [species.get(label, {}).get(c) if label else None for label in labels]
    schema = row_schema()
    yield from pa.Table.from_pydict({f.name: arrays[f.name] for f in schema}, schema=schema).to_batches()


def _utc(mtime_ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc) if mtime_ns is not None else None
