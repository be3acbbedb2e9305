"""The Ray engine: classify's stages as Ray Data operators on a cluster (the `ray` extra). The driver hands
Ray the file table (listing stays on the driver: issue #40686); fingerprint and decode run in CPU tasks,
the model in an actor pool (a Predictor per actor, on a GPU where the cluster has them), and each batch
streams back to the job, which commits it to the cache as it does for the local engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.engines import Progress
from dinobatch.engines.ray_common import CRASHED, each_alone, map_blocks
from dinobatch.errors import DeviceError
from dinobatch.models.file import PRECISION_INT8, LoadedModel, Preprocessing
from dinobatch.schema import PREDICTION_FIELDS, Col
from dinobatch.stages.decode import ABSPATHS, CHANGED_PATHS, DECODED_SCHEMA, Contents, decode_batch
from dinobatch.stages.fingerprint import FINGERPRINT_SCHEMA, KNOWN_SHA256, fingerprint, with_known_shas
from dinobatch.stages.infer import PREDICTED_SCHEMA, InferredBatch, Predictor, cache_rows, predict_decoded

__all__ = ["RayEngine", "PIXELS"]

log = logging.getLogger(__name__)

PIXELS = "pixels"  # the model input between the decode tasks and the actors: uint8 NHWC (Ray's tensor column)
_ROW = "row"  # a file's place in the walk: blocks come back in any order, the rows go back in theirs
_PREDICT_ERROR = "predict_error"  # the infer stage's error beside the decode stage's in one block
_PREDICTED_NAMES = [_PREDICT_ERROR, *(f.name for f in PREDICTION_FIELDS)]  # PREDICTED_SCHEMA's, renamed
# Files per fingerprint task and contents per decode task: the local engine's progress step, and a few
# images per task so that a slow file holds up little while the per-task overhead (ms) stays small.
_FINGERPRINT_BLOCK = 512
_DECODE_BLOCK = 16
# CPUs a decode task and a model actor reserve: fractions, so an actor pool can never hold every CPU and
# starve the tasks that feed it (Ray issue #44687: ActorPoolStrategy(size=2) on 2 CPUs hung). Together
# one CPU: a node runs one actor (one thread, _Predict) and one decode task per CPU it has. The actor's
# share is over half a CPU so that two actors never fit on one CPU: Ray Data spreads its actors only as
# a preference, and with 0.25 it put both actors of a two-node cluster of one-CPU nodes on one node,
# leaving the other node's CPU to decode alone. Unequal on purpose: Ray Data fuses a task map into the
# next actor map when their resources are equal, and the actors would then decode too, between batches.
_TASK_CPUS = 0.25
_ACTOR_CPUS = 0.75


@dataclass
class RayEngine:
    """Runs classify's fingerprint and decode+infer stages on the Ray cluster this process is connected to
    (an engines.Engine; engines.open_engine connects)."""

    model: LoadedModel
    device: str = "auto"  # as asked (--device); the actors resolve it where they run
    precision: str = "auto"
    batch_size: int | None = None  # as asked (-b); None: the rule, where the actors run
    compile: bool = False
    progress: Progress | None = None
    ran: dict[str, Any] = field(default_factory=dict)  # what the actors ran on, for resolved()

    def fingerprint(self, files: pa.Table, index: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
        """sha256 and error of each walked file (aligned with files): the files the index does not vouch
        for are read in Ray tasks, a block of the file table each."""
        import ray

        columns = with_known_shas(files, index).append_column(_ROW, pa.array(np.arange(files.num_rows)))
        unread = pc.and_(columns[KNOWN_SHA256].is_null(), columns[Col.ERROR].is_null())
        known = columns.filter(pc.invert(unread))
        parts = [pa.table([pc.if_else(known[Col.ERROR].is_null(), known[KNOWN_SHA256], None), known[Col.ERROR],
                           known[_ROW]], schema=_FINGERPRINTED)]
        todo = columns.filter(unread)
        if todo.num_rows:
            ds = map_blocks(ray.data.from_arrow(_blocks(todo, _FINGERPRINT_BLOCK)), _fingerprint_block,
                            num_cpus=_TASK_CPUS)
            done = known.num_rows
            for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                parts.append(part)
                done += part.num_rows
                if self.progress:
                    self.progress("fingerprint", done, files.num_rows)
        table = pa.concat_tables(parts)
        table = table.take(pc.sort_indices(table[_ROW]))
        return table[Col.SHA256], table[Col.ERROR]

    def infer(self, contents: Contents, predictor: Predictor, *,
              jpeg_on_device: bool = False) -> Iterator[InferredBatch]:
        """One InferredBatch per batch the actors finish (failed contents too), in the order they finish;
        progress is reported once the job has taken (and committed) each batch. Decoding is always on
        the CPU tasks here (jpeg_on_device is the local engine's). Decode tasks that keep dying (a file
        that crashes its decoder) end the dataset; the contents not yet done are then decoded one task
        each (ray_common.each_alone), a content whose task dies every time an error row (CRASHED)."""
        if not len(contents):
            return
        import ray

        pool = self._pool(predictor)
        table, prep, done = contents.table(), predictor.preprocessing, set()
        decoded = map_blocks(ray.data.from_arrow(_blocks(table, _DECODE_BLOCK)), _decode_block,
                             fn_kwargs={"prep": prep}, num_cpus=_TASK_CPUS)
        try:
            yield from self._predicted(decoded, pool, predictor, done, len(contents))
        except ray.exceptions.RayError as exc:
            left = table.filter(pc.invert(pc.is_in(table[Col.SHA256], value_set=pa.array(list(done), pa.string()))))
            log.warning("decoding tasks kept dying (%s); decoding the %d contents left one task each",
                        type(exc).__name__, left.num_rows)
            alone = ray.data.from_arrow(_blocks(_decode_alone(ray, left, prep), _DECODE_BLOCK))
            yield from self._predicted(alone, pool, predictor, done, len(contents))

    def _predicted(self, decoded: Any, pool: _Pool, predictor: Predictor, done: set[str],
                   total: int) -> Iterator[InferredBatch]:
        """The decoded dataset through the model actors, each finished block as an InferredBatch; done
        collects the sha256 of the contents handed to the job."""
        import ray

        ds = decoded.map_batches(
            _Predict, fn_constructor_kwargs={"model": self.model, "device": pool.device,
                                             "precision": pool.precision, "batch_size": pool.batch_size,
                                             "embeddings": predictor.embeddings, "compile": self.compile},
            batch_size=pool.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=pool.actors, initial_size=pool.actors), num_cpus=_ACTOR_CPUS, num_gpus=pool.gpus)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch = _inferred(block)
            done.update(block[Col.SHA256].to_pylist())
            yield batch
            if self.progress:
                self.progress("infer", len(done), total)

    def resolved(self) -> dict[str, Any]:
        """The device, precision (and, once inferred, batch size) the actors ran with, for the run's saved
        configuration; before any inference, the device and precision as asked."""
        return dict(self.ran)

    def _pool(self, predictor: Predictor) -> _Pool:
        """The actor pool for this cluster: one actor per GPU where it has GPUs (unless --device cpu or an int8
        model, which runs on the CPU only: the job has refused --device cuda for one), else
        one per CPU, each with a fractional CPU; the batch size as asked, else the rule where they run."""
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        if self.device.startswith("cuda") and not gpus:
            raise DeviceError(f"--device {self.device} was asked for, but the Ray cluster has no GPU")
        if gpus and self.device != "cpu" and self.model.spec.precision != PRECISION_INT8:  # int8: CPU only
            ran, batch_size = ray.get(ray.remote(_probe).options(num_gpus=1).remote(
                self.model, self.precision, self.batch_size))
            pool = _Pool(device="cuda", actors=gpus, gpus=1, batch_size=batch_size, precision=ran["precision"])
        else:
            ran = _cpu_resolved(self.model, self.precision)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            told = self.precision if self.model.spec.precision == PRECISION_INT8 else ran["precision"]
            pool = _Pool(device="cpu", actors=max(1, cpus), gpus=0,
                         batch_size=self.batch_size or _cpu_batch_size(), precision=told)
        self.ran = {**ran, "batch_size": pool.batch_size}
        log.info("Ray: at most %d model actor(s) on %s, batches of %d", pool.actors, ran["device"], pool.batch_size)
        return pool


@dataclass(frozen=True)
class _Pool:
    """Where the model actors run and how many there may be."""

    device: str  # what the actors resolve: "cuda" (the GPU Ray gives each) or "cpu"
    actors: int
    gpus: int  # per actor
    batch_size: int
    # what every actor is told: the precision resolved once for the pool (auto on the driver's CPU, or on the
    # GPU the probe ran on), so that nodes with other CPU features never run, or record, another precision
    # than the run's configuration says; an int8 file's is as asked (its actors run it in int8)
    precision: str


def _cpu_batch_size() -> int:
    """The batch size rule's on a CPU (runtime.device.BATCH_SIZE_RULE)."""
    from dinobatch.runtime.device import CPU_BATCH_SIZE

    return CPU_BATCH_SIZE


