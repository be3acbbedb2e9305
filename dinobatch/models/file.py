"""The dinobatch model file: architecture, labels, preprocessing, weights and provenance.

A model file is a ``torch.save`` of a plain dict (loaded back with ``weights_only=True``, so no
code in the file ever runs)::

    {"format": "dinobatch-model", "format_version": 1,
     "spec": "<JSON: arch, labels, preprocessing, source, temperature>",
     "state_dict": {parameter name: tensor}}

An int8 file (models.quantize) is format version 2: its spec adds precision "int8" and the
calibration's provenance, and its state_dict is the quantized module's (still tensors only).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shlex
import socket
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dinobatch.errors import ModelError
from dinobatch.models.diagnose import describe_not_torch, matching_archs, refused_global
from dinobatch.runtime.device import INT8

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INT8_FORMAT_VERSION",
    "PRECISION_FP32",
    "PRECISION_INT8",
    "ARCHS",
    "MAX_RESIZE",
    "MAX_CROP",
    "Preprocessing",
    "ModelSpec",
    "LoadedModel",
    "build_module",
    "save_model",
    "load_model",
    "import_state_dict",
    "read_labels",
    "load_imagenet",
    "imagenet_weights_name",
    "initial_module",
    "resolve_model",
    "file_sha256",
    "model_file_fingerprint",
    "imagenet_weights_member",
    "torch_save_atomic",
]

FORMAT = "dinobatch-model"
FORMAT_VERSION = 1
# int8 files are version 2, so that a dinobatch without int8 says "newer format version" instead of
# failing to fit quantized weights into an fp32 network; fp32 files stay version 1, byte for byte
INT8_FORMAT_VERSION = 2
PRECISION_FP32 = "fp32"
PRECISION_INT8 = INT8  # a file's precision field: the runtime's int8, one spelling (runtime.device.INT8)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
# Limits of a model's preprocessing. Images are decoded to a shorter side of at least `resize`, and
# each batch's `crop`x`crop` inputs are allocated up front: 12000 asked for 55 GB at the first batch.
MAX_RESIZE = 2048
MAX_CROP = 1024
_DOWNLOAD_TIMEOUT_S = 60
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes model input: resize the shorter side, centre-crop, normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ModelError(f"unknown interpolation {self.interpolation!r}; use one of {INTERPOLATIONS}")
        if not all(type(v) is int for v in (self.resize, self.crop)):
            raise ModelError(f"preprocessing needs whole numbers, got resize={self.resize!r} crop={self.crop!r}")
        if not (0 < self.crop <= self.resize and self.crop <= MAX_CROP and self.resize <= MAX_RESIZE):
            raise ModelError(f"preprocessing needs 0 < crop <= resize, crop <= {MAX_CROP} and resize <= "
                             f"{MAX_RESIZE}, got crop={self.crop} resize={self.resize}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(_finite_number(v) for v in values):
                raise ModelError(f"preprocessing {name} must be three finite numbers, got {list(values)}")
        if min(self.std) <= 0:
            raise ModelError(f"preprocessing std must be positive (it divides), got {list(self.std)}")


def _finite_number(value: Any) -> bool:
    """A real number from a spec's JSON (true and NaN are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model except its weights."""

    arch: str
    labels: tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    source: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # softmax temperature; 1.0 means uncalibrated
    precision: str = PRECISION_FP32  # int8: the weights are models.quantize's quantized module's
    calibration: dict[str, Any] | None = None  # int8: the images its activation ranges were measured on

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise ModelError(f"softmax temperature must be a positive number, got {self.temperature}")
        if self.precision not in (PRECISION_FP32, PRECISION_INT8):
            raise ModelError(f"unknown model precision {self.precision!r}; use {PRECISION_FP32} or {PRECISION_INT8}")

    def to_json(self) -> str:
        """Serialise for the model file; an fp32 spec is written without the int8 fields, as before them."""
        raw = asdict(self)
        if self.precision == PRECISION_FP32 and self.calibration is None:
            del raw["precision"], raw["calibration"]
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Parse the spec stored in a model file, with clear errors for missing fields."""
        try:
            raw = json.loads(text)
            prep = Preprocessing(**{**raw.get("preprocessing", {}),
                                    "mean": tuple(raw["preprocessing"]["mean"]),
                                    "std": tuple(raw["preprocessing"]["std"])})
            return cls(arch=raw["arch"], labels=tuple(raw["labels"]), preprocessing=prep,
                       source=dict(raw.get("source", {})), temperature=float(raw.get("temperature", 1.0)),
                       precision=str(raw.get("precision", PRECISION_FP32)), calibration=raw.get("calibration"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model file has an invalid spec: {exc}") from exc


@dataclass
class LoadedModel:
    """A ready-to-run model: spec, torch module (eval mode, CPU) and identity."""

    spec: ModelSpec
    module: Any  # torch.nn.Module; typed loosely so importing this module does not import torch
    fingerprint: str  # sha256 of the model file's bytes
    name: str

    def __reduce_ex__(self, protocol):
        """Pickled as usual, except an int8 model: its module (quantized modules in an FX graph) does not
        survive pickling, by which a Ray actor receives the model, so it travels as its state_dict and is
        rebuilt as load_model builds it."""
        if self.spec.precision != PRECISION_INT8:
            return super().__reduce_ex__(protocol)
        state = {k: v.detach() if hasattr(v, "detach") else v for k, v in self.module.state_dict().items()}
        return _int8_model, (self.spec, state, self.fingerprint, self.name)


def _int8_model(spec: ModelSpec, state_dict: dict, fingerprint: str, name: str) -> LoadedModel:
    """An int8 LoadedModel rebuilt from its state_dict (LoadedModel.__reduce_ex__)."""
    from dinobatch.models.quantize import int8_module

    return LoadedModel(spec, int8_module(spec, state_dict, name), fingerprint, name)


def build_module(arch: str, num_classes: int):
    """A randomly initialised torchvision ResNet-family network with num_classes outputs."""
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ModelError("a model needs at least one class label")
    import torchvision.models as tvm

    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file: the model fingerprint that keys incremental results."""
    from dinobatch.io.walk import sha256_file

    return sha256_file(str(path))


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, fsync, rename: a model or checkpoint is never half-written."""
    import torch

    from dinobatch.io.files import atomic_path

    with atomic_path(path, "write model file") as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def save_model(path: str | Path, spec: ModelSpec, state_dict: dict) -> str:
    """Write a model file atomically (temporary name, then rename); return its fingerprint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json(),
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}}
    torch_save_atomic(payload, path)
    return file_sha256(path)


