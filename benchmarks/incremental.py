"""Cost of an unchanged rerun, and peak memory as the folder grows, for `dinobatch classify` (CLI).

    .venv/bin/python benchmarks/incremental.py [--files 1000 10000] [--arch resnet18] [--crop 224]
    .venv/bin/python benchmarks/incremental.py --files 10000 --crop 32 --baseline HEAD~1 --reruns 3

Generates N small JPEGs per size in a temporary folder (never in the repository), runs
`dinobatch classify` as a subprocess (the first run, then unchanged reruns) and prints wall time
(interpreter start included) and the peak resident memory of each run (the process and its decode
workers, from wait4). The anchor of the rerun is the first run measured in the same invocation; with
--baseline (a git revision, extracted with `git archive` into a temporary folder, or a folder holding
an older dinobatch/ package) the same folder is also classified, into an output of its own, by that
older code, and its reruns are timed beside this checkout's, interleaved, in the same invocation.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
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


def run_cli(folder: Path, out: Path, model: Path, tree: Path = HERE.parent) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, largest of the process tree) of one classify run of the dinobatch
    package in tree (the working folder of `python -m`, so its dinobatch/ is the one imported)."""
    cmd = [sys.executable, "-m", "dinobatch", "classify", str(folder), "-o", str(out), "-m", str(model), "-q",
           "--species", str(HERE.parent / "manifests" / "species.csv")]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"classify ({tree}) failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


def baseline_tree(ref: str, tmp: Path) -> Path:
    """A folder holding the older dinobatch/ package: ref itself when it is one, else `git archive` of
    that revision's dinobatch/ into tmp."""
    if (Path(ref) / "dinobatch" / "__init__.py").is_file():
        return Path(ref).resolve()
    tree = tmp / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "dinobatch"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def measure(n: int, tmp: Path, model: Path, trees: dict[str, Path], reruns: int) -> dict[str, tuple]:
    """Per tree: (first run s, MiB) and the median (s, MiB) of its unchanged reruns, interleaved."""
    folder = tmp / f"in-{n}"
    generate(folder, n)
    time.sleep(2.1)  # files younger than 2 s are (rightly) rehashed by the next run
    first = {name: run_cli(folder, tmp / f"out-{n}-{name}", model, tree) for name, tree in trees.items()}
    again: dict[str, list] = {name: [] for name in trees}
    for _ in range(reruns):
        for name, tree in trees.items():
            again[name].append(run_cli(folder, tmp / f"out-{n}-{name}", model, tree))
    result = {}
    for name in trees:
        seconds, mib = zip(*again[name])
        result[name] = (first[name], (statistics.median(seconds), statistics.median(mib)))
        print(f"{n} files, {name}: first {first[name][0]:.1f} s, {first[name][1]:.0f} MiB; reruns "
              f"{', '.join(f'{s:.2f}' for s, _ in again[name])} s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--baseline", help="git revision or folder of the older code to time beside this checkout")
    ap.add_argument("--reruns", type=int, default=1, help="unchanged reruns per tree (the median is shown)")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} cores): other work on the machine shows here", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"this checkout": HERE.parent}
        if args.baseline:
            trees = {f"baseline {args.baseline}": baseline_tree(args.baseline, tmp), **trees}
        model = tmp / "model.pt"
        # in a child: a parent holding torch would count in each run's peak (a forked child's RSS before exec)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import incremental; "
                        f"incremental.make_model(incremental.Path({str(model)!r}), {args.arch!r}, {args.crop})"],
                       check=True)
        for n in args.files:
            rows.append((n, measure(n, tmp, model, trees, args.reruns)))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmodel {args.arch}, {args.crop}px input, CPU; dinobatch classify CLI (process start included); "
          f"rerun: median of {args.reruns}")
    print(f"{'files':>8}  {'code':<28} {'first run s':>12} {'rerun s':>9} {'rerun/first':>12} {'first MiB':>10} "
          f"{'rerun MiB':>10}")
    for n, result in rows:
        for name, ((fs, fm), (rs, rm)) in result.items():
            print(f"{n:>8}  {name:<28} {fs:>12.1f} {rs:>9.2f} {rs / fs:>12.3f} {fm:>10.0f} {rm:>10.0f}")


if __name__ == "__main__":
    main()
