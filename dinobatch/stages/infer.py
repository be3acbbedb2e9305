"""Stage infer: model inputs in, one prediction per content out (label, probabilities, margin, entropy,
embedding), or the reason there is none."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dinobatch.models.file import LoadedModel
from dinobatch.models.forward import compiled, forward_with_features
from dinobatch.runtime.device import Runtime, default_batch_size
from dinobatch.schema import PREDICTION_FIELDS, Col

__all__ = ["ContentResult", "Predictor", "NON_FINITE", "PREDICTED_SCHEMA", "postprocess", "predictions_table",
           "content_results"]

log = logging.getLogger(__name__)

NON_FINITE = "the model produced non-finite outputs (NaN or infinity) for this image"
PREDICTED_SCHEMA = pa.schema([pa.field(Col.ERROR, pa.string()), *PREDICTION_FIELDS])


@dataclass
class ContentResult:
    """Facts, hashes and prediction for one content, or the reason it failed."""

    sha256: str
    error: str | None = None
    facts: dict[str, Any] | None = None  # format, width, height, mode, phash, dhash
    prediction: dict[str, Any] | None = None  # label, confidence, probs, margin, entropy, embedding
    changed: tuple[str, ...] = ()  # files whose bytes no longer match sha256 (changed during the run)


class Predictor:
    """The infer stage's state, built once per process that runs it: the model on its device in eval
    mode, the normalisation there, the forward pass (compiled or not) and the batch size it is sized for.

    batch_size None: runtime.device.default_batch_size decides (on CUDA, by trying the model)."""

    def __init__(self, model: LoadedModel, runtime: Runtime, *, batch_size: int | None, embeddings: bool,
                 compile: bool = False):
        import torch

        spec = model.spec
        self.runtime, self.embeddings, self.preprocessing = runtime, embeddings, spec.preprocessing
        self.labels, self.temperature = spec.labels, spec.temperature
        self.module = runtime.prepare(model.module)
        self.batch_size = batch_size or default_batch_size(runtime, module=self.module,
                                                           crop=spec.preprocessing.crop)
        if batch_size is None:
            log.info("batch size %d", self.batch_size)
        self._forward = (compiled(self.module, self.batch_size) if compile
                         else functools.partial(forward_with_features, self.module))
        self._mean = torch.tensor(spec.preprocessing.mean, device=runtime.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(spec.preprocessing.std, device=runtime.device).view(1, 3, 1, 1) * 255

    def __call__(self, x) -> list[dict[str, Any] | str]:
        """One prediction per row of x (uint8 NCHW on the device), or NON_FINITE for that row."""
        import torch

        with self.runtime.autocast():
            logits, features = self._forward(x.to(torch.float32, copy=True).sub_(self._mean).div_(self._std))
        return postprocess(logits, features, self.labels, self.temperature, self.embeddings)

    def table(self, pixels: np.ndarray) -> pa.Table:
        """The batch form: uint8 NHWC pixels (decode_batch's) in, a PREDICTED_SCHEMA table out, row for row."""
        import torch

        if not len(pixels):
            return PREDICTED_SCHEMA.empty_table()
        return predictions_table(self(self.runtime.to_device(torch.from_numpy(pixels).permute(0, 3, 1, 2))))


def postprocess(logits, features, labels: Sequence[str], temperature: float,
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
            out.append(NON_FINITE)
            continue
        out.append({Col.LABEL: labels[i[0]], Col.CONFIDENCE: p[0], Col.PROBS: probs[row].tolist(),
                    Col.MARGIN: p[0] - p[1] if len(p) > 1 else p[0], Col.ENTROPY: float(entropy[row]),
                    Col.EMBEDDING: feats[row].tolist() if feats is not None else None})
    return out


def predictions_table(preds: Sequence[dict[str, Any] | str]) -> pa.Table:
    """postprocess's output as a PREDICTED_SCHEMA table: a reason in error, or the prediction's columns."""
    rows = [{Col.ERROR: p} if isinstance(p, str) else p for p in preds]
    return pa.Table.from_pylist(rows, schema=PREDICTED_SCHEMA)


def content_results(records: Sequence[dict[str, Any]], preds: Sequence[dict[str, Any] | str]
                    ) -> list[ContentResult]:
    """Decode records (decode_item's) joined with the predictions of those without an error, in order."""
    it = iter(preds)
    results = []
    for r in records:
        pred = next(it) if r["error"] is None else None
        error = pred if isinstance(pred, str) else r["error"]
        results.append(ContentResult(r["sha256"], error, r.get("facts") if error is None else None,
                                     None if error else pred, r["changed"]))
    return results
