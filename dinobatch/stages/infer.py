"""Stage infer: model inputs in, one prediction per content out (label, probabilities, margin, entropy,
embedding), or the reason there is none."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinobatch.models.file import LoadedModel
from dinobatch.models.forward import compiled, forward_with_features
from dinobatch.runtime.dataset import Rec
from dinobatch.runtime.device import Runtime, default_batch_size
from dinobatch.schema import FACT_COLUMNS, PREDICTION_COLUMNS, PREDICTION_FIELDS, Col, cache_schema
from dinobatch.stages.decode import CHANGED_PATHS

__all__ = ["ContentResult", "InferredBatch", "Predictor", "NON_FINITE", "PREDICTED_SCHEMA", "postprocess",
           "predictions_table", "content_results", "inferred_batch", "predict_decoded", "cache_rows"]

log = logging.getLogger(__name__)

NON_FINITE = "the model produced non-finite outputs (NaN or infinity) for this image"
PREDICTED_SCHEMA = pa.schema([pa.field(Col.ERROR, pa.string()), *PREDICTION_FIELDS])


@dataclass
class ContentResult:
    """Facts, hashes and prediction for one content, or the reason it failed."""

    sha256: str
    error: str | None = None
    facts: dict[str, Any] | None = None  # format, width, height, mode, phash, dhash
    prediction: dict[str, Any] | None = None  # label, confidence, probs, margin, entropy, embedding, precision
    changed: tuple[str, ...] = ()  # files whose bytes no longer match sha256 (changed during the run)


@dataclass(frozen=True)
class InferredBatch:
    """One finished batch as an engine hands it to the job, which commits it: the cache rows
    (schema.cache_schema: sha256, facts, prediction) of the contents decoded and inferred, the reason
    each of the others failed (by sha256), and the files found changed while they were read."""

    rows: pa.Table
    failed: dict[str, str]
    changed: tuple[str, ...]

    def __len__(self) -> int:
        """The contents the batch accounts for, inferred or failed."""
        return self.rows.num_rows + len(self.failed)


class Predictor:
    """The infer stage's state, built once per process that runs it: the model on its device in eval
    mode, the normalisation there, the forward pass (compiled or not) and the batch size it is sized for.

    batch_size None: runtime.device.default_batch_size decides (on CUDA, by trying the model)."""

    def __init__(self, model: LoadedModel, runtime: Runtime, *, batch_size: int | None, embeddings: bool,
                 compile: bool = False):
        import torch

        spec = model.spec
        runtime = runtime.for_model(spec.precision)  # an int8 file: refused on CUDA, never run in fp32
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
        return postprocess(logits, features, self.labels, self.temperature, self.embeddings,
                           precision=self.runtime.precision)

    def table(self, pixels: np.ndarray) -> pa.Table:
        """The batch form: uint8 NHWC pixels (decode_batch's) in, a PREDICTED_SCHEMA table out, row for row."""
        import torch

        if not len(pixels):
            return PREDICTED_SCHEMA.empty_table()
        return predictions_table(self(self.runtime.to_device(torch.from_numpy(pixels).permute(0, 3, 1, 2))))


def postprocess(logits, features, labels: Sequence[str], temperature: float, embeddings: bool, *,
                precision: str) -> list[dict[str, Any] | str]:
    """Probabilities (temperature-scaled softmax), margin and entropy per row, with the precision the
    logits were computed at (the runtime's); a reason where not finite."""
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
                    Col.EMBEDDING: feats[row].tolist() if feats is not None else None, Col.PRECISION: precision})
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
        pred = next(it) if r[Rec.ERROR] is None else None
        error = pred if isinstance(pred, str) else r[Rec.ERROR]
        results.append(ContentResult(r[Rec.SHA256], error, r.get(Rec.FACTS) if error is None else None,
                                     None if error else pred, r[Rec.CHANGED]))
    return results


def inferred_batch(results: Sequence[ContentResult]) -> InferredBatch:
    """The record form (the local engine's ContentResults) as the job commits it."""
    rows = [{Col.SHA256: r.sha256, **r.facts, **r.prediction} for r in results if r.error is None]
    return InferredBatch(pa.Table.from_pylist(rows, schema=cache_schema()),
                         {r.sha256: r.error for r in results if r.error is not None},
                         tuple(p for r in results for p in r.changed))


def predict_decoded(predictor: Predictor, decoded: pa.Table, pixels: np.ndarray) -> pa.Table:
    """The infer stage over decode_batch's output: the rows without an error, in order and in one
    forward pass, as the local engine infers a batch (a PREDICTED_SCHEMA table, one row per such row)."""
    return predictor.table(pixels[_decoded_ok(decoded)])


def cache_rows(decoded: pa.Table, predicted: pa.Table) -> InferredBatch:
    """The batch form as the job commits it: decode_batch's table and predict_decoded's (one row per
    decoded row without an error) joined into cache rows, failures and changed files; value for
    value what inferred_batch makes of the local engine's ContentResults for the same contents."""
    ok = _decoded_ok(decoded)
    if predicted.num_rows != int(ok.sum()):
        raise ValueError(f"{predicted.num_rows} predictions for {int(ok.sum())} decoded rows without an error")
    inferred = decoded.filter(pa.array(ok))
    columns = [inferred[Col.SHA256], *(inferred[c] for c in FACT_COLUMNS), *(predicted[c] for c in PREDICTION_COLUMNS)]
    good = pc.is_null(predicted[Col.ERROR])
    rows = pa.Table.from_arrays(columns, schema=cache_schema()).filter(good)
    reasons = iter(predicted[Col.ERROR].to_pylist())
    failed = {}
    for sha, error in zip(decoded[Col.SHA256].to_pylist(), decoded[Col.ERROR].to_pylist()):
        error = next(reasons) if error is None else error
        if error is not None:
            failed[sha] = error
    changed = tuple(os.fsdecode(p) for paths in decoded[CHANGED_PATHS].to_pylist() for p in paths)
    return InferredBatch(rows, failed, changed)


def _decoded_ok(decoded: pa.Table) -> np.ndarray:
    """Which rows of decode_batch's table have a model input (no error)."""
    return pc.is_null(decoded[Col.ERROR]).to_numpy(zero_copy_only=False)
