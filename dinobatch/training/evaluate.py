"""Evaluate a model on a manifest split: metrics, per-image predictions, a confusion-matrix picture."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinobatch.engines.local import predict
from dinobatch.errors import InputError, ModelError
from dinobatch.io.arrow import write_table
from dinobatch.io.files import atomic_path, json_plain
from dinobatch.io.lock import exclusive
from dinobatch.models.file import resolve_model
from dinobatch.runtime.device import resolve_runtime
from dinobatch.schema import Col
from dinobatch.stages.decode import WorkItem
from dinobatch.training.manifest import describe_unreadable, load_manifest
from dinobatch.training.metrics import report

__all__ = ["evaluate", "format_table", "confusion_png"]

log = logging.getLogger(__name__)
_PNG_MAX_CLASSES = 100


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # overall report, plus "by_kind" when the manifest says photo/drawing
    out: Path
    unreadable: dict[str, str]  # path -> why, for the rows that could not be read (left out of the metrics)


def evaluate(manifest_path: str, model_ref: str, out: str, *, split: str | None = "test", device: str = "auto",
             precision: str = "auto", batch_size: int | None = None, workers: int | None = None, wait: float = 0.0,
             progress: Callable[[str, int, int], None] | None = None, compare: str | None = None) -> Evaluation:
    """Predict every usable row of the split; write metrics.json, predictions.parquet and .json, confusion.png.

    Images are decoded and batched as classify does: batch_size and workers None take its defaults.
    compare: a reference model (e.g. the fp32 model an int8 one came from) run on the same images; its
    accuracy and the two models' agreement go into metrics["compare"].
    One run at a time writes OUT (a second exits with LockedError, after `wait` seconds)."""
    out_dir = Path(out)
    with exclusive(out_dir / ".lock", wait=wait):
        return _evaluate(manifest_path, model_ref, out_dir, split=split, device=device, precision=precision,
                         batch_size=batch_size, workers=workers, progress=progress, compare=compare)


def _evaluate(manifest_path: str, model_ref: str, out_dir: Path, *, split: str | None, device: str, precision: str,
              batch_size: int | None, workers: int | None,
              progress: Callable[[str, int, int], None] | None, compare: str | None) -> Evaluation:
    """evaluate's work, under its lock."""
    manifest = load_manifest(manifest_path)
    rows = manifest.rows(split)
    if not rows:
        raise InputError(f"{manifest_path} has no usable rows in split {split!r}")
    device_runtime = resolve_runtime(device, precision)
    model = resolve_model(model_ref)
    runtime = device_runtime.for_model(model.spec.precision, precision)  # an int8 file: CPU only, int8
    reference = _reference(compare, model, device_runtime, precision)
    labels = list(model.spec.labels)
    known = [r for r in rows if r[Col.LABEL] in labels]
    if len(known) < len(rows):
        log.warning("%d image(s) have labels the model does not know; they are left out of the metrics",
                    len(rows) - len(known))
    results = _predict(manifest, known, model, runtime, batch_size=batch_size, workers=workers, progress=progress)
    scored = [r for r in known if results[r[Col.SHA256]].error is None]
    unreadable = {r[Col.PATH]: results[r[Col.SHA256]].error for r in known if results[r[Col.SHA256]].error}
    if unreadable:
        log.warning("%s; left out of the metrics", describe_unreadable(unreadable))
    if not scored:
        raise InputError(f"none of the {len(rows)} image(s) of split {split!r} could be evaluated "
                         f"({len(rows) - len(known)} with labels unknown to the model, the rest unreadable)")
    probs = np.array([results[r[Col.SHA256]].prediction[Col.PROBS] for r in scored]).reshape(-1, len(labels))
    y = [labels.index(r[Col.LABEL]) for r in scored]
    metrics = {**report(y, probs, labels), "split": split, "model": model.name,
               "model_fingerprint": model.fingerprint, "precision": runtime.precision,
               "manifest_sha256": manifest.sha256, "unknown_label": len(rows) - len(known), "failed": len(unreadable)}
    if reference is not None:
        ref_results = _predict(manifest, scored, *reference, batch_size=batch_size, workers=workers, progress=progress)
        metrics["compare"] = _comparison(reference, scored, results, ref_results, labels, metrics["top1"])
    kinds = sorted({r.get(Col.KIND) for r in scored if r.get(Col.KIND)})
    if len(kinds) > 1:
        metrics["by_kind"] = {k: _subset_report(scored, y, probs, labels, k) for k in kinds}
    scored_losses = iter(_losses(probs, y))  # in the order of scored, a subset of known
    losses = [next(scored_losses) if results[r[Col.SHA256]].error is None else None for r in known]
    _write_report(out_dir, metrics, _predictions_table(known, results, losses), labels)
    return Evaluation(metrics, out_dir, unreadable)