def _cpu_resolved(model: LoadedModel, precision: str) -> dict[str, str]:
    """The device and precision the model runs at on a CPU, as the local engine resolves them (Runtime.for_model:
    an int8 file runs in int8, whatever auto picks)."""
    from dinobatch.runtime.device import resolve_runtime

    return resolve_runtime("cpu", precision).for_model(model.spec.precision, precision).resolved()


_FINGERPRINTED = pa.schema([*FINGERPRINT_SCHEMA, pa.field(_ROW, pa.int64())])


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """table cut into tables of rows rows: Ray Data makes each a block, the unit of a task."""
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _fingerprint_block(batch: pa.Table) -> pa.Table:
    """The fingerprint stage over a block, with each file's row number (explicit schema)."""
    return pa.Table.from_arrays([*fingerprint(batch).columns, batch[_ROW]], schema=_FINGERPRINTED)


def _decode_block(batch: pa.Table, prep: Preprocessing) -> pa.Table:
    """The decode stage over a block: decode_batch's table with its pixels as a tensor column."""
    from ray.data.extensions import ArrowTensorArray

    decoded, pixels = decode_batch(batch, prep)
    return decoded.append_column(PIXELS, ArrowTensorArray.from_numpy(pixels))


def _decode_alone(ray: Any, contents: pa.Table, prep: Preprocessing) -> pa.Table:
    """_decode_block over each content in a task of its own; a content whose task dies every time is a
    row with no pixels and the error CRASHED, as the local engine's crash-isolating pool makes it."""
    parts = []
    for one, table in each_alone(ray, _decode_block, contents, num_cpus=_TASK_CPUS, prep=prep):
        if table is None:
            log.warning("decoding %s: its Ray worker died every time",
                        os.fsdecode(one[ABSPATHS][0].as_py()[0]))
            table = _crashed(one, prep)
        parts.append(table)
    return pa.concat_tables(parts)


