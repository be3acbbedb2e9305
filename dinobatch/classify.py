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

from . import __version__, faults
from .config import ClassifyConfig
from .dedupe import DedupeItem, group_duplicates
from .device import resolve_runtime, tune_process
from .infer import WorkItem, predict
from .lock import exclusive
from .model import resolve_model
from .results import ResultsDir
from .scan import FileEntry, check_folder, sha256_file, walk
from .schema import (FACT_COLUMNS, PREDICTION_COLUMNS, SPECIES_COLUMNS, STATUS_DUPLICATE, STATUS_ERROR,
                     STATUS_OK, Col, row_schema, schema_metadata)
from .species import default_species_csv, load_species

__all__ = ["classify", "RunSummary", "Progress"]

log = logging.getLogger(__name__)

# progress(stage, done, total): stage is "fingerprint" or "infer"
Progress = Callable[[str, int, int], None]
_ROWS_PER_BATCH = 2048


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

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def new_run_id(now: datetime) -> str:
    """Run id that sorts in start order (microseconds) and stays unique (random suffix)."""
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def _fingerprint(entries: Sequence[FileEntry], index: dict[str, tuple], progress: Progress | None
                 ) -> tuple[dict[str, str], dict[str, str], dict[str, tuple]]:
    """sha256 per readable file path, the reason for each file that could not be read, and the new
    file index; a file whose size, mtime, ctime and inode match the index is not read again."""
    shas: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    seen: dict[str, tuple] = {}
    for done, entry in enumerate(entries, 1):
        if entry.error is not None:
            unreadable[entry.path] = entry.error
        else:
            stat = (entry.size, entry.mtime_ns, entry.ctime_ns, entry.inode)
            known = index.get(entry.abspath)
            try:
                sha = known[4] if known is not None and tuple(known[:4]) == stat else sha256_file(entry.abspath)
            except OSError as exc:
                unreadable[entry.path] = f"cannot read file: {exc.strerror or exc}"
            else:
                shas[entry.path] = sha
                seen[entry.abspath] = (*stat, sha)
        faults.point("fingerprint")
        if progress:
            progress("fingerprint", done, len(entries))
    return shas, unreadable, seen


def classify(cfg: ClassifyConfig, progress: Progress | None = None) -> RunSummary:
    """Run the classify job over cfg.folder and write its rows and summary under cfg.out."""
    t0 = time.monotonic()
    # absolute paths in the saved configuration: curate --html and export run from other folders
    cfg = dataclasses.replace(cfg, folder=check_folder(cfg.folder), out=os.path.abspath(cfg.out))
    runtime = resolve_runtime(cfg.device, cfg.precision)
    process = tune_process(runtime)  # before the model allocates: the allocator settings apply from here
    model = resolve_model(cfg.model)
    species = load_species(cfg.species if cfg.species else default_species_csv())
    out = ResultsDir(cfg.out)
    out.ensure()
    with exclusive(out.path / ".lock", wait=cfg.wait):
        # the run id is taken under the lock and after every earlier run's, so 'newest run' is the
        # run that scanned last, even after a --wait or a clock stepped back
        started = max(datetime.now(timezone.utc), out.newest_run_time() + timedelta(microseconds=1))
        out.remove_leftovers()
        return _classify_locked(cfg, out, new_run_id(started), t0, started, runtime, model, species, progress,
                                process)


def _classify_locked(cfg, out, run_id, t0, started, runtime, model, species, progress, process) -> RunSummary:
    """The run itself, while this process alone writes to cfg.out."""
    entries = list(walk(cfg.folder, exclude=cfg.out))  # an --out inside the folder is not input
    log.info("found %d files under %s", len(entries), cfg.folder)
    hashed_at = time.time_ns()
    shas, unreadable, file_index = _fingerprint(entries, {} if cfg.force else out.read_file_index(), progress)

    cached = set() if cfg.force else out.cached_shas(model.fingerprint, with_embeddings=cfg.embeddings)
    todo: dict[str, list[str]] = {}
    for entry in entries:
        sha = shas.get(entry.path)
        if sha is not None and sha not in cached:
            todo.setdefault(sha, []).append(entry.abspath)
    reused = len(set(shas.values()) & cached)
    log.info("%d unique contents to infer, %d already have predictions from this model", len(todo), reused)

    metadata = schema_metadata(version=__version__, model_name=model.name, model_fingerprint=model.fingerprint,
                               labels=list(model.spec.labels), folder=cfg.folder)
    decode_errors, changed, infer_seconds = _infer(cfg, out, model, runtime, todo, run_id, metadata, progress)
    by_abspath = {e.abspath: e.path for e in entries}
    unreadable.update({by_abspath[p]: "file changed while dinobatch was reading it; the next run classifies it"
                       for p in changed})

    content = out.read_cache(model.fingerprint, set(shas.values()) - set(decode_errors),
                             with_embeddings=cfg.embeddings)
    stats: dict[str, Any] = {}
    rows = _row_batches(entries, shas, unreadable, decode_errors, content, species, cfg, model, run_id, stats)
    rows_file = out.write_rows(run_id, rows, row_schema(metadata))
    out.write_file_index(file_index, hashed_at)
    out.compact_cache(model.fingerprint, run_id, metadata)
    inferred = len(todo) - len(decode_errors)
    summary = RunSummary(
        run_id=run_id, rows_file=str(rows_file), files=len(entries), counts=stats["counts"],
        inferred=inferred, reused=reused, duplicate_groups=stats["groups"],
        seconds=round(time.monotonic() - t0, 3),
        images_per_second=round(inferred / infer_seconds, 2) if inferred and infer_seconds > 0 else None,
        model={"name": model.name, "fingerprint": model.fingerprint, "arch": model.spec.arch,
               "classes": len(model.spec.labels)},
        runtime=runtime.describe(), config=cfg.to_dict(), process=process, started=started.isoformat(),
        finished=datetime.now(timezone.utc).isoformat(), errors=stats["errors"][:20])
    out.write_summary(run_id, summary.to_dict())
    return summary


