"""Static int8 post-training quantization of a model file, and the int8 model file's module.

The one path: torch.ao's FX graph mode (prepare_fx / convert_fx) with the x86 backend's default
qconfig mapping, over a wrapper whose forward is models.forward.forward_with_features, so the
quantized graph returns logits and the pooled features (similar's embeddings) as the fp32 model
does. It quantizes every architecture of models.file.ARCHS. Its successor, torchao's PT2E
X86InductorQuantizer (torchao 0.18, not a dependency), failed to annotate torchvision's ResNet50
("Input partition has more than one output node"), so torch's deprecation notices for this API are
silenced here and the choice is explained in docs/models.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dinobatch.errors import InputError, ModelError
from dinobatch.models.file import (
    ARCHS,
    FORMAT,
    INT8_FORMAT_VERSION,
    PRECISION_INT8,
    LoadedModel,
    ModelSpec,
    build_module,
    file_sha256,
    resolve_model,
    torch_save_atomic,
)

__all__ = ["CALIBRATION_IMAGES", "BACKEND", "RETURNS_FEATURES", "Calibration", "quantize", "int8_module",
           "calibration_set", "calibration_pixels", "quantize_file", "save_int8"]

log = logging.getLogger(__name__)

# Images whose activation ranges set the int8 scales: a few hundred is the usual advice for static
# PTQ (histogram observers converge well before that); more costs calibration time and no accuracy.
CALIBRATION_IMAGES = 256
BACKEND = "x86"  # fbgemm's successor: VNNI/AMX int8 kernels where the CPU has them
RETURNS_FEATURES = "dinobatch_returns_features"  # the attribute forward_with_features checks
_CALIBRATION_BATCH = 32
_DIGEST_NOTE = "sha256 of the selected contents' hex sha256s, sorted, one per line"


@contextlib.contextmanager
def _quiet_ao() -> Iterator[None]:
    """torch.ao's FX quantization warns, at each call, that it is deprecated (and that its quantized
    tensors are); the choice is deliberate (module docstring), so those notices are not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*must run observer before calling calculate_qparams.*")
        warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
        yield


def _prepared(module, crop: int):
    """The fp32 network wrapped to return (logits, features), fused and observed (prepare_fx)."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    from dinobatch.models.forward import forward_with_features

    class _WithFeatures(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return forward_with_features(self.net, x)

    example = (torch.zeros(1, 3, crop, crop),)
    try:
        return prepare_fx(_WithFeatures(module.eval()), get_default_qconfig_mapping(BACKEND), example_inputs=example)
    except Exception as exc:  # symbolic tracing fails in many ways on a network it cannot follow
        raise ModelError(f"this network cannot be quantized by FX graph mode: {type(exc).__name__}: {exc}") from exc


def _converted(prepared):
    """convert_fx, marked so that models.forward calls it for (logits, features)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    module = convert_fx(prepared).eval()
    setattr(module, RETURNS_FEATURES, True)
    return module


def quantize(loaded: LoadedModel, pixels: np.ndarray):
    """The int8 module of an fp32 model, its activation ranges measured on pixels (uint8 NHWC, the
    model's own crop, as decode_batch gives them); deterministic for the same weights and pixels."""
    import torch

    if loaded.spec.precision == PRECISION_INT8:
        raise ModelError(f"{loaded.name} is already an int8 model; quantize the fp32 model it came from")
    if not len(pixels):
        raise InputError("no calibration images: int8 scales need at least one image the model can read")
    prep = loaded.spec.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1) * 255  # as stages.infer.Predictor normalises
    std = torch.tensor(prep.std).view(1, 3, 1, 1) * 255
    with _quiet_ao(), torch.inference_mode():
        prepared = _prepared(loaded.module, prep.crop)
        for lo in range(0, len(pixels), _CALIBRATION_BATCH):
            x = torch.from_numpy(pixels[lo:lo + _CALIBRATION_BATCH]).permute(0, 3, 1, 2).float()
            prepared(x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last))
        return _converted(prepared)