def _predict(manifest, rows, model, runtime, *, batch_size: int | None, workers: int | None,
             progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    """sha256 -> the model's result for each content among the rows (read from any of its files)."""
    paths: dict[str, list[str]] = {}
    for r in rows:  # any copy of the same bytes will do
        paths.setdefault(r[Col.SHA256], []).append(manifest.abspath(r))
    items = [WorkItem(tuple(p), sha) for sha, p in paths.items()]
    results: dict[str, Any] = {}
    for batch in predict(model, runtime, items, batch_size=batch_size, workers=workers, embeddings=False):
        results.update({r.sha256: r for r in batch})
        if progress:
            progress("evaluate", len(results), len(items))
    return results


def _reference(compare: str | None, model, device_runtime, precision: str):
    """The --compare model and its runtime, or None; it must predict the same labels in the same order."""
    if compare is None:
        return None
    ref = resolve_model(compare)
    if list(ref.spec.labels) != list(model.spec.labels):
        raise ModelError(f"--compare {compare} predicts other labels than {model.name} (or in another order); "
                         f"agreement needs the same classes")
    return ref, device_runtime.for_model(ref.spec.precision, precision)


# The reference's confidence from which agreement is reported on its own: below it the reference is
# unsure and a near-tie may flip under any change of arithmetic.
CONFIDENT = 0.5


def _comparison(reference, scored: list[dict[str, Any]], results: dict[str, Any], ref_results: dict[str, Any],
                labels: list[str], top1: float) -> dict[str, Any]:
    """The reference's accuracy on the images both models read, and how often the two agree."""
    ref_model, ref_runtime = reference
    both = [r for r in scored if ref_results[r[Col.SHA256]].error is None]
    ours = [results[r[Col.SHA256]].prediction for r in both]
    theirs = [ref_results[r[Col.SHA256]].prediction for r in both]
    same = np.array([a[Col.LABEL] == b[Col.LABEL] for a, b in zip(ours, theirs)], bool)
    ref_conf = np.array([b[Col.CONFIDENCE] for b in theirs], float)
    diff = np.abs(np.array([a[Col.CONFIDENCE] for a in ours], float) - ref_conf)
    ref_correct = np.array([b[Col.LABEL] == r[Col.LABEL] for b, r in zip(theirs, both)], bool)
    sure = ref_conf >= CONFIDENT
    return {"model": ref_model.name, "model_fingerprint": ref_model.fingerprint, "precision": ref_runtime.precision,
            "count": len(both), "top1": _mean(ref_correct), "top1_drop": _mean(ref_correct) - top1 if both else None,
            "agreement": _mean(same), "confident_threshold": CONFIDENT, "confident_count": int(sure.sum()),
            "agreement_confident": _mean(same[sure]), "mean_abs_confidence_difference": _mean(diff)}


def _mean(values: np.ndarray) -> float | None:
    """The mean as a plain float, or None for no values (JSON has no NaN)."""
    return float(values.mean()) if len(values) else None


def _write_report(out_dir: Path, metrics: dict[str, Any], table, labels: list[str]) -> None:
    """predictions.parquet and .json, metrics.json and confusion.png, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(table, out_dir / "predictions.parquet")
    with atomic_path(out_dir / "predictions.json") as tmp:
        tmp.write_text(json.dumps(table.drop_columns([Col.PROBS]).to_pylist(), indent=1, default=json_plain) + "\n",
                       encoding="utf-8")
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if len(labels) <= _PNG_MAX_CLASSES:
        with atomic_path(out_dir / "confusion.png") as tmp:
            confusion_png(metrics["confusion"], labels, tmp)
    else:
        log.info("confusion.png skipped: %d classes is more than a picture can show (%d at most)",
                 len(labels), _PNG_MAX_CLASSES)


def _subset_report(rows, y, probs, labels, kind) -> dict[str, Any]:
    keep = [i for i, r in enumerate(rows) if r.get(Col.KIND) == kind]
    sub = report([y[i] for i in keep], probs[keep], labels)
    return {k: sub[k] for k in ("count", "loss", "top1", "top3", "macro_f1", "micro_f1")}


def _losses(probs: np.ndarray, y: list[int]) -> list[float]:
    """Each image's cross-entropy: -log of the probability the model gave its true label."""
    return (-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))).tolist()


