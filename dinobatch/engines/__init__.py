"""Engines: schedulers that run the stages of dinobatch.stages (which process decodes, batching, retries
after a worker's death, progress). `Engine` is what a job asks of one, and nothing more; the local engine
runs the stages on this machine. See docs/architecture.md."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

    from dinobatch.runtime.device import Runtime
    from dinobatch.stages.decode import Contents
    from dinobatch.stages.infer import InferredBatch, Predictor

__all__ = ["Engine", "Progress", "local_engine"]

# progress(stage, done, total): stage is "fingerprint" or "infer" (evaluate reports its own)
Progress = Callable[[str, int, int], None]


class Engine(Protocol):
    """What the classify job asks of an engine: its two stages scheduled, and the settings it chose.
    The job keeps the lock, the run id, the cache (it commits each InferredBatch) and the summary."""

    def fingerprint(self, files: pa.Table, index: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
        """sha256 and error of each walked file (schema.walk_schema), aligned with files; index is the
        file index (stat -> sha256) of files that need not be read again."""
        ...

    def infer(self, contents: Contents, predictor: Predictor, *,
              jpeg_on_device: bool = False) -> Iterator[InferredBatch]:
        """Each content decoded and inferred, one InferredBatch per batch, in input order, failed
        contents too; progress is reported once the job has taken (and committed) each batch."""
        ...

    def resolved(self) -> dict[str, Any]:
        """The settings the engine chose that the run's saved configuration records (e.g. workers)."""
        ...


def local_engine(runtime: Runtime, *, workers: int | None, progress: Progress | None) -> Engine:
    """The engine a job runs on: the local one (this machine), chosen here and only here."""
    from dinobatch.engines.local import LocalEngine

    return LocalEngine(runtime, workers=workers, progress=progress)
