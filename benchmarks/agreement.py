"""How far bf16 autocast (and an int8 model file) move classify's predictions from fp32 on real photos:
the check behind `--precision auto` choosing bf16 on CPUs with AMX-BF16.

    .venv/bin/python benchmarks/agreement.py MODEL [FOLDER] [--limit N] [--int8 MODEL_INT8]
    .venv/bin/python benchmarks/agreement.py random-resnet50 ../shared/data/dinos

MODEL is a dinobatch model file, or random-resnet50 (random weights, 15 classes: near-ties everywhere,
so the harshest case for agreement). FOLDER defaults to ../shared/data/dinos; where its sub-folders
are the model's labels, accuracy is printed too. Every content is decoded once, as classify decodes
it, and predicted by the same Predictor at each precision (stages.infer, engines.local.predict).
Printed per precision against fp32: top-1 agreement overall and where fp32's confidence >= 0.5,
mean and largest |confidence difference|. The numerics of bf16 autocast are oneDNN's on any x86 CPU
(bf16 inputs and weights, fp32 accumulation), so agreement measured on a CPU without AMX holds on one
with it; only the speed differs.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def contents(folder: Path, limit: int | None) -> list:
    """One WorkItem per distinct content of folder (its first `limit` readable files), first seen first."""
    from dinobatch.io.walk import walk
    from dinobatch.stages.decode import WorkItem

    seen: dict[str, list[str]] = {}
    for entry in [e for e in walk(folder) if e.error is None][:limit]:
        seen.setdefault(hashlib.sha256(Path(entry.abspath).read_bytes()).hexdigest(), []).append(entry.abspath)
    return [WorkItem(tuple(files), sha) for sha, files in seen.items()]


def predictions(model, items: list, precision: str) -> dict[str, tuple[str, float]]:
    """sha256 -> (label, confidence) of every content that decoded, at precision on the CPU."""
    import torch

    from dinobatch.engines.local import predict
    from dinobatch.runtime.device import Runtime

    runtime = Runtime(torch.device("cpu"), precision)
    out = {}
    for batch in predict(model, runtime, items, batch_size=32, workers=None, embeddings=False):
        for r in batch:
            if r.prediction is not None:
                out[r.sha256] = (r.prediction["label"], float(r.prediction["confidence"]))
    return out


def compare(name: str, ref: dict, other: dict, truth: dict[str, str]) -> None:
    """One line: other against ref (fp32), over the contents both predicted."""
    shared = [s for s in ref if s in other]
    sure = [s for s in shared if ref[s][1] >= 0.5]
    agree = sum(ref[s][0] == other[s][0] for s in shared) / len(shared)
    agree_sure = sum(ref[s][0] == other[s][0] for s in sure) / len(sure) if sure else float("nan")
    diffs = [abs(ref[s][1] - other[s][1]) for s in shared]
    acc = sum(other[s][0] == truth.get(s) for s in shared) / len(shared)
    print(f"{name:<10} {len(shared):>6} {agree:>9.4f} {len(sure):>7} {agree_sure:>12.4f} "
          f"{statistics.mean(diffs):>10.5f} {max(diffs):>9.5f} {acc:>9.4f}")


def load(ref: str, tmp: Path):
    """The model file's LoadedModel, or a random ResNet50 of 15 classes for 'random-resnet50'."""
    from dinobatch.models.file import load_model

    if ref != "random-resnet50":
        return load_model(ref)
    sys.path.insert(0, str(HERE))
    import classify as bench

    return load_model(bench.make_model(tmp / "resnet50-random.pt"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--int8", default=None, help="an int8 model file of MODEL (dinobatch model quantize)")
    args = ap.parse_args()
    from dinobatch.models.file import load_model
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process

    tune_process(resolve_runtime("cpu", "fp32"))
    items = contents(Path(args.folder), args.limit)
    truth = {i.sha256: Path(i.abspaths[0]).parent.name for i in items}
    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.model, Path(tmp))
        ref = predictions(model, items, "fp32")
        runs = {"bf16": predictions(model, items, "bf16")}
        if args.int8:
            runs["int8"] = predictions(load_model(args.int8), items, "fp32")
    print(f"{model.name} ({model.spec.arch}, {len(model.spec.labels)} classes) on {len(items)} contents of "
          f"{args.folder}; accuracy against the folder names (0 where they are not the labels)")
    print(f"{'vs fp32':<10} {'n':>6} {'top-1 agr':>9} {'n>=0.5':>7} {'agr conf>=.5':>12} {'mean |dc|':>10} "
          f"{'max |dc|':>9} {'accuracy':>9}")
    compare("fp32", ref, ref, truth)
    for name, other in runs.items():
        compare(name, ref, other, truth)


if __name__ == "__main__":
    main()
