"""Classification metrics and calibration: pure numpy functions over probabilities and labels."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["report", "expected_calibration_error", "fit_temperature", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def report(y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Loss, top-1, top-3, macro and micro F1, per-class precision/recall/F1/support, confusion matrix.

    Macro F1 averages the classes that occur in y_true or in the predictions (as scikit-learn does)."""
    y = np.asarray(y_true, dtype=np.int64)
    n, c = len(y), len(labels)
    if n == 0:
        return {"count": 0}
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    order = np.argsort(-probs, axis=1, kind="stable")
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class, f1s = [], []
    for k, label in enumerate(labels):
        tp = int(confusion[k, k])
        predicted, support = int(confusion[:, k].sum()), int(confusion[k].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support})
        if support or predicted:
            f1s.append(f1)
    top1 = float((pred == y).mean())
    return {
        "count": int(n),
        "loss": float(-np.log(np.clip(probs[np.arange(n), y], 1e-12, None)).mean()),
        "top1": top1,
        "top3": float((order[:, :3] == y[:, None]).any(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "micro_f1": top1,  # single-label: micro precision = micro recall = accuracy
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }


def expected_calibration_error(probs: np.ndarray, y_true: Sequence[int], bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if len(y) == 0:
        return 0.0
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs(conf[mask].mean() - (pred[mask] == y[mask]).mean())
    return float(total)


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(logits, t)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y_true: Sequence[int]) -> float:
    """The softmax temperature that minimises validation NLL (golden-section search on log T)."""
    y = np.asarray(y_true, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    a, b = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(60):
        if _nll(logits, y, math.exp(c)) < _nll(logits, y, math.exp(d)):
            b, d = d, c
            c = b - g * (b - a)
        else:
            a, c = c, d
            d = a + g * (b - a)
    return float(math.exp((a + b) / 2))
