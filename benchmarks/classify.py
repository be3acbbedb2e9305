"""`dinobatch classify` on CPU beside the model's own ceiling and a timm-style loop, in one run.

    .venv/bin/python benchmarks/classify.py [FOLDER] [--limit N] [--batch-size 32] [--repeats 3]

FOLDER defaults to ../shared/data/dinos (read in place; a sample is linked, never copied). The
model is a randomly initialised torchvision ResNet50 with 15 classes (speed depends on the
architecture, not the weights), fp32, the same in every row. dinobatch's process settings
(device.tune_process: glibc allocator, threads) are applied once at the start, so every row runs
under them; the first row repeats the ceiling without them in a subprocess, for comparison.

Rows (images/s; ratio = row / ceiling):
  ceiling       forward pass only, random tensors, channels-last, after warm-up (median of repeats)
  timm-style    PIL full decode + torchvision Resize/CenterCrop/ToTensor/Normalize in a DataLoader
                with 2 workers, channels-last model: what a hand-written inference script does
  dinobatch     classify() end to end with default options on the sample: wall time from call to
                return (walk, sha256, decode, hashes, model, duplicates, Parquet), fresh output
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def make_model(path: Path) -> Path:
    import torch

    from dinobatch.models.file import ModelSpec, build_module, save_model

    torch.manual_seed(0)
    labels = tuple(f"class_{i}" for i in range(15))
    save_model(path, ModelSpec("resnet50", labels, source={"kind": "benchmark"}),
               build_module("resnet50", 15).state_dict())
    return path


def ceiling(model_path: Path, batch_size: int, batches: int, repeats: int) -> float:
    """Model-only images/s: channels-last fp32 forward on random input, median of repeats."""
    import torch

    from dinobatch.models.file import load_model

    module = load_model(model_path).module.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    rates = []
    with torch.inference_mode():
        module(x)  # warm-up: oneDNN primitives and the allocator's first growth
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(batches):
                module(x)
            rates.append(batch_size * batches / (time.perf_counter() - t))
    return statistics.median(rates)


class _Files:
    """A plain torch Dataset: the file list, PIL decode, torchvision transforms (timm's defaults)."""

    def __init__(self, paths: list[Path]):
        from torchvision import transforms as T

        self.paths = paths
        self.tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                             T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


def timm_style(model_path: Path, paths: list[Path], batch_size: int, workers: int = 2) -> float:
    """End-to-end images/s of the plain DataLoader loop timm's inference.py runs."""
    import torch
    from torch.utils.data import DataLoader

    from dinobatch.models.file import load_model

    t = time.perf_counter()
    module = load_model(model_path).module.eval().to(memory_format=torch.channels_last)
    loader = DataLoader(_Files(paths), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode():
        for x in loader:
            module(x.contiguous(memory_format=torch.channels_last)).argmax(1).tolist()
    return len(paths) / (time.perf_counter() - t)


def dinobatch_run(folder: Path, model_path: Path, out: Path, **options) -> tuple[float, object]:
    """classify() end to end with default options (plus any given): wall seconds and summary."""
    from dinobatch.jobs.classify import classify
    from dinobatch.config import ClassifyConfig

    t = time.perf_counter()
    summary = classify(ClassifyConfig(folder=str(folder), out=str(out), model=str(model_path),
                                      species=str(HERE.parent / "manifests" / "species.csv"), **options))
    return time.perf_counter() - t, summary


def untuned_ceiling(model_path: Path, batch_size: int, batches: int, repeats: int) -> float:
    """The same ceiling in a fresh process with glibc's allocator left at its defaults."""
    env = {**os.environ, "DINOBATCH_MALLOC": "system"}
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import classify as b; from pathlib import Path; "
            f"print(b.ceiling(Path({str(model_path)!r}), {batch_size}, {batches}, {repeats}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def sample_folder(folder: Path, dest: Path, limit: int | None) -> list[Path]:
    """Link up to `limit` readable files of folder into dest (never copied)."""
    from dinobatch.io.walk import walk

    paths = [Path(e.abspath) for e in walk(folder) if e.error is None][:limit]
    dest.mkdir()
    for i, p in enumerate(paths):
        os.symlink(p, dest / f"{i:05d}{p.suffix}")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--limit", type=int, default=None, help="use the first N files [default: all]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="ceiling / classify / ceiling rounds")
    ap.add_argument("--workers", type=int, default=None, help="classify --workers [default: dinobatch's]")
    ap.add_argument("--ceiling-batches", type=int, default=3, help="batches per ceiling measurement (x2)")
    args = ap.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"benchmark folder not found: {folder}")
    import torch

    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process

    settings = tune_process(resolve_runtime("cpu", "fp32"))
    print(f"machine: {len(os.sched_getaffinity(0))} cpus, torch {torch.__version__}; settings {json.dumps(settings)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "resnet50-random.pt")
        paths = sample_folder(folder, tmp / "sample", args.limit)
        n, bs = len(paths), args.batch_size
        base = untuned_ceiling(model, bs, 3, 3)
        timm = timm_style(model, paths, bs)
        rounds = []
        for r in range(args.repeats):  # this machine's speed drifts: each round has its own ceiling
            before = ceiling(model, bs, args.ceiling_batches, 2)
            wall, summary = dinobatch_run(tmp / "sample", model, tmp / f"out{r}", workers=args.workers)
            after = ceiling(model, bs, args.ceiling_batches, 2)
            rounds.append((before, after, n / wall, summary.images_per_second or 0.0, wall))
            print(f"round {r + 1}: ceiling {before:.2f} / {after:.2f}, classify {n / wall:.2f} img/s "
                  f"({wall:.1f} s), ratio {n / wall / ((before + after) / 2):.3f}", flush=True)
        rerun_s, _ = dinobatch_run(tmp / "sample", model, tmp / "out0", workers=args.workers)
    top = statistics.median([(b + a) / 2 for b, a, *_ in rounds])
    e2e = statistics.median([e for *_, e, _, _ in rounds])
    ratio = statistics.median([e / ((b + a) / 2) for b, a, e, _, _ in rounds])
    first_s = statistics.median([w for *_, w in rounds])
    print(f"\nResNet50 fp32, batch {bs}, CPU, {n} files; medians of {args.repeats} rounds; "
          f"ratio = img/s / the ceiling of the same round")
    print(f"{'measure':<52} {'img/s':>8} {'ratio':>6}")
    print(f"{'ceiling: forward only, channels-last, tuned':<52} {top:>8.2f} {1:>6.2f}")
    print(f"{'ceiling, glibc allocator untuned (subprocess)':<52} {base:>8.2f} {base / top:>6.2f}")
    print(f"{'timm-style DataLoader loop, 2 workers':<52} {timm:>8.2f} {timm / top:>6.2f}")
    print(f"{'dinobatch classify end to end, default options':<52} {e2e:>8.2f} {ratio:>6.2f}")
    print(f"{'unchanged rerun: seconds (first run ' + format(first_s, '.1f') + ' s)':<52} {rerun_s:>8.2f} "
          f"{rerun_s / first_s:>6.3f}")


if __name__ == "__main__":
    main()