def _infer(cfg, out, model, runtime, todo, run_id, metadata, progress) -> tuple[dict[str, str], set[str], float]:
    """Decode and infer each new content; commit every batch to the cache as it finishes."""
    writer = out.cache_writer(model.fingerprint, run_id, metadata)
    items = [WorkItem(tuple(paths), sha) for sha, paths in todo.items()]
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


def _assignments(entries, shas, unreadable, content, index, cfg) -> dict[str, Any]:
    """Duplicate groups over the files that have a prediction (a file in error is in no group)."""
    facts = content.select([Col.PHASH, Col.DHASH, Col.WIDTH, Col.HEIGHT]).to_pylist()
    items = []
    for e in entries:
        i = None if e.path in unreadable else index.get(shas.get(e.path, ""))
        if i is not None:
            f = facts[i]
            items.append(DedupeItem(e.path, shas[e.path], int(f[Col.PHASH], 16), int(f[Col.DHASH], 16),
                                    f[Col.WIDTH] * f[Col.HEIGHT]))
    return {a.path: a for a in group_duplicates(items, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)}


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


def _row_batches(entries, shas, unreadable, decode_errors, content, species, cfg, model, run_id,
                 stats: dict[str, Any]) -> Iterator:
    """Per-file rows in path order, built in slices; duplicates carry the kept file's prediction.

    Fills stats with counts, duplicate groups and errors as the rows are produced."""
    import pyarrow as pa

    schema = row_schema()
    index = {sha: i for i, sha in enumerate(content[Col.SHA256].to_pylist())}
    groups = _assignments(entries, shas, unreadable, content, index, cfg)
    stats.update(counts={STATUS_OK: 0, STATUS_DUPLICATE: 0, STATUS_ERROR: 0}, errors=[],
                 groups=len({g.group for g in groups.values()}))
    ordered = sorted(entries, key=lambda e: e.path)
    for lo in range(0, len(ordered), _ROWS_PER_BATCH):
        chunk = ordered[lo:lo + _ROWS_PER_BATCH]
        own, pred, cols = [], [], {name: [] for name in (Col.RUN_ID, Col.PATH, Col.PATH_BYTES, Col.BYTES, Col.MTIME,
                                                         Col.SHA256, Col.STATUS, Col.ERROR, Col.DUPLICATE_OF,
                                                         Col.DUPLICATE_KIND, Col.DUPLICATE_GROUP)}
        for e in chunk:
            sha = shas.get(e.path)
            i = index.get(sha) if sha else None
            g = groups.get(e.path)
            error = unreadable.get(e.path) or (decode_errors.get(sha) if sha else None)
            if error is None and i is None:
                error = "no prediction was produced for this file; rerun"
            status = STATUS_ERROR if error else (STATUS_DUPLICATE if g and g.duplicate_of else STATUS_OK)
            stats["counts"][status] += 1
            if error:
                stats["errors"].append({"path": e.path, "error": error})
                g = i = None
            own.append(i)
            pred.append(index[shas[g.duplicate_of]] if status == STATUS_DUPLICATE else i)
            values = (run_id, e.path, e.raw, e.size, _utc(e.mtime_ns), sha, status, error,
                      g.duplicate_of if g else None, g.kind if g else None, g.group if g else None)
            for name, value in zip(cols, values):
                cols[name].append(value)
        facts = content.select(list(FACT_COLUMNS)).take(pa.array(own, pa.int64()))
        preds = content.select(list(PREDICTION_COLUMNS)).take(pa.array(pred, pa.int64()))
        labels = preds[Col.LABEL].to_pylist()
        topk_labels, topk_probs = _top_k(preds[Col.PROBS].to_pylist(), model.spec.labels, cfg.top_k)
        arrays = {**cols, **{c: facts[c] for c in FACT_COLUMNS}, **{c: preds[c] for c in PREDICTION_COLUMNS},
                  Col.TOPK_LABELS: topk_labels, Col.TOPK_PROBS: topk_probs,
                  Col.MODEL: [model.name] * len(chunk), Col.MODEL_FINGERPRINT: [model.fingerprint] * len(chunk)}
        if not cfg.embeddings:
            arrays[Col.EMBEDDING] = pa.nulls(len(chunk), pa.list_(pa.float32()))
        for c in SPECIES_COLUMNS:
            arrays[c] = [species.get(label, {}).get(c) if label else None for label in labels]
        yield from pa.Table.from_pydict({f.name: arrays[f.name] for f in schema}, schema=schema).to_batches()


def _utc(mtime_ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc) if mtime_ns is not None else None
