"""The classify job: scan -> fingerprint -> infer what is new -> dedupe -> write rows and summary."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

from . import __version__
from .config import ClassifyConfig, workers_for
from .dedupe import DedupeItem, group_duplicates
from .device import resolve_runtime
from .infer import WorkItem, predict
from .model import resolve_model
from .results import ResultsDir
from .scan import FileEntry, sha256_file, walk
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


def _fingerprint(entries: Sequence[FileEntry], progress: Progress | None) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 per readable file path, and the reason for each file that could not be read."""
    shas: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for done, entry in enumerate(entries, 1):
        if entry.error is not None:
            unreadable[entry.path] = entry.error
        else:
            try:
                shas[entry.path] = sha256_file(entry.abspath)
            except OSError as exc:
                unreadable[entry.path] = f"cannot read file: {exc.strerror or exc}"
        if progress:
            progress("fingerprint", done, len(entries))
    return shas, unreadable


def classify(cfg: ClassifyConfig, progress: Progress | None = None) -> RunSummary:
    """Run the classify job over cfg.folder and write its rows and summary under cfg.out."""
    t0, started = time.monotonic(), datetime.now(timezone.utc)
    run_id = new_run_id(started)
    out = ResultsDir(cfg.out)
    out.ensure()
    runtime = resolve_runtime(cfg.device, cfg.precision)
    model = resolve_model(cfg.model)
    species = load_species(cfg.species if cfg.species else default_species_csv())
    entries = list(walk(cfg.folder))
    log.info("found %d files under %s", len(entries), cfg.folder)
    shas, unreadable = _fingerprint(entries, progress)

    cached = set() if cfg.force else out.cached_shas(model.fingerprint, with_embeddings=cfg.embeddings)
    todo: dict[str, WorkItem] = {}
    for entry in entries:
        sha = shas.get(entry.path)
        if sha is not None and sha not in cached and sha not in todo:
            todo[sha] = WorkItem(entry.abspath, sha)
    reused = len(set(shas.values()) & cached)
    log.info("%d unique contents to infer, %d already have predictions from this model", len(todo), reused)

    metadata = schema_metadata(version=__version__, model_name=model.name,
                               model_fingerprint=model.fingerprint, labels=list(model.spec.labels))
    writer = out.cache_writer(model.fingerprint, run_id, metadata)
    workers = workers_for(runtime.device.type, cfg.workers)
    decode_errors: dict[str, str] = {}
    infer_t0, done = time.monotonic(), 0
    for results in predict(model, runtime, list(todo.values()), batch_size=cfg.batch_size,
                           workers=workers, top_k=cfg.top_k, embeddings=cfg.embeddings):
        writer.write([{Col.SHA256: r.sha256, **r.facts, **r.prediction} for r in results if r.error is None])
        decode_errors.update({r.sha256: r.error for r in results if r.error is not None})
        done += len(results)
        if progress:
            progress("infer", done, len(todo))
    infer_seconds = time.monotonic() - infer_t0

    content = out.read_cache(model.fingerprint, set(shas.values()) - set(decode_errors))
    rows_file = out.write_rows(run_id, _row_batches(entries, shas, unreadable, decode_errors, content, species,
                                                    cfg, model, run_id), row_schema(metadata))
    summary = _summarise(run_id, rows_file, len(entries), cfg, model, runtime, len(todo) - len(decode_errors), reused,
                         infer_seconds, t0, started)
    out.write_summary(run_id, summary.to_dict())
    return summary


def _assignments(entries, shas, content, cfg) -> dict[str, Any]:
    index = {sha: i for i, sha in enumerate(content[Col.SHA256].to_pylist())}
    facts = content.select([Col.PHASH, Col.DHASH, Col.WIDTH, Col.HEIGHT]).to_pylist()
    items = []
    for e in entries:
        i = index.get(shas.get(e.path, ""))
        if i is not None:
            f = facts[i]
            items.append(DedupeItem(e.path, shas[e.path], int(f[Col.PHASH], 16), int(f[Col.DHASH], 16),
                                    f[Col.WIDTH] * f[Col.HEIGHT]))
    return {a.path: a for a in group_duplicates(items, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)}