def _read_model_bytes(path: Path) -> bytes:
    """A model file's bytes, or the ModelError that says why the path cannot be read as one or why its bytes
    are no PyTorch file (named before torch.load, whose errors on such bytes mislead)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelError(f"model file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"model path is a folder, not a file: {path}") from exc
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    what = describe_not_torch(data)
    if what is not None:
        raise ModelError(f"{path} is not a PyTorch file: {what}")
    return data


def model_file_fingerprint(path: str | Path) -> str:
    """A model file's fingerprint without loading it (nor importing torch), for a run with nothing to
    classify; a path that cannot be read, or whose bytes are not a PyTorch file, is refused as load_model
    refuses it."""
    return hashlib.sha256(_read_model_bytes(Path(path))).hexdigest()


def imagenet_weights_member(arch: str, weights_name: str = "DEFAULT"):
    """torchvision's weights enum member of that name for arch (nothing fetched), or the ModelError that
    lists the names it has."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        return enum.DEFAULT if weights_name == "DEFAULT" else enum[weights_name]
    except KeyError as exc:
        names = ", ".join(w.name for w in enum)
        raise ModelError(f"unknown {arch} weights {weights_name!r}; use one of: {names}") from exc


def _torch_load(path: Path) -> tuple[Any, str]:
    """The file's content (weights only, no code run) and the sha256 of exactly those bytes."""
    import pickle

    data = _read_model_bytes(path)  # read once: the fingerprint must describe the weights loaded
    import torch

    try:
        with warnings.catch_warnings():  # torch's own rebuild of an int8 file's quantized tensors warns
            warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return payload, hashlib.sha256(data).hexdigest()
    except pickle.UnpicklingError as exc:
        refused = refused_global(str(exc))
        if refused is None:
            raise ModelError(f"{path} is a damaged PyTorch file, or one this torch cannot read with "
                             f"weights_only: {_last_line(exc)}") from exc
        raise ModelError(f"{path} holds Python objects other than tensors ({refused}), which dinobatch "
                         f"refuses to unpickle (it could run code). Save a state_dict instead: "
                         f"torch.save(model.state_dict(), PATH)") from exc
    except Exception as exc:  # a damaged archive or pickle makes the loader fail in arbitrary ways
        raise ModelError(f"{path} is a damaged PyTorch file ({type(exc).__name__}: {_last_line(exc)})") from exc


