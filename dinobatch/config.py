"""Resolved run configuration: one frozen dataclass per command, and the TOML file that fills it."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinobatch.errors import ConfigError

__all__ = ["ClassifyConfig", "load_config_file", "MODEL_ENV", "CONFIG_ENV", "MAX_BATCH_SIZE"]

MODEL_ENV = "DINOBATCH_MODEL"
KNOWN_SECTIONS = ("classify",)  # one table per command that reads the file
CONFIG_ENV = "DINOBATCH_CONFIG"
# Images per classify batch at most: twice the largest batch auto-sizing picks on CUDA (512). The
# batch's buffers are allocated up front, so -b 1000000000 ended in an ENOMEM traceback.
MAX_BATCH_SIZE = 1024


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything a classify run depends on, after flags, environment and config file are merged."""

    folder: str
    out: str = "results"
    model: str = "imagenet"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: 32 on CPU, the largest that fits on CUDA
    workers: int | None = None  # None: chosen for the device (device.default_workers)
    top_k: int = 3
    embeddings: bool = False
    force: bool = False
    species: str | None = None
    phash_max: int = 8
    dhash_max: int = 3
    wait: float = 0.0  # seconds to wait for another run on the same --out before giving up
    compile: bool = False  # torch.compile the model (pays a compile once per run)
    gpu_decode: bool = True  # on CUDA, decode JPEGs on the GPU (nvjpeg)

    def __post_init__(self) -> None:
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.top_k < 1:
            raise ConfigError("top_k must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("workers must be 0 or more")
        if not (0 <= self.phash_max <= 64 and 0 <= self.dhash_max <= 64):
            raise ConfigError("phash_max and dhash_max must be between 0 and 64")
        if not (math.isfinite(self.wait) and self.wait >= 0):
            raise ConfigError(f"wait must be a finite number of seconds >= 0, got {self.wait}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | os.PathLike, section: str, allowed: set[str]) -> dict[str, Any]:
    """The [section] table of a TOML file, with '-' and '_' both accepted; unknown keys are errors."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    unknown_sections = sorted(set(data) - set(KNOWN_SECTIONS))
    if unknown_sections:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown_sections)}; "
                          f"known: {', '.join(KNOWN_SECTIONS)}")
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    out, spelled = {}, {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; known: {', '.join(sorted(allowed))}")
        if name in spelled:
            raise ConfigError(f"{path}: [{section}] sets {name} twice, as {spelled[name]!r} and {key!r}")
        out[name], spelled[name] = value, key
    base = Path(path).resolve().parent
    for key in ("model", "out", "species"):  # relative paths in a config file are relative to the file
        value = out.get(key)
        if not isinstance(value, str) or os.path.isabs(value):
            continue
        if key == "model" and (value == "imagenet" or value.startswith("imagenet:")):
            continue
        out[key] = str(base / value)
    return out