def _predictions_table(rows, results, losses: list[float | None]):
    """One row per image of the split the model knows, in manifest order: its label, the model's
    prediction (label and confidence as classify reports them, and the precision it ran at), whether it
    was right and its loss (losses: one per row, None where unreadable), or why it could not be read."""
    import pyarrow as pa

    out = []
    for r, loss in zip(rows, losses):
        res = results[r[Col.SHA256]]
        row = {Col.PATH: r[Col.PATH], Col.PATH_BYTES: r.get(Col.PATH_BYTES), Col.LABEL: r[Col.LABEL],
               Col.KIND: r.get(Col.KIND), Col.SPLIT: r[Col.SPLIT], Col.ERROR: res.error}
        if res.error is None:
            pred = res.prediction
            row.update({Col.PREDICTED: pred[Col.LABEL], Col.CONFIDENCE: pred[Col.CONFIDENCE],
                        Col.CORRECT: pred[Col.LABEL] == r[Col.LABEL], Col.LOSS: loss,
                        Col.PROBS: pred[Col.PROBS], Col.PRECISION: pred[Col.PRECISION]})
        out.append(row)
    return pa.Table.from_pylist(out, schema=_predictions_schema())


def _predictions_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field(Col.PATH, pa.string()), pa.field(Col.PATH_BYTES, pa.binary()), pa.field(Col.LABEL, pa.string()),
        pa.field(Col.KIND, pa.string()), pa.field(Col.SPLIT, pa.string()), pa.field(Col.PREDICTED, pa.string()),
        pa.field(Col.CONFIDENCE, pa.float32()), pa.field(Col.CORRECT, pa.bool_()), pa.field(Col.LOSS, pa.float32()),
        pa.field(Col.PROBS, pa.list_(pa.float32())), pa.field(Col.PRECISION, pa.string()),
        pa.field(Col.ERROR, pa.string()),
    ])


def format_table(metrics: dict[str, Any]) -> str:
    """The printed report: overall figures, what was left out, per kind, then per class."""
    lines = [f"{metrics['count']} images ({metrics['split'] or 'all'}): loss {metrics['loss']:.4f}  "
             f"top-1 {metrics['top1']:.3f}  top-3 {metrics['top3']:.3f}  macro F1 {metrics['macro_f1']:.3f}  "
             f"micro F1 {metrics['micro_f1']:.3f}"]
    if metrics.get("failed"):
        n = metrics["failed"]
        lines.append(f"{n} image{'' if n == 1 else 's'} could not be read and {'is' if n == 1 else 'are'} left out "
                     f"(named in predictions.parquet, with the reason)")
    if metrics.get("unknown_label"):
        lines.append(f"{metrics['unknown_label']} image(s) with labels the model does not know left out")
    for kind, m in metrics.get("by_kind", {}).items():
        lines.append(f"  {kind:<10} {m['count']:>5} images: top-1 {m['top1']:.3f}  top-3 {m['top3']:.3f}  "
                     f"macro F1 {m['macro_f1']:.3f}")
    if metrics.get("compare"):
        lines += _compare_lines(metrics)
    width = max(len(c["label"]) for c in metrics["per_class"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for c in metrics["per_class"]:
        lines.append(f"{c['label']:<{width}}  {c['precision']:>9.3f}  {c['recall']:>6.3f}  {c['f1']:>5.3f}  {c['support']:>7}")
    return "\n".join(lines)


def _compare_lines(metrics: dict[str, Any]) -> list[str]:
    """The printed comparison with the --compare model."""
    c = metrics["compare"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    diff = c["mean_abs_confidence_difference"]
    return [f"compared with {c['model']} ({c['precision']}) on {c['count']} images: top-1 {pct(c['top1'])} there, "
            f"{pct(metrics['top1'])} here ({metrics['precision']})",
            f"  top-1 agreement {pct(c['agreement'])}; where its confidence >= {c['confident_threshold']} "
            f"({c['confident_count']} images) {pct(c['agreement_confident'])}; mean |confidence difference| "
            f"{'n/a' if diff is None else f'{diff:.4f}'}"]


def confusion_png(confusion: list[list[int]], labels: list[str], path: Path, cell: int = 28) -> Path:
    """Draw the confusion matrix (rows: true, columns: predicted) as a PNG with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(labels)
    font = ImageFont.load_default()
    margin = 8 + 7 * max((len(x) for x in labels), default=1)
    img = Image.new("RGB", (margin + n * cell + 10, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    peak = max((max(r) for r in confusion), default=1) or 1
    for i, row in enumerate(confusion):
        draw.text((4, margin + i * cell + cell // 3), labels[i], fill="black", font=font)
        for j, count in enumerate(row):
            shade = int(255 - 200 * count / peak)
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            box = [margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1]
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
            if count:
                draw.text((box[0] + 4, box[1] + cell // 3), str(count), fill="black", font=font)
    for j, label in enumerate(labels):  # predicted labels, written rotated above the columns
        tile = Image.new("RGB", (margin, cell), "white")
        ImageDraw.Draw(tile).text((4, cell // 3), label, fill="black", font=font)
        img.paste(tile.rotate(90, expand=True), (margin + j * cell, 0))
    img.save(path, "PNG")
    return path
