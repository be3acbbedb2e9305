"""What both Ray engines (classify's engines.ray, scan's engines.ray_scan) share: joining a cluster for one
run (refused fast when nothing answers at the address), and the guarantee that a file whose decoder kills
its Ray worker is an error row, not a failed job: tasks retried a bounded number of times, then the files
not yet done redone one task each. Nothing here imports torch."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from typing import Any, Callable, Iterator

import pyarrow as pa

from dinobatch.engines import RAY_EXTRA
from dinobatch.errors import ConfigError
from dinobatch.runtime import faults

__all__ = ["CRASHED", "RETRIES", "FORWARDED", "CONNECT_TIMEOUT", "worker_config", "ray_module", "connected",
           "gcs_endpoint", "map_blocks", "each_alone"]

log = logging.getLogger(__name__)

RETRIES = 3  # a task whose worker or node died; Ray Data's default (-1) would retry a crashing decoder forever
# a file whose worker died with it twice (Ray does not say how the process died; the local engine's
# pool does: runtime.workers.died_reason)
CRASHED = "the image decoder crashed on this file (its Ray worker died); it was not decoded"
CONNECT_TIMEOUT = 10.0  # seconds a cluster's address has to accept a TCP connection before ray.init is tried
_CLIENT_PORT = 10001  # Ray Client's default port (ray://host without a port)
# The object-store client settings the driver hands its Ray workers: where the store is, which the
# driver's listing used and a node started earlier (ray start) cannot know. Never credentials: those
# come from each node's own environment or instance role, as for any AWS client (docs/cluster.md).
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_config(node_cpus: int) -> dict[str, int]:
    """The Ray system config a cluster for dinobatch should start with (a local Ray gets it; docs/cluster.md
    shows `ray start --system-config`): cap a node's worker processes, actors included, at two a CPU of the
    largest node. Ray's default cap, the node's CPUs, is filled by the model actors, so a decode task's worker
    idle for a second (held back while the actors catch up) is killed, and the next decode task pays a new
    worker's start and imports (about 1 s): measured on two one-CPU nodes, 5 s of a run's 60 s of CPU
    (docs/performance.md, Ray scaling)."""
    return {"num_workers_soft_limit": 2 * max(1, node_cpus)}


def ray_module() -> Any:
    """The ray package, or a clear error naming the extra that provides it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed: {RAY_EXTRA}") from exc
    return ray


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Ray for one run: join the cluster at address, or start a local Ray (address None), and leave (stop)
    it afterwards, so no process outlives the run. A connection the caller already made is theirs to end."""
    ray = ray_module()
    if ray.is_initialized():
        yield
        return
    _check_reachable(address)  # ray.init would wait minutes on an address where nothing listens
    # worker output stays on the nodes (the summary on stdout must stay valid JSON); failures still
    # come back as exceptions. "local": a new Ray even where RAY_ADDRESS names a cluster.
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        options["include_dashboard"] = False
        options["_system_config"] = worker_config(os.cpu_count() or 1)
    try:
        ray.init(address=address or "local", **options)
    except (ConnectionError, TimeoutError) as exc:  # a wrong --address or a cluster that is down: not a bug
        raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from exc
    try:
        _quiet_data()
        _errors_to_stderr()
        yield
    finally:
        ray.shutdown()


def gcs_endpoint(address: str | None) -> tuple[str, int] | None:
    """The host and port a cluster address names (host:port, [v6]:port, ray://host[:port]); None where
    Ray itself resolves it (None, "local", "auto") or there is no port to try."""
    if not address or address in ("local", "auto"):
        return None
    rest, client = (address[len("ray://"):], True) if address.startswith("ray://") else (address, False)
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port (or only a bracketed v6 host)
        host, port = rest, str(_CLIENT_PORT) if client else ""
    if not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str | None) -> None:
    """A ConfigError naming the address (and RAY_ADDRESS, where it often comes from) unless something
    accepts a TCP connection there within CONNECT_TIMEOUT seconds."""
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, (socket.timeout, TimeoutError)) else exc.strerror or str(exc)
        raise ConfigError(f"cannot join the Ray cluster at {address} (--address or RAY_ADDRESS): {reason} on "
                          f"{endpoint[0]}:{endpoint[1]} within {CONNECT_TIMEOUT:g} s; is the cluster up "
                          f"(ray status) and is this its head node's address?") from exc


def _errors_to_stderr() -> None:
    """Ray's driver prints the cluster's error messages (e.g. "A worker died...", after a crashing decoder)
    to stdout, which would break --json; they go to stderr instead. Ray has no option for it (2.60), so its
    printer is wrapped, once per process; where Ray's internals differ, nothing changes."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_dinobatch_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        printer({**data, "is_err": True}, ignore_prefix)

    to_stderr._dinobatch_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def _quiet_data() -> None:
    """Ray Data's progress bars off: the CLI reports progress as the job commits batches."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def map_blocks(ds: Any, fn: Callable[..., pa.Table], **kwargs: Any) -> Any:
    """ds.map_batches(fn) over whole blocks in Arrow, as CPU tasks retried at most RETRIES times (then the
    dataset fails and the caller redoes its files with each_alone), with the crash-test hooks."""
    with warnings.catch_warnings():  # max_retries has no other spelling in the pinned range (dinobatch[ray])
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, runtime_env=_worker_env(),
                              max_retries=RETRIES, **kwargs)


def each_alone(ray: Any, fn: Callable[..., pa.Table], rows: pa.Table, *, num_cpus: float,
               **fn_kwargs: Any) -> Iterator[tuple[pa.Table, pa.Table | None]]:
    """(row, fn(row)) for each row of rows, each in a Ray task of its own, retried once (a lost node);
    fn's table is None where the worker died both times: a file that crashes its decoder."""
    task = ray.remote(fn).options(num_cpus=num_cpus, max_retries=1, runtime_env=_worker_env())
    refs = [(rows.slice(k, 1), task.remote(rows.slice(k, 1), **fn_kwargs)) for k in range(rows.num_rows)]
    for one, ref in refs:
        try:
            yield one, ray.get(ref)
        except ray.exceptions.WorkerCrashedError:
            yield one, None


def _worker_env() -> dict[str, Any] | None:
    """What Ray's workers must share with the driver: where the object store is (FORWARDED, not secrets)
    and the crash-test hooks (runtime.faults), which reach the local engine's forked workers by
    inheritance; None where the driver has none of them (no runtime environment to set up)."""
    names = (*FORWARDED, faults.ENV, faults.FAIL_ENV)
    env = {name: os.environ[name] for name in names if name in os.environ}
    return {"env_vars": env} if env else None
