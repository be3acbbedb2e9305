"""Memory: the allocator's settings, memory handed back between stages, and the largest batch CUDA holds."""

from __future__ import annotations

import logging
import os
from typing import Any

from dinobatch.runtime.device import Runtime, usable_cores

log = logging.getLogger(__name__)

_INT_MAX = 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def fit_batch_size(module, runtime, crop: int, largest: int) -> int:
    """On CUDA, the largest power-of-two batch up to `largest` whose forward pass fits in memory."""
    import torch

    from dinobatch.models.forward import forward_with_features

    size = largest
    while size > 1:
        try:
            with runtime.autocast():
                x = torch.zeros(size, 3, crop, crop, device=runtime.device).contiguous(
                    memory_format=torch.channels_last)
                forward_with_features(module, x)
            torch.cuda.synchronize(runtime.device)
            return size
        except torch.cuda.OutOfMemoryError:
            size //= 2
        finally:
            torch.cuda.empty_cache()
    return 1


# DINOBATCH_MALLOC=system leaves glibc's allocator as the process found it.
MALLOC_ENV = "DINOBATCH_MALLOC"


def tune_process(runtime: Runtime) -> dict[str, Any]:
    """Process-wide settings that make inference fast; returns what was applied, for the summary.

    On CPU, glibc's default allocator returns every large tensor buffer to the kernel with munmap
    and maps it again for the next batch: a third of ResNet50's CPU time went to page faults
    (measured: docs/performance.md). Keeping freed memory in the heap (no mmap for large blocks,
    no trimming) removes them; the same as GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
    glibc.malloc.trim_threshold=..., but applied at run time, so no wrapper script is needed.
    Forked decode workers inherit it. Torch's threads are set to the cores this process may use. On CPU
    it also records the CPU's features (runtime.cpu), and wherever --precision auto ran, why it chose."""
    import torch

    applied: dict[str, Any] = {"allocator": _tune_allocator() if runtime.device.type == "cpu" else "system"}
    if runtime.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cores())
    applied["threads"] = torch.get_num_threads()
    applied["channels_last"] = True  # Runtime.prepare and to_device
    applied["torch"] = torch.__version__
    if runtime.device.type == "cpu":
        from dinobatch.runtime.cpu import cpu_features

        applied["cpu_features"] = cpu_features()  # what bf16 and int8 can use here (AMX, AVX-512 bf16, VNNI)
    return with_precision(applied, runtime)


def untuned_process(why: str, last: dict[str, Any] | None = None) -> dict[str, Any]:
    """The process field of a classify run that imports no torch (an unchanged rerun, a folder with nothing to
    classify): tune_process's keys, with what applied (the allocator as found, no channels-last tensors), the
    threads a model would run on here by tune_process's rule (computed without torch, so that monitoring sees
    a changed cpuset), the CPU's features and why auto chose the precision where the last run (whose runtime
    stands) recorded them, and in 'torch' why torch was not imported."""
    process: dict[str, Any] = {"allocator": "system", "threads": _threads(), "channels_last": False}
    if last and "cpu_features" in last:
        from dinobatch.runtime.cpu import cpu_features

        process["cpu_features"] = cpu_features()
    if last and "precision_auto" in last:
        process["precision_auto"] = last["precision_auto"]
    return {**process, "torch": f"not imported: {why}"}


def _threads() -> int:
    """torch's threads as tune_process leaves them on a CPU: OMP_NUM_THREADS where it is a positive whole
    number (torch takes it), else the cores this process may use."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else usable_cores()


def with_precision(process: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """The summary's process field with runtime's precision_auto: why --precision auto ran at this precision
    (e.g. "fp32 (no amx_bf16)"), none where it was asked for. The model's runtime may not be the one tuned
    (an int8 file runs in int8 whatever auto chose), so the job records the one that ran."""
    process = {k: v for k, v in process.items() if k != "precision_auto"}
    return process if runtime.auto is None else {**process, "precision_auto": runtime.auto}


def retuned(process: dict[str, Any], tuned: Runtime, runtime: Runtime) -> dict[str, Any]:
    """The summary's process field once the model's runtime is known: tune_process's settings again where the
    model moved to another device (an int8 file that --device auto put on the CPU), else with its precision."""
    return tune_process(runtime) if runtime.device != tuned.device else with_precision(process, runtime)


def _tune_allocator() -> str:
    """Keep freed memory in glibc's heap (see tune_process); 'system' where not glibc or opted out."""
    if os.environ.get(MALLOC_ENV, "").lower() == "system":
        return "system"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"  # the operator tuned it already: theirs wins
    libc = _glibc()
    if libc is None:
        return "system"
    if not (libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1):
        log.debug("mallopt refused the allocator settings; keeping the defaults")
        return "system"
    return "glibc: mmap_max=0, trim_threshold=2GiB"


def release_memory() -> None:
    """Hand memory freed by the stage just finished back to the system, between stages of a job.

    tune_process keeps freed memory in glibc's heap (what makes the model fast), and Arrow's pool
    keeps its own; left there, each stage's temporaries would add to the next one's peak, so that
    peak memory grew with the folder. malloc_trim(0) returns the heap's free pages (its
    thresholds stay as they are for the batches to come); release_unused does it for Arrow."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (ctypes handle), else None: musl and macOS have no mallopt
    parameters or malloc_trim of glibc's kind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl and macOS have no such symbol
    except (OSError, AttributeError):
        return None
    return libc