def _crashed(content: pa.Table, prep: Preprocessing) -> pa.Table:
    """_decode_block's row for a content whose decoder crashed: its sha256 and CRASHED, zero pixels."""
    from ray.data.extensions import ArrowTensorArray

    row = {f.name: pa.nulls(1, f.type) for f in DECODED_SCHEMA}
    row.update({Col.SHA256: content[Col.SHA256], Col.ERROR: pa.array([CRASHED]),
                CHANGED_PATHS: pa.array([[]], DECODED_SCHEMA.field(CHANGED_PATHS).type)})
    pixels = np.zeros((1, prep.crop, prep.crop, 3), np.uint8)
    return pa.table(row, schema=DECODED_SCHEMA).append_column(PIXELS, ArrowTensorArray.from_numpy(pixels))


class _Predict:
    """The infer stage in a Ray actor: one Predictor, built once, on the device Ray gave the actor."""

    def __init__(self, model: LoadedModel, device: str, precision: str, batch_size: int, embeddings: bool,
                 compile: bool):
        from dinobatch.runtime.device import resolve_runtime
        from dinobatch.runtime.memory import tune_process

        runtime = resolve_runtime(device, precision)
        tune_process(runtime)  # the local engine's process settings (on a CPU, the allocator: 2x here)
        if runtime.device.type == "cpu":
            _cpu_threads()  # then the threads: the CPUs Ray reserved, not every core of the node
        self.predictor = Predictor(model, runtime, batch_size=batch_size, embeddings=embeddings, compile=compile)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """decode's columns, then the prediction of each row without an error (nulls elsewhere)."""
        pixels = batch[PIXELS].combine_chunks().to_numpy()
        decoded = batch.drop_columns([PIXELS])
        predicted = predict_decoded(self.predictor, decoded, pixels)
        ok = np.flatnonzero(pc.is_null(decoded[Col.ERROR]).to_numpy(zero_copy_only=False))
        at = np.full(decoded.num_rows, -1, np.int64)
        at[ok] = np.arange(len(ok))
        aligned = predicted.take(pa.array(at, mask=at < 0))
        return pa.Table.from_arrays([*decoded.columns, *aligned.columns], schema=_JOINED)


def _cpu_threads() -> int:
    """Give torch in this Ray worker the whole CPUs Ray reserved for it, at least one, and return that:
    torch's default (every core of the machine, or the node's OMP_NUM_THREADS, which Ray leaves alone
    where set) lets each of a node's actors spread over all its cores, beside the decode tasks."""
    import math

    import ray
    import torch

    threads = max(1, math.floor(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
    torch.set_num_threads(threads)
    return threads


_JOINED = pa.schema([*DECODED_SCHEMA, *(f.with_name(n) for f, n in zip(PREDICTED_SCHEMA, _PREDICTED_NAMES))])


def _inferred(block: pa.Table) -> InferredBatch:
    """An actor's block as the job commits it (stages.infer.cache_rows over its two stages' tables)."""
    decoded = block.select(DECODED_SCHEMA.names)
    predicted = block.filter(pc.is_null(block[Col.ERROR])).select(_PREDICTED_NAMES)
    return cache_rows(decoded, predicted.rename_columns(PREDICTED_SCHEMA.names))


def _probe(model: LoadedModel, precision: str, batch_size: int | None) -> tuple[dict[str, str], int]:
    """On a GPU of the cluster: the precision resolved there and the batch size (as asked, else the rule's,
    sized by trying the model on that GPU). Run as a Ray task with one GPU (see RayEngine._pool)."""
    from dinobatch.runtime.device import default_batch_size, resolve_runtime

    runtime = resolve_runtime("cuda", precision)
    if batch_size is None:
        batch_size = default_batch_size(runtime, module=runtime.prepare(model.module),
                                        crop=model.spec.preprocessing.crop)
    return runtime.resolved(), batch_size