def int8_module(spec: ModelSpec, state_dict: Any, where: str):
    """The int8 file's module: the fp32 network rebuilt, prepared and converted with the same qconfig
    on an example input, then the stored quantized weights and scales loaded into it (strictly)."""
    import torch

    if spec.arch not in ARCHS:
        raise ModelError(f"{where}: unknown architecture {spec.arch!r}; supported: {', '.join(ARCHS)}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise ModelError(f"{where}: no weights (state_dict) found")
    with torch.device("meta"):  # no random initialisation: every tensor is replaced by the file's
        net = build_module(spec.arch, len(spec.labels))
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for t in (*net.parameters(), *net.buffers()):
            t.zero_()  # defined values for the observers that convert_fx reads (then overwritten)
    with _quiet_ao():
        module = _converted(_prepared(net, spec.preprocessing.crop))
        weights = OrderedDict(state_dict)
        # the quantized modules read their state's layout version from the metadata that torch.save of
        # a plain dict drops; the module just converted has this torch's, the one that wrote the weights' kind
        weights._metadata = module.state_dict()._metadata  # type: ignore[attr-defined]
        try:
            module.load_state_dict(weights, strict=True)
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            detail = " ".join(str(exc).strip().splitlines()[:3])
            raise ModelError(f"{where}: int8 weights do not fit a quantized torchvision {spec.arch}: {detail}") from exc
    return module


@dataclass(frozen=True)
class Calibration:
    """The calibration images chosen: (sha256, file) in the order used, and where they came from."""

    items: tuple[tuple[str, str], ...]
    source: str  # the manifest or folder, absolute
    kind: str  # manifest | folder
    split: str | None  # a manifest's split used (train)


def calibration_set(source: str | os.PathLike, *, split: str = "train") -> Calibration:
    """Every candidate image of a manifest's split (or of a folder), one per content, sorted by
    sha256: a choice independent of file names and order, which spreads over the classes."""
    from dinobatch.schema import Col

    path = Path(source)
    if path.is_dir():
        from dinobatch.io.walk import check_folder, sha256_file, walk_table

        files = walk_table(check_folder(path))
        ok = [os.fsdecode(p) for p, e in zip(files[Col.ABSPATH].to_pylist(), files[Col.ERROR].to_pylist())
              if e is None]
        by_sha = {sha256_file(p): p for p in sorted(ok, reverse=True)}  # the first name of a content wins
        if not by_sha:
            raise InputError(f"{source} holds no files to calibrate on")
        return Calibration(tuple(sorted(by_sha.items())), str(path.resolve()), "folder", None)
    from dinobatch.training.manifest import load_manifest

    manifest = load_manifest(path)
    rows = manifest.rows(split)
    if not rows:
        raise InputError(f"{source} has no usable rows in split {split!r} to calibrate on")
    by_sha: dict[str, str] = {}
    for r in rows:
        by_sha.setdefault(r[Col.SHA256], manifest.abspath(r))
    return Calibration(tuple(sorted(by_sha.items())), str(path.resolve()), "manifest", split)


def calibration_pixels(calibration: Calibration, spec: ModelSpec, count: int) -> tuple[np.ndarray, list[str], int]:
    """The first `count` readable images of the set, decoded and cropped as classify does: pixels
    (uint8 NHWC), their sha256s, and how many unreadable ones were passed over."""
    import pyarrow as pa

    from dinobatch.schema import Col
    from dinobatch.stages.decode import ABSPATHS, decode_batch

    chosen, shas, skipped = [], [], 0
    items = list(calibration.items)
    while items and len(shas) < count:
        take, items = items[:count - len(shas)], items[count - len(shas):]
        table = pa.table({ABSPATHS: [[os.fsencode(p)] for _, p in take], Col.SHA256: [s for s, _ in take]})
        decoded, pixels = decode_batch(table, spec.preprocessing)
        ok = np.array([e is None for e in decoded.column(Col.ERROR).to_pylist()], bool)
        chosen.append(pixels[ok])
        shas += [s for (s, _), good in zip(take, ok) if good]
        skipped += int((~ok).sum())
    pixels = np.concatenate(chosen) if chosen else np.zeros((0, spec.preprocessing.crop, spec.preprocessing.crop, 3),
                                                            np.uint8)
    return pixels, shas, skipped


def quantize_file(model_ref: str, calibration: str | os.PathLike, out: str | os.PathLike, *,
                  count: int = CALIBRATION_IMAGES, split: str = "train") -> LoadedModel:
    """`dinobatch model quantize`: the int8 model file of an fp32 one, calibrated on `count` images."""
    if count < 1:
        raise InputError("--calibration-images must be at least 1")
    loaded = resolve_model(model_ref)
    chosen = calibration_set(calibration, split=split)
    pixels, shas, skipped = calibration_pixels(chosen, loaded.spec, count)
    log.info("calibrating on %d image(s) of %s (%d unreadable passed over)", len(shas), chosen.source, skipped)
    module = quantize(loaded, pixels)
    spec = replace(loaded.spec, precision=PRECISION_INT8, calibration=_provenance(chosen, shas, skipped, count),
                   source={"kind": "quantize", "model": _model_path(model_ref), "model_sha256": loaded.fingerprint,
                           "model_source": loaded.spec.source})
    fingerprint = save_int8(out, spec, module)
    return LoadedModel(spec, module, fingerprint, Path(out).name)


def _model_path(model_ref: str) -> str:
    """How the int8 file names the model it came from: a file's absolute path, or the 'imagenet' name."""
    from dinobatch.models.file import imagenet_weights_name

    return model_ref if imagenet_weights_name(model_ref) is not None else os.path.abspath(model_ref)


def _provenance(chosen: Calibration, shas: list[str], skipped: int, count: int) -> dict[str, Any]:
    """The calibration record an int8 file carries (model info shows it)."""
    digest = hashlib.sha256("".join(s + "\n" for s in sorted(shas)).encode()).hexdigest()
    return {"source": chosen.source, "kind": chosen.kind, "split": chosen.split, "images": len(shas),
            "requested": count, "unreadable_skipped": skipped, "selection": "lowest content sha256 first",
            "sha256_digest": digest, "digest_of": _DIGEST_NOTE, "backend": BACKEND,
            "method": "static post-training quantization, torch.ao FX graph mode",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_int8(path: str | os.PathLike, spec: ModelSpec, module) -> str:
    """Write an int8 model file (tensors, tuples and dtypes only: it loads with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() if hasattr(v, "detach") else v for k, v in module.state_dict().items()}
    torch_save_atomic({"format": FORMAT, "format_version": INT8_FORMAT_VERSION, "spec": spec.to_json(),
                       "state_dict": state}, path)
    return file_sha256(path)