def _last_line(exc: BaseException) -> str:
    """The informative line of torch's multi-paragraph load errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "documentation" not in line]
    return lines[-1][:300] if lines else type(exc).__name__


def _not_a_model_file(path: Path, payload: Any) -> ModelError:
    """Why a loaded file is not a dinobatch model, with the exact import command when it is a state_dict."""
    try:
        state_dict = _unwrap_state_dict(payload, str(path))
    except ModelError:
        kind = (f"a dict with keys {sorted(map(str, payload))[:5]}" if isinstance(payload, dict)
                else f"a {type(payload).__name__}")
        return ModelError(f"{path} is not a dinobatch model file nor a state_dict: it holds {kind}")
    archs = matching_archs(state_dict, ARCHS)
    if not archs:
        return ModelError(f"{path} is a plain state_dict, not a dinobatch model file, and its parameter names "
                          f"and shapes match none of the supported architectures ({', '.join(ARCHS)})")
    fc = state_dict.get("fc.weight")
    classes = f" with {fc.shape[0]} classes" if fc is not None else ""
    return ModelError(f"{path} is a plain state_dict of a torchvision {archs[0]}{classes}, not a dinobatch "
                      f"model file. To wrap it with its labels (one per line, in class order), run: "
                      f"dinobatch model import {shlex.quote(str(path))} --arch {archs[0]} --labels LABELS.txt --out MODEL")


def load_model(path: str | Path) -> LoadedModel:
    """Load a dinobatch model file without executing code from it."""
    path = Path(path)
    payload, fingerprint = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _not_a_model_file(path, payload)
    if payload.get("format_version") not in (FORMAT_VERSION, INT8_FORMAT_VERSION):
        raise ModelError(f"{path} has model format version {payload.get('format_version')!r}; "
                         f"this dinobatch reads versions {FORMAT_VERSION} and {INT8_FORMAT_VERSION}")
    spec = ModelSpec.from_json(str(payload.get("spec", "")))
    if spec.precision == PRECISION_INT8:
        from dinobatch.models.quantize import int8_module

        module = int8_module(spec, payload.get("state_dict"), str(path))
    else:
        module = _module_with_weights(spec.arch, spec.labels, payload.get("state_dict"), str(path))
    return LoadedModel(spec, module, fingerprint, path.name)


def _module_with_weights(arch: str, labels: tuple[str, ...], state_dict: Any, where: str):
    """Build arch and load the weights strictly, turning every mismatch into a readable error."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ModelError(f"{where}: no weights (state_dict) found")
    fc = state_dict.get("fc.weight")
    if fc is not None and fc.shape[0] != len(labels):
        raise ModelError(f"{where}: the classifier has {fc.shape[0]} outputs but {len(labels)} "
                         f"labels were given; the labels file must list one label per class, in order")
    import torch

    with torch.device("meta"):  # no random initialisation (0.4 s for a ResNet50): every tensor is loaded
        module = build_module(arch, len(labels))
    weights = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        module.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise ModelError(f"{where}: weights do not fit a torchvision {arch}: {detail}"
                         f"{_fits_instead(state_dict, arch)}") from exc
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise ModelError(f"{where}: weights do not fit a torchvision {arch}: some tensors were not loaded")
    return module.eval()


