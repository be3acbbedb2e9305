"""Cost of an unchanged rerun, and peak memory as the folder grows, for `dinobatch classify` (CLI).

    .venv/bin/python benchmarks/incremental.py [--files 1000 10000] [--arch resnet18] [--crop 224]

Generates N small JPEGs per size in a temporary folder (never in the repository), runs
`dinobatch classify` as a subprocess twice (the first run, then an unchanged rerun) and prints
wall time and the peak resident memory of each run (the process and its decode workers, from
wait4). The anchor of the rerun is the first run measured in the same invocation.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """n distinct small JPEGs (coloured shapes), 100 per sub-folder."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for i in range(n):
        img = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.randrange(96), rng.randrange(72)
            draw.rectangle([x, y, x + rng.randrange(8, 48), y + rng.randrange(8, 36)],
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        sub = folder / f"{i // 100:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{i:07d}.jpg", quality=85)


def make_model(path: Path, arch: str, crop: int) -> None:
    import torch

    from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model

    torch.manual_seed(0)
    labels = tuple(f"class_{i}" for i in range(15))
    spec = ModelSpec(arch, labels, preprocessing=Preprocessing(resize=crop * 8 // 7, crop=crop),
                     source={"kind": "benchmark"})
    save_model(path, spec, build_module(arch, len(labels)).state_dict())


def run_cli(folder: Path, out: Path, model: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, largest of the process tree) of one classify run."""
    cmd = [sys.executable, "-m", "dinobatch", "classify", str(folder), "-o", str(out), "-m", str(model), "-q",
           "--species", str(HERE.parent / "manifests" / "species.csv")]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"classify failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--crop", type=int, default=224)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model.pt"
        make_model(model, args.arch, args.crop)
        for n in args.files:
            folder = tmp / f"in-{n}"
            generate(folder, n)
            time.sleep(2.1)  # files younger than 2 s are (rightly) rehashed by the next run
            first = run_cli(folder, tmp / f"out-{n}", model)
            rerun = run_cli(folder, tmp / f"out-{n}", model)
            rows.append((n, first, rerun))
            print(f"{n} files: first {first[0]:.1f} s, {first[1]:.0f} MiB; rerun {rerun[0]:.1f} s, "
                  f"{rerun[1]:.0f} MiB", flush=True)
    print(f"\nmodel {args.arch}, {args.crop}px input, CPU; dinobatch classify CLI (process start included)")
    print(f"{'files':>8} {'first run s':>12} {'rerun s':>9} {'rerun/first':>12} {'first MiB':>10} {'rerun MiB':>10}")
    for n, (fs, fm), (rs, rm) in rows:
        print(f"{n:>8} {fs:>12.1f} {rs:>9.1f} {rs / fs:>12.3f} {fm:>10.0f} {rm:>10.0f}")


if __name__ == "__main__":
    main()
