"""The one place that knows about devices, precision, autocast and memory format."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from dinobatch.errors import DeviceError

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The precision of an int8 model file (models.quantize): not an autocast a --precision picks, but what
# such a file runs at; a run's saved configuration records it, and resolve_runtime takes it back.
INT8 = "int8"




@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: a resolved device and precision."""

    device: Any  # torch.device
    precision: str  # fp32 | bf16 | fp16 | int8 (an int8 model file's; never auto once resolved)
    auto: str | None = None  # why --precision auto resolved as it did, e.g. "bf16 (amx_bf16)"; None: asked for
    device_auto: bool = False  # --device auto chose the device (so for_model may choose the CPU instead)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory makes non-blocking host-to-GPU copies possible."""
        return self.is_cuda

    def describe(self) -> str:
        """Human-readable device and precision, for logs and summaries."""
        if self.is_cuda:
            import torch

            return f"{self.device} ({torch.cuda.get_device_name(self.device)}), {self.precision}"
        return f"{self.device}, {self.precision}"

    def resolved(self) -> dict[str, str]:
        """Device and precision as a run's saved configuration records them: what ran ("cpu",
        "cuda:0"; "fp32", "bf16", "fp16"), never "auto", and valid --device/--precision values."""
        device = str(self.device)
        if self.is_cuda and self.device.index is None:
            import torch

            device = f"cuda:{torch.cuda.current_device()}"
        return {"device": device, "precision": self.precision}

    def for_model(self, model_precision: str, asked: str = "auto") -> "Runtime":
        """The runtime a model file runs under: an int8 file runs its quantized CPU kernels, never silently
        in fp32, so --device auto chooses the CPU for it, and it is refused on CUDA asked for and with another
        precision asked for; an fp32 file never at int8."""
        if model_precision != INT8:
            if self.precision == INT8:
                raise DeviceError("precision int8 needs an int8 model file (dinobatch model quantize); this "
                                  "model is fp32: leave --precision auto")
            return self
        if self.is_cuda and self.device_auto:  # auto means choose: the one device an int8 file runs on
            import torch

            log.info("this is an int8 model file, which runs on the CPU only: --device auto chose the CPU, not %s",
                     self.device)
            return dataclasses.replace(self, device=torch.device("cpu")).for_model(model_precision, asked)
        if self.is_cuda:
            raise DeviceError(f"this is an int8 model file: it runs on the CPU only (torch's quantized x86 "
                              f"kernels have no CUDA version), and {self.device} was chosen. Use --device cpu, "
                              f"or the fp32 model it was quantized from on the GPU")
        if asked not in ("auto", INT8):
            raise DeviceError(f"this is an int8 model file: it runs in int8, not {asked}; leave --precision auto")
        return dataclasses.replace(self, precision=INT8, auto="int8 (an int8 model file)" if asked == "auto" else None)

    def prepare(self, module):
        """Move a model to the device in eval mode and channels-last layout (faster convolutions)."""
        import torch

        return module.to(self.device).eval().to(memory_format=torch.channels_last)

    def to_device(self, batch):
        """Copy a uint8 NCHW batch to the device (non-blocking from pinned memory)."""
        import torch

        return batch.to(self.device, non_blocking=self.pin_memory).contiguous(memory_format=torch.channels_last)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for the forward pass when a lower precision was resolved."""
        import torch

        if self.precision in ("fp32", INT8):  # an int8 graph quantizes its own input
            with torch.inference_mode():
                yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=dtype):
            yield


    @contextlib.contextmanager
    def train_autocast(self) -> Iterator[None]:
        """Mixed precision for a training step (gradients allowed), or nothing in fp32."""
        import torch

        if self.precision == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def grad_scaler(self):
        """A gradient scaler for fp16 on CUDA (bf16 and fp32 need none): a no-op when disabled."""
        import torch

        return torch.amp.GradScaler(self.device.type, enabled=self.is_cuda and self.precision == "fp16")


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve 'auto' choices; a device or precision asked for and missing is an error, never a fallback."""
    import torch

    dev, chosen = _resolve_device(device, torch), device == "auto"
    if precision == INT8:  # a saved configuration of an int8 model's run; Runtime.for_model checks the model
        return Runtime(dev, INT8, device_auto=chosen).for_model(INT8)
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    native_bf16 = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0)  # Ampere+
    if precision == "auto":
        precision, why = _auto_precision(dev.type, native_bf16)
        return Runtime(dev, precision, auto=f"{precision} ({why})", device_auto=chosen)
    if precision == "bf16" and dev.type == "cuda" and not native_bf16:
        raise DeviceError(f"{dev} has no native bf16 (compute capability < 8.0); use --precision fp16 or fp32")
    return Runtime(dev, precision, device_auto=chosen)


