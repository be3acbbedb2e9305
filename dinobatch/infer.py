"""Batches in, predictions out: decode in DataLoader workers, run the model, post-process."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .decode import DecodeError, decode
from .model import LoadedModel, Preprocessing
from .scan import read_bytes

__all__ = ["WorkItem", "ContentResult", "ImageDataset", "predict", "model_input"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One unique content to decode and infer: where to read it and the sha256 it must have."""

    abspath: str
    sha256: str


@dataclass
class ContentResult:
    """Facts, hashes and prediction for one content, or the reason it failed."""

    sha256: str
    error: str | None = None
    facts: dict[str, Any] | None = None  # format, width, height, mode, phash, dhash
    prediction: dict[str, Any] | None = None  # label, confidence, topk_*, probs, margin, entropy, embedding


def model_input(image, prep: Preprocessing):
    """Resize the shorter side, centre-crop and return a uint8 CHW tensor (normalised later, on device)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    image = F.resize(image, prep.resize, interpolation=InterpolationMode(prep.interpolation), antialias=True)
    image = F.center_crop(image, [prep.crop, prep.crop])
    return F.pil_to_tensor(image)


class ImageDataset:
    """Map-style dataset: item i is decoded once into facts, hashes and model input."""

    def __init__(self, items: Sequence[WorkItem], prep: Preprocessing):
        self.items = list(items)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            data = read_bytes(item.abspath)
        except OSError as exc:
            return {"sha256": item.sha256, "error": f"cannot read file: {exc.strerror or exc}"}
        if hashlib.sha256(data).hexdigest() != item.sha256:
            return {"sha256": item.sha256, "error": "file changed while dinobatch was reading it; rerun"}
        try:
            dec = decode(data, min_side=self.prep.resize)
            tensor = model_input(dec.image, self.prep)
        except DecodeError as exc:
            return {"sha256": item.sha256, "error": str(exc)}
        facts = {"format": dec.format, "width": dec.width, "height": dec.height, "mode": dec.mode,
                 "phash": dec.phash, "dhash": dec.dhash}
        return {"sha256": item.sha256, "error": None, "facts": facts, "tensor": tensor}


def collate(records: list[dict[str, Any]]):
    """Stack the tensors of decoded items; keep every record (failed ones too) in order."""
    import torch

    tensors = [r.pop("tensor") for r in records if r.get("error") is None]
    batch = torch.stack(tensors) if tensors else None
    return records, batch


def _forward(module, x):
    """Logits and the penultimate (pooled) features of a torchvision ResNet in one pass."""
    import torch

    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    features = torch.flatten(module.avgpool(x), 1)
    return module.fc(features), features


def _postprocess(logits, features, labels: Sequence[str], top_k: int, temperature: float,
                 embeddings: bool) -> list[dict[str, Any]]:
    """Probabilities (temperature-scaled softmax), top-k, margin and entropy per row."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=1)
    k = min(max(top_k, 2), probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    out = []
    for row in range(probs.shape[0]):
        p, i = top_p[row].tolist(), top_i[row].tolist()
        out.append({
            "label": labels[i[0]], "confidence": p[0],
            "topk_labels": [labels[j] for j in i[:top_k]], "topk_probs": p[:top_k],
            "probs": probs[row].tolist(), "margin": p[0] - p[1] if len(p) > 1 else p[0],
            "entropy": float(entropy[row]),
            "embedding": features[row].float().tolist() if embeddings else None,
        })
    return out


def predict(model: LoadedModel, runtime, items: Sequence[WorkItem], *, batch_size: int, workers: int,
            top_k: int, embeddings: bool) -> Iterator[list[ContentResult]]:
    """Yield one list of ContentResult per batch, in input order; failed items are results too."""
    import torch
    from torch.utils.data import DataLoader

    if not items:
        return
    spec = model.spec
    module = runtime.prepare(model.module)
    mean = torch.tensor(spec.preprocessing.mean, device=runtime.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocessing.std, device=runtime.device).view(1, 3, 1, 1) * 255
    loader = DataLoader(ImageDataset(items, spec.preprocessing), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=runtime.pin_memory,
                        prefetch_factor=2 if workers > 0 else None)
    for records, batch in loader:
        preds: list[dict[str, Any]] = []
        if batch is not None:
            with runtime.autocast():
                x = (runtime.to_device(batch).float() - mean) / std
                logits, features = _forward(module, x)
            preds = _postprocess(logits, features, spec.labels, top_k, spec.temperature, embeddings)
        it = iter(preds)
        yield [ContentResult(r["sha256"], r["error"], r.get("facts"), None if r["error"] else next(it))
               for r in records]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
