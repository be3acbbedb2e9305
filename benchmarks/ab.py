"""classify or scan end to end, this checkout against another one (an earlier commit), alternating
rounds in one run on one folder, so that a change's cost is measured beside its baseline on the same
machine.

    git archive COMMIT dinobatch | (mkdir -p .old && tar -x -C .old)     # the baseline's package
    python3 benchmarks/ab.py .old --files 6000 --rounds 3 -- -j 8
    python3 benchmarks/ab.py .old --command scan --folder ../shared/data/dinos --rounds 5

The folder is generated (photo-sized JPEGs, as benchmarks/gpu.py makes them) unless --folder is
given; classify's model is benchmarks/classify.py's random ResNet50 unless --model is given. Each
round runs `python -m dinobatch classify` (or `scan`) once per tree into a fresh output, the
baseline first; figures are wall seconds of the whole command (its imports included, the same for
both) and files per second, medians over the rounds. What follows `--` goes to both trees' command.
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
SPECIES = REPO / "manifests" / "species.csv"


def tree_env(tree: Path, threads: int | None = None) -> dict[str, str]:
    """The environment for the package in tree: it first on PYTHONPATH; OMP/MKL threads if given."""
    pythonpath = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def dinobatch(tree: Path, args: list[str], threads: int | None = None) -> float:
    """Wall seconds of `python -m dinobatch ARGS` by the package in tree; exits with its stderr if it fails.

    The working directory is outside the repository, so `python -m` cannot pick up this checkout's
    package ahead of PYTHONPATH.
    """
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dinobatch", *args], env=tree_env(tree, threads),
                          cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"dinobatch {args[0]} by {tree} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return wall


def command_args(command: str, folder: Path, out: Path, model: Path | None, extra: list[str]) -> list[str]:
    """One round's command line for either tree (out: a fresh folder)."""
    if command == "scan":
        return ["scan", str(folder), "-o", str(out / "scan.parquet"), "-q", *extra]
    return ["classify", str(folder), "-o", str(out), "-m", str(model), "-q", "--species", str(SPECIES), *extra]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", type=Path, help="a folder holding the baseline's dinobatch/ package")
    ap.add_argument("--command", choices=("classify", "scan"), default="classify")
    ap.add_argument("--folder", type=Path, default=None)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args, extra = ap.parse_known_args()  # what follows -- goes to the command, for both trees
    args.extra = [a for a in extra if a != "--"]
    return args


def main() -> None:
    args = parse()
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.folder.resolve() if args.folder is not None else None  # the trees run from another folder
        if folder is None:
            from gpu import generate

            folder = tmp / "in"
            generate(folder, args.files, tuple(int(v) for v in args.size.split("x")))
        files = sum(1 for p in folder.rglob("*") if p.is_file())
        model = args.model
        if model is None and args.command == "classify":
            from classify import make_model

            model = make_model(tmp / "resnet50.pt")
        walls: dict[str, list[float]] = {"baseline": [], "this": []}
        for r in range(args.rounds):
            for name, tree in (("baseline", args.baseline.resolve()), ("this", REPO)):
                out = tmp / f"out-{name}-{r}"
                wall = dinobatch(tree, command_args(args.command, folder, out, model, args.extra))
                walls[name].append(wall)
                print(f"round {r + 1}: {name:<8} {wall:6.2f} s  {files / wall:8.1f} files/s", flush=True)
    print(f"\n{'tree':<10} {'median s':>9} {'files/s':>9}   ({files} files, {args.command} {' '.join(args.extra)})")
    for name, w in walls.items():
        print(f"{name:<10} {statistics.median(w):9.2f} {files / statistics.median(w):9.1f}")
    print(f"this / baseline: {statistics.median(walls['this']) / statistics.median(walls['baseline']):.3f} "
          "(wall seconds; under 1 is faster)")


if __name__ == "__main__":
    main()
