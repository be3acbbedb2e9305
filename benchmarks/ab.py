"""classify end to end, this checkout against another one (an earlier commit), alternating rounds in
one run on one folder, so that a change's cost is measured beside its baseline on the same machine.

    git archive COMMIT dinobatch | (mkdir -p .old && tar -x -C .old)     # the baseline's package
    python3 benchmarks/ab.py .old --files 6000 --rounds 3 -- -j 8

The folder is generated (photo-sized JPEGs, as benchmarks/gpu.py makes them) unless --folder is
given; the model is benchmarks/classify.py's random ResNet50 unless --model is given. Each round runs
`python -m dinobatch classify` once per tree into a fresh output folder; figures are wall seconds of
the whole command (its imports included, the same for both) and files per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(tree: Path, folder: Path, model: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of one classify by the package in tree (fresh output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dinobatch", "classify", str(folder), "-o", str(out), "-m", str(model),
                    "-q", "--species", str(REPO / "manifests" / "species.csv"), *extra], env=env, check=True,
                   cwd=tempfile.gettempdir())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="a folder holding the baseline's dinobatch/ package")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args, extra = ap.parse_known_args()  # what follows -- goes to classify, for both trees
    args.extra = [a for a in extra if a != "--"]
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.folder
        if folder is None:
            from gpu import generate

            folder = tmp / "in"
            generate(folder, args.files, tuple(int(v) for v in args.size.split("x")))
        files = sum(1 for p in folder.rglob("*") if p.is_file())
        model = args.model
        if model is None:
            from classify import make_model

            model = make_model(tmp / "resnet50.pt")
        walls: dict[str, list[float]] = {"baseline": [], "this": []}
        for r in range(args.rounds):
            for name, tree in (("baseline", args.baseline.resolve()), ("this", REPO)):
                wall = run(tree, folder, model, tmp / f"out-{name}-{r}", args.extra)
                walls[name].append(wall)
                print(f"round {r + 1}: {name:<8} {wall:6.2f} s  {files / wall:8.1f} files/s", flush=True)
    print(f"\n{'tree':<10} {'median s':>9} {'files/s':>9}   ({files} files, classify {' '.join(args.extra)})")
    for name, w in walls.items():
        print(f"{name:<10} {statistics.median(w):9.2f} {files / statistics.median(w):9.1f}")


if __name__ == "__main__":
    main()
