"""What the CPU offers the model (AMX, AVX-512 bf16 and VNNI), read from the kernel's CPU flags, without torch."""

from __future__ import annotations

import functools
from pathlib import Path

# The flags that decide how fast a lower precision runs on x86 (Linux /proc/cpuinfo names): AMX tiles do
# bf16 and int8 matrix products in hardware; AVX-512 bf16 and VNNI only convert or dot-product a vector at
# a time. The summary's process field lists those present.
FEATURES = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni")

CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def _flags() -> frozenset[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none: macOS, Windows, ARM)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # x86's name; ARM's "Features" lists none of FEATURES
            return frozenset(value.split())
    return frozenset()


def cpu_features() -> list[str]:
    """The FEATURES this machine's CPU has, in FEATURES' order: what a lower precision can use here."""
    flags = _flags()
    return [name for name in FEATURES if name in flags]


def has_amx_bf16() -> bool:
    """Whether bf16 matrix products run on AMX tiles: where --precision auto picks bf16 autocast on a CPU.

    Measured: an AMX Xeon ran ResNet50 at 89 img/s in bf16 against 36 in fp32 (issue 17). A CPU with
    avx512_bf16 but no AMX is left at fp32 by the issue's rule, although the development VM's AMD EPYC
    (family 26) ran bf16 about 2x faster too (docs/performance.md#cpu-precisions)."""
    return "amx_bf16" in _flags()
