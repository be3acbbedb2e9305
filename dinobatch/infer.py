"""Batches in, predictions out: decode in DataLoader workers, run the model, post-process."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .decode import DecodeError, decode
from .model import LoadedModel, Preprocessing
from .scan import read_bytes
from .schema import Col

__all__ = ["WorkItem", "ContentResult", "ImageDataset", "predict", "model_input", "forward_with_features"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One unique content to decode and infer: the files that hold it and the sha256 they must have."""

    abspaths: tuple[str, ...]
    sha256: str


@dataclass
class ContentResult:
    """Facts, hashes and prediction for one content, or the reason it failed."""

    sha256: str
    error: str | None = None
    facts: dict[str, Any] | None = None  # format, width, height, mode, phash, dhash
    prediction: dict[str, Any] | None = None  # label, confidence, probs, margin, entropy, embedding
    changed: tuple[str, ...] = ()  # files whose bytes no longer match sha256 (changed during the run)


def model_input(image, prep: Preprocessing):
    """Resize the shorter side and centre-crop in one resampling step; uint8 CHW (normalised on device).

    Resampling only the source box that lands in the crop gives torchvision's resize-then-crop
    (within one grey level) without ever materialising the resized image, so a 300000x1 strip
    costs a crop's worth of memory, not gigabytes.
    """
    import torchvision.transforms.functional as F
    from PIL import Image

    w, h = image.size
    if w <= h:
        nw, nh = prep.resize, int(prep.resize * h / w)
    else:
        nw, nh = int(prep.resize * w / h), prep.resize
    c = prep.crop
    left, top = int(round((nw - c) / 2.0)), int(round((nh - c) / 2.0))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + c) * sx, (top + c) * sy)
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    return F.pil_to_tensor(image.resize((c, c), resample[prep.interpolation], box=box))


class ImageDataset:
    """Map-style dataset: item i is decoded once into facts, hashes and model input."""

    def __init__(self, items: Sequence[WorkItem], prep: Preprocessing):
        self.items = list(items)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        data, changed, read_error = None, [], None
        for path in item.abspaths:  # any copy with the right bytes will do
            try:
                candidate = read_bytes(path)
            except OSError as exc:
                read_error = f"cannot read file: {exc.strerror or exc}"
                continue
            if hashlib.sha256(candidate).hexdigest() == item.sha256:
                data = candidate
                break
            changed.append(path)
        record: dict[str, Any] = {"sha256": item.sha256, "error": None, "changed": tuple(changed)}
        if data is None:
            record["error"] = read_error or "file changed while dinobatch was reading it; the next run classifies it"
            return record
        try:
            dec = decode(data, min_side=self.prep.resize)
            record["tensor"] = model_input(dec.image, self.prep)
        except DecodeError as exc:
            record["error"] = str(exc)
            return record
        except Exception as exc:  # e.g. MemoryError on a hostile file: this file's row, not the run's end
            record["error"] = f"cannot prepare image for the model: {type(exc).__name__}: {exc}"
            return record
        record["facts"] = {Col.FORMAT: dec.format, Col.WIDTH: dec.width, Col.HEIGHT: dec.height,
                           Col.MODE: dec.mode, Col.PHASH: dec.phash, Col.DHASH: dec.dhash}
        return record


def collate(records: list[dict[str, Any]]):
    """Stack the tensors of decoded items; keep every record (failed ones too) in order."""
    import torch

    tensors = [r.pop("tensor") for r in records if r.get("error") is None]
    batch = torch.stack(tensors) if tensors else None
    return records, batch


def forward_with_features(module, x):
    """Logits and the penultimate (pooled) features of a torchvision ResNet in one pass."""
    import torch

    x = module.maxpool(module.relu(module.bn1(module.conv1(x))))
    x = module.layer4(module.layer3(module.layer2(module.layer1(x))))
    features = torch.flatten(module.avgpool(x), 1)
    return module.fc(features), features


def _postprocess(logits, features, labels: Sequence[str], temperature: float,
                 embeddings: bool) -> list[dict[str, Any] | str]:
    """Probabilities (temperature-scaled softmax), margin and entropy per row; a reason where not finite."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=1).cpu()  # one device-to-host copy per batch
    feats = features.float().cpu() if embeddings else None
    top_p, top_i = probs.topk(min(2, probs.shape[1]), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    finite = torch.isfinite(probs).all(dim=1).tolist()
    out: list[dict[str, Any] | str] = []
    for row, (p, i, ok) in enumerate(zip(top_p.tolist(), top_i.tolist(), finite)):
        if not ok:
            out.append("the model produced non-finite outputs (NaN or infinity) for this image")
            continue
        out.append({Col.LABEL: labels[i[0]], Col.CONFIDENCE: p[0], Col.PROBS: probs[row].tolist(),
                    Col.MARGIN: p[0] - p[1] if len(p) > 1 else p[0], Col.ENTROPY: float(entropy[row]),
                    Col.EMBEDDING: feats[row].tolist() if feats is not None else None})
    return out


def predict(model: LoadedModel, runtime, items: Sequence[WorkItem], *, batch_size: int, workers: int,
            embeddings: bool) -> Iterator[list[ContentResult]]:
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
        preds: list[dict[str, Any] | str] = []
        if batch is not None:
            with runtime.autocast():
                x = (runtime.to_device(batch).float() - mean) / std
                logits, features = forward_with_features(module, x)
            preds = _postprocess(logits, features, spec.labels, spec.temperature, embeddings)
        it = iter(preds)
        results = []
        for r in records:
            pred = next(it) if r["error"] is None else None
            error = pred if isinstance(pred, str) else r["error"]
            results.append(ContentResult(r["sha256"], error, r.get("facts") if error is None else None,
                                         None if error else pred, r["changed"]))
        yield results