# What --precision auto picks, with the reason the summary records. On CPU, bf16 autocast where the CPU
# multiplies bf16 matrices on AMX tiles: an AMX Xeon ran ResNet50 2.5x faster in bf16 (issue 17). Elsewhere
# fp32, as the issue asks, although an EPYC with avx512_bf16 (no AMX) measured about 2x too
# (docs/performance.md#cpu-precisions): --precision bf16 opts in there.
AUTO_PRECISION_RULE = "bf16 autocast on CUDA (fp16 before compute capability 8.0) and on CPUs with AMX-BF16; else fp32"


def _auto_precision(device_type: str, native_bf16: bool) -> tuple[str, str]:
    """The precision auto resolves to on this device, and why (AUTO_PRECISION_RULE)."""
    if device_type == "cuda":
        return ("bf16", "compute capability >= 8.0") if native_bf16 else ("fp16", "compute capability < 8.0")
    from dinobatch.runtime.cpu import has_amx_bf16

    return ("bf16", "amx_bf16") if has_amx_bf16() else ("fp32", "no amx_bf16")


# On a GPU, classify is bound by decoding on the CPU. Measured on an H200 with 16 cores (2026-12-04,
# benchmarks/gpu.py, one run): 8 workers 607 img/s, 15 workers 926, 16 workers 928, the model alone
# 15,745. Past 16 each worker's memory (a few hundred MB) is spent for a gain nobody has measured.
CUDA_MAX_WORKERS = 16


# On CPU the model's threads need the other cores (train and sweep; classify, evaluate and similar decode in
# the burst pool unless -j is given: engines.local.decode_workers).
CPU_MAX_WORKERS = 4


def default_workers(device_type: str, requested: int | None) -> int:
    """Decode workers: as asked, else one per spare core (on CPU the model's threads need the rest)."""
    if requested is not None:
        return requested
    cores = usable_cores()
    if device_type == "cuda":
        return max(1, min(CUDA_MAX_WORKERS, cores - 1))
    return max(1, min(CPU_MAX_WORKERS, cores // 2))


# Images per batch when none is asked for (classify, evaluate, similar). On CPU a batch of 32
# already keeps every core's threads busy; on CUDA the largest power of two up to CUDA_MAX_BATCH_SIZE
# whose forward pass fits in the device's memory (runtime.memory.fit_batch_size tries them).
CPU_BATCH_SIZE = 32
CUDA_MAX_BATCH_SIZE = 512
BATCH_SIZE_RULE = f"{CPU_BATCH_SIZE} on CPU, the largest that fits (<= {CUDA_MAX_BATCH_SIZE}) on CUDA"


def default_batch_size(runtime: Runtime, *, module: Any = None, crop: int = 0) -> int:
    """The batch size when none is asked for (BATCH_SIZE_RULE); on CUDA it tries module, already on
    the device, at crop x crop, so both are required there."""
    if not runtime.is_cuda:
        return CPU_BATCH_SIZE
    if module is None or crop < 1:
        raise ValueError("on CUDA the batch size is sized by trying the model: pass module and crop")
    from dinobatch.runtime.memory import fit_batch_size  # memory imports this module

    return fit_batch_size(module, runtime, crop, largest=CUDA_MAX_BATCH_SIZE)


def _resolve_device(device: str, torch: Any):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was asked for, but CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use --device cpu or auto")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
