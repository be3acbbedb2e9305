"""The commands' resolved configurations (ClassifyConfig, ScanConfig, TrainConfig: each field's default is
the one its option shows), the environment variables the CLI reads, and the TOML --config file that fills
every command's defaults (load_config_file). Torch- and numpy-free, so `dinobatch --help` can read it."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping

from dinobatch.dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, HASH_BITS
from dinobatch.engines import ENGINE_LOCAL, check_engine
from dinobatch.errors import ConfigError
from dinobatch.runtime.device import CUDA_MAX_BATCH_SIZE, INT8, PRECISIONS

if TYPE_CHECKING:
    from dinobatch.models.file import Preprocessing

__all__ = ["ClassifyConfig", "ScanConfig", "TrainConfig", "load_config_file", "MODEL_ENV", "CONFIG_ENV",
           "MAX_BATCH_SIZE"]

MODEL_ENV = "DINOBATCH_MODEL"
CONFIG_ENV = "DINOBATCH_CONFIG"
# Images per classify batch at most: twice the largest batch auto-sizing picks on CUDA. The batch's
# buffers are allocated up front, so -b 1000000000 ended in an ENOMEM traceback.
MAX_BATCH_SIZE = 2 * CUDA_MAX_BATCH_SIZE


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything a classify run depends on, after flags, environment and config file are merged."""

    folder: str
    out: str = "results"
    model: str = "imagenet"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: runtime.device.default_batch_size; the summary saves the size used
    workers: int | None = None  # None: chosen for the device (engines.local.decode_workers)
    top_k: int = 3
    embeddings: bool = False
    force: bool = False
    species: str | None = None
    phash_max: int = DEFAULT_PHASH_MAX
    dhash_max: int = DEFAULT_DHASH_MAX
    wait: float = 0.0  # seconds to wait for another run on the same --out before giving up
    compile: bool = False  # torch.compile the model (pays a compile once per run)
    gpu_decode: bool = True  # on CUDA, decode JPEGs on the GPU (nvjpeg)
    engine: str = ENGINE_LOCAL  # local | ray (engines.ENGINES): what schedules the stages
    address: str | None = None  # ray: the cluster to join (env RAY_ADDRESS); None: a local Ray for the run

    def __post_init__(self) -> None:
        check_engine(self.engine)  # an unknown engine, or ray without its extra, before any work
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.top_k < 1:
            raise ConfigError("top_k must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("workers must be 0 or more")
        if not (0 <= self.phash_max <= HASH_BITS and 0 <= self.dhash_max <= HASH_BITS):
            raise ConfigError(f"phash_max and dhash_max must be between 0 and {HASH_BITS}")
        if not (math.isfinite(self.wait) and self.wait >= 0):
            raise ConfigError(f"wait must be a finite number of seconds >= 0, got {self.wait}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScanConfig:
    """The resolved options of one scan."""

    folder: str
    output: str = "scan.parquet"
    workers: int | None = None  # None: every usable core; 0: hash in this process
    phash_max: int = DEFAULT_PHASH_MAX
    dhash_max: int = DEFAULT_DHASH_MAX
    engine: str = ENGINE_LOCAL  # as ClassifyConfig.engine
    address: str | None = None  # as ClassifyConfig.address

    def __post_init__(self) -> None:
        check_engine(self.engine)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are the seed's (batch 128, lr 0.01 x10 then 0.005 x1, level 2)."""

    manifest: str
    out: str
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | a dinobatch model file
    epochs: int = 10
    lr: float = 0.01
    final_epochs: int = 1
    final_lr: float | None = None  # None: half of lr
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment_level: int = 2
    freeze_backbone: bool = False
    image_size: int = 224
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # None: runtime.device.default_workers
    seed: int = 0

    def __post_init__(self) -> None:
        from dinobatch.models.file import ARCHS  # here: --help reads the defaults without these modules
        from dinobatch.training.augment import multiplier

        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.epochs < 0 or self.final_epochs < 0 or self.epochs + self.final_epochs < 1:
            raise ConfigError("training needs at least one epoch")
        if self.batch_size < 1 or self.lr <= 0 or self.image_size < 16:
            raise ConfigError("batch_size >= 1, lr > 0 and image_size >= 16 are required")
        if (self.final_lr is not None and self.final_lr <= 0) or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("final_lr > 0, 0 <= momentum < 1 and weight_decay >= 0 are required")
        multiplier(self.augment_level)  # validates the level
        if self.precision not in PRECISIONS:  # --precision's choices; a TrainConfig built otherwise is checked here
            why = " (int8 is an int8 model file's, which runs inference only)" if self.precision == INT8 else ""
            raise ConfigError(f"precision {self.precision!r} cannot train{why}; use one of {', '.join(PRECISIONS)}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of a 0-based epoch: lr, then final_lr for the final epochs."""
        return self.lr if epoch < self.epochs else (self.final_lr if self.final_lr is not None else self.lr / 2)

    def preprocessing(self) -> Preprocessing:
        """The model's resize and crop for this image size."""
        from dinobatch.models.file import Preprocessing

        return Preprocessing(resize=round(self.image_size * 256 / 224), crop=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | os.PathLike, section: str, allowed: Collection[str] | Mapping[str, str], *,
                     sections: Collection[str] = (), paths: Collection[str] = ("model", "out", "species"),
                     models: Collection[str] = ("model",)) -> dict[str, Any]:
    """The [section] table of a TOML file as {parameter: value}, so a command's --config can fill its defaults.

    `section` may be dotted ('model.import' is the [model.import] table); `sections` are the other
    tables the file may hold (every command's). `allowed` maps each key ('-' and '_' both accepted) to
    its parameter, or lists the parameters; unknown keys and tables are errors. Relative `paths` are
    made relative to the file, except `models` values that name a model rather than a file ('imagenet').
    The defaults of `paths` and `models` are classify's options."""
    data = _read_toml(path)
    known = {section, *sections}
    unknown = _unknown_tables(data, known)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    table: Any = data
    for part in section.split("."):
        table = table.get(part, {}) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    values = _parameters(path, section, table, allowed)
    base = Path(path).resolve().parent
    for key in paths:  # relative paths in a config file are relative to the file
        value = values.get(key)
        if not isinstance(value, str) or os.path.isabs(value) or key in models and _names_a_model(value):
            continue
        values[key] = str(base / value)
    return values


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file's contents; any way it cannot be read is a ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def _unknown_tables(data: dict[str, Any], known: set[str], prefix: str = "") -> list[str]:
    """Dotted names in data that are not a known table: [model.import] is known through [model]."""
    unknown = []
    for key, value in data.items():
        name = prefix + key
        if name in known:
            continue
        if isinstance(value, dict) and any(k.startswith(name + ".") for k in known):
            unknown += _unknown_tables(value, known, name + ".")
        else:
            unknown.append(name)
    return sorted(unknown)


def _parameters(path: str | os.PathLike, section: str, table: dict[str, Any],
                allowed: Collection[str] | Mapping[str, str]) -> dict[str, Any]:
    """{parameter: value} of a table whose keys may use '-' or '_'; a parameter set twice is an error."""
    names = allowed if isinstance(allowed, Mapping) else {name: name for name in allowed}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in table.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            # a parameter's own name is listed only where no option name spells it otherwise (json, not as_json)
            shown = sorted(k for k, v in names.items() if k != v or list(names.values()).count(v) == 1)
            raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; known: {', '.join(shown)}")
        if name in spelled:
            raise ConfigError(f"{path}: [{section}] sets {name} twice, as {spelled[name]!r} and {key!r}")
        out[name], spelled[name] = value, key
    return out


def _names_a_model(value: str) -> bool:
    """True for a model reference that is a name, not a file: 'imagenet', 'imagenet:NAME', or train's 'none'."""
    from dinobatch.models.file import imagenet_weights_name

    return value == "none" or imagenet_weights_name(value) is not None
