"""Engines: schedulers that run the stages of dinobatch.stages (which process decodes, batching, retries
after a worker's death, progress). `Engine` is what a job asks of one, and nothing more; the local engine
runs the stages on this machine, the Ray engine on a Ray cluster (the `ray` extra). See docs/architecture.md."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

    from dinobatch.config import ClassifyConfig
    from dinobatch.models.file import LoadedModel
    from dinobatch.runtime.device import Runtime
    from dinobatch.stages.decode import Contents
    from dinobatch.stages.infer import InferredBatch, Predictor

__all__ = ["Engine", "Progress", "ENGINES", "ENGINE_LOCAL", "ENGINE_RAY", "RAY_EXTRA", "check_engine", "open_engine",
           "local_engine"]

ENGINE_LOCAL, ENGINE_RAY = "local", "ray"
ENGINES = (ENGINE_LOCAL, ENGINE_RAY)  # --engine's choices, classify's and scan's
RAY_EXTRA = "pip install 'dinobatch[ray]'"  # what --engine ray needs, named in the error when it is missing

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
        """Each content decoded and inferred, one InferredBatch per batch, failed contents too, in any
        order (the local engine keeps input order, the Ray engine yields batches as they finish: the job
        commits each as it comes); progress is reported once the job has taken (and committed) each batch."""
        ...

    def resolved(self) -> dict[str, Any]:
        """The settings the engine chose that the run's saved configuration records (e.g. workers)."""
        ...


def local_engine(runtime: Runtime, *, workers: int | None, progress: Progress | None) -> Engine:
    """The local engine (this machine); open_engine chooses between it and the Ray engine."""
    from dinobatch.engines.local import LocalEngine

    return LocalEngine(runtime, workers=workers, progress=progress)


def check_engine(name: str) -> None:
    """Refuse an unknown engine, or the Ray engine where Ray Data is not installed, before any work is done
    (a ConfigError naming the extra). Looks the package up without importing it: --help stays light."""
    from dinobatch.errors import ConfigError

    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if name == ENGINE_RAY and not (_installed("ray") and _installed("ray.data")):
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed: {RAY_EXTRA}")


def _installed(module: str) -> bool:
    """Whether module can be imported (a parent set to None in sys.modules, as a test does, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # the parent missing, or present without a spec
        return False


def _log_ignored(cfg: ClassifyConfig) -> None:
    """One info line for the local engine's options that a Ray run ignores, where they were set."""
    ignored = []
    if cfg.workers is not None:
        ignored.append(f"-j/--workers {cfg.workers} (Ray schedules decode tasks on every CPU of the cluster)")
    if cfg.gpu_decode and cfg.device.startswith("cuda"):
        ignored.append("--gpu-decode (on Ray, images are decoded in CPU tasks)")
    if ignored:
        logging.getLogger(__name__).info("--engine ray ignores %s", "; ".join(ignored))


@contextlib.contextmanager
def open_engine(cfg: ClassifyConfig, runtime: Runtime, model: LoadedModel, *,
                progress: Progress | None) -> Iterator[Engine]:
    """The engine cfg.engine names, for the length of one classify run: the one place that chooses it.
    The Ray engine joins cfg.address (or starts a local Ray) here and leaves it (stops it) on the way out."""
    check_engine(cfg.engine)
    if cfg.engine == ENGINE_LOCAL:
        yield local_engine(runtime, workers=cfg.workers, progress=progress)
        return
    from dinobatch.engines.ray import RayEngine
    from dinobatch.engines.ray_common import connected

    _log_ignored(cfg)
    with connected(cfg.address):
        yield RayEngine(model, device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size,
                        compile=cfg.compile, progress=progress)