def _fits_instead(state_dict: dict, arch: str) -> str:
    """'. Its ... match X: use --arch X' when the weights fit another supported architecture."""
    others = [a for a in matching_archs(state_dict, ARCHS) if a != arch]
    return f". Its parameter names and shapes match {others[0]}: use --arch {others[0]}" if others else ""


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Class labels, one per line in class-index order; blank lines at the end are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels file {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    labels = tuple(line.strip() for line in lines)
    if not labels:
        raise ModelError(f"labels file {path} is empty")
    for number, label in enumerate(labels, 1):
        if not label:
            raise ModelError(f"labels file {path}, line {number}: blank label (class indices would shift)")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ModelError(f"labels file {path} repeats labels: {', '.join(dupes)}")
    return labels


def _unwrap_state_dict(obj: Any, where: str) -> dict:
    """Accept a bare state_dict or the usual checkpoint wrappers; strip DataParallel prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ModelError(f"{where} does not hold a state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def import_state_dict(state_dict_path: str | Path, *, arch: str, labels_path: str | Path,
                      out: str | Path, preprocessing: Preprocessing | None = None) -> LoadedModel:
    """Wrap a plain torchvision ResNet state_dict and its labels into a dinobatch model file."""
    labels = read_labels(labels_path)
    payload, source_sha = _torch_load(Path(state_dict_path))
    state_dict = _unwrap_state_dict(payload, str(state_dict_path))
    module = _module_with_weights(arch, labels, state_dict, str(state_dict_path))
    source = {"kind": "import", "state_dict": os.path.abspath(state_dict_path), "state_dict_sha256": source_sha}
    spec = ModelSpec(arch=arch, labels=labels, preprocessing=preprocessing or Preprocessing(), source=source)
    fingerprint = save_model(out, spec, module.state_dict())
    return LoadedModel(spec, module, fingerprint, Path(out).name)


def _imagenet_weights(arch: str, weights_name: str = "DEFAULT"):
    """torchvision's ImageNet weights enum member for arch, its state_dict (cache or download) and cache path."""
    import torch

    weights = imagenet_weights_member(arch, weights_name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return weights, _fetch_weights(weights, cached), cached


def load_imagenet(weights_name: str = "DEFAULT") -> LoadedModel:
    """torchvision's ResNet50 ImageNet weights through its own weights API and cache."""
    weights, state_dict, cached = _imagenet_weights("resnet50", weights_name)
    prep = weights.transforms()
    spec = ModelSpec(
        arch="resnet50", labels=tuple(weights.meta["categories"]),
        preprocessing=Preprocessing(resize=int(prep.resize_size[0]), crop=int(prep.crop_size[0]),
                                    mean=tuple(prep.mean), std=tuple(prep.std),
                                    interpolation=prep.interpolation.value),
        source={"kind": "torchvision", "weights": f"ResNet50_Weights.{weights.name}", "url": weights.url})
    module = _module_with_weights("resnet50", spec.labels, state_dict, str(cached))
    return LoadedModel(spec, module, file_sha256(cached), f"imagenet:{weights.name}")


def initial_module(arch: str, labels: tuple[str, ...], pretrained: str):
    """A network to fine-tune: 'none' (random), 'imagenet' (torchvision weights) or a model file;
    the classifier is replaced by a freshly initialised one when the classes differ."""
    import torch

    if pretrained == "none":
        return build_module(arch, len(labels)), {"pretrained": "none"}
    weights_name = imagenet_weights_name(pretrained)
    if weights_name is not None:
        weights, state_dict, _ = _imagenet_weights(arch, weights_name)
        module = build_module(arch, len(weights.meta["categories"]))
        module.load_state_dict(state_dict)
        start = {"pretrained": f"torchvision:{type(weights).__name__}.{weights.name}"}
    else:
        loaded = load_model(pretrained)
        if loaded.spec.precision == PRECISION_INT8:
            raise ModelError(f"--pretrained {pretrained} is an int8 model, which cannot be trained; start from "
                             f"the fp32 model it was quantized from ({loaded.spec.source.get('model', '?')})")
        if loaded.spec.arch != arch:
            raise ModelError(f"--pretrained {pretrained} is a {loaded.spec.arch}, but --arch is {arch}")
        module = loaded.module
        start = {"pretrained": loaded.name, "pretrained_fingerprint": loaded.fingerprint}
        if loaded.spec.labels == labels:
            return module, start
    module.fc = torch.nn.Linear(module.fc.in_features, len(labels))
    return module, start


def _fetch_weights(weights: Any, cached: Path) -> dict:
    """Load from torchvision's cache, downloading (hash-checked) only when it is missing."""
    try:
        if not cached.exists():
            _download(weights.url, cached)
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)  # now a cache hit
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"cannot get torchvision's ImageNet weights {type(weights).__name__}.{weights.name}: {exc}. "
            f"They are not in the cache at {cached} and could not be downloaded from {weights.url} "
            f"(offline?). Either copy that file to {cached} (TORCH_HOME moves the cache), or use a "
            f"dinobatch model file instead: --model FILE for classify (see 'dinobatch model import'), "
            f"--pretrained none or --pretrained FILE for train.") from exc


def _download(url: str, cached: Path) -> None:
    """torch.hub's download, hash-checked, announced through logging: torch.hub's own path writes
    'Downloading: ...' on stdout, which would corrupt --json output."""
    import torch.hub

    cached.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(cached.name)
    logger.info("downloading %s to %s", url, cached)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen has no timeout of its own
    try:
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=False)
    finally:
        socket.setdefaulttimeout(previous)


def resolve_model(ref: str) -> LoadedModel:
    """'imagenet', 'imagenet:<WEIGHTS_NAME>' or a path to a dinobatch model file."""
    weights_name = imagenet_weights_name(ref)
    return load_model(ref) if weights_name is None else load_imagenet(weights_name)


def imagenet_weights_name(ref: str) -> str | None:
    """The torchvision weights a model reference names ('imagenet' is 'DEFAULT', 'imagenet:NAME' is NAME),
    or None when it is a file: the one place that reads the 'imagenet' spelling."""
    if ref == "imagenet" or ref.startswith("imagenet:"):
        return ref.partition(":")[2] or "DEFAULT"
    return None