def _row_batches(entries, shas, unreadable, decode_errors, content, species, cfg, model, run_id) -> Iterator:
    """Per-file rows in path order, built in slices; duplicates carry the kept file's prediction."""
    import pyarrow as pa

    schema = row_schema()
    index = {sha: i for i, sha in enumerate(content[Col.SHA256].to_pylist())}
    groups = _assignments(entries, shas, content, cfg)
    ordered = sorted(entries, key=lambda e: e.path)
    for lo in range(0, len(ordered), _ROWS_PER_BATCH):
        chunk = ordered[lo:lo + _ROWS_PER_BATCH]
        own, pred, cols = [], [], {name: [] for name in (Col.RUN_ID, Col.PATH, Col.BYTES, Col.MTIME,
                                                         Col.SHA256, Col.STATUS, Col.ERROR, Col.DUPLICATE_OF,
                                                         Col.DUPLICATE_KIND, Col.DUPLICATE_GROUP)}
        for e in chunk:
            sha = shas.get(e.path)
            i = index.get(sha) if sha else None
            g = groups.get(e.path)
            error = unreadable.get(e.path) or (decode_errors.get(sha) if sha else None)
            if error is None and i is None:
                error = "no prediction was produced for this file (interrupted earlier?); rerun"
            status = STATUS_ERROR if error else (STATUS_DUPLICATE if g and g.duplicate_of else STATUS_OK)
            keeper = index[shas[g.duplicate_of]] if status == STATUS_DUPLICATE else i
            own.append(i)
            pred.append(keeper if status != STATUS_ERROR else None)
            values = (run_id, e.path, e.size, _utc(e.mtime_ns), sha, status, error,
                      g.duplicate_of if g else None, g.kind if g else None, g.group if g else None)
            for name, value in zip(cols, values):
                cols[name].append(value)
        facts = content.select(list(FACT_COLUMNS)).take(pa.array(own, pa.int64()))
        preds = content.select(list(PREDICTION_COLUMNS)).take(pa.array(pred, pa.int64()))
        labels = preds[Col.LABEL].to_pylist()
        arrays = {**cols, **{c: facts[c] for c in FACT_COLUMNS}, **{c: preds[c] for c in PREDICTION_COLUMNS},
                  Col.MODEL: [model.name] * len(chunk), Col.MODEL_FINGERPRINT: [model.fingerprint] * len(chunk)}
        for c in SPECIES_COLUMNS:
            arrays[c] = [species.get(label, {}).get(c) if label else None for label in labels]
        yield from pa.Table.from_pydict({f.name: arrays[f.name] for f in schema}, schema=schema).to_batches()


def _utc(mtime_ns: int | None) -> datetime | None:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc) if mtime_ns is not None else None


def _summarise(run_id, rows_file, files, cfg, model, runtime, inferred, reused, infer_seconds, t0,
               started) -> RunSummary:
    """Counts are read back from the committed rows file, so the summary always matches it."""
    import pyarrow.parquet as pq

    table = pq.read_table(rows_file, columns=[Col.PATH, Col.STATUS, Col.ERROR, Col.DUPLICATE_GROUP])
    statuses = table[Col.STATUS].to_pylist()
    errors = [{"path": p, "error": err} for p, s, err in zip(table[Col.PATH].to_pylist(), statuses,
                                                           table[Col.ERROR].to_pylist()) if s == STATUS_ERROR]
    return RunSummary(
        run_id=run_id, rows_file=str(rows_file), files=files,
        counts={s: statuses.count(s) for s in (STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR)},
        inferred=inferred, reused=reused,
        duplicate_groups=len({g for g in table[Col.DUPLICATE_GROUP].to_pylist() if g is not None}),
        seconds=round(time.monotonic() - t0, 3),
        images_per_second=round(inferred / infer_seconds, 2) if inferred and infer_seconds > 0 else None,
        model={"name": model.name, "fingerprint": model.fingerprint, "arch": model.spec.arch,
               "classes": len(model.spec.labels)},
        runtime=runtime.describe(), config=cfg.to_dict(), started=started.isoformat(),
        finished=datetime.now(timezone.utc).isoformat(), errors=errors[:20])
