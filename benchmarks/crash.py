"""Kill classify with SIGKILL at random moments over a real folder; check that nothing is lost or doubled.

    .venv/bin/python benchmarks/crash.py [FOLDER] [--kills 20] [--limit 120] [--seed 0]

FOLDER defaults to ../shared/data/dinos (read in place; a sample is linked, never copied). The model is
a random resnet18 at 64 px (what is checked is bookkeeping, not accuracy). After each kill the visible
output is checked (every rows file readable, one row per file, no half-written visible file); after
the last kill a run completes and its current rows must equal those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COMPARED = ("path", "sha256", "status", "error", "label", "probs", "duplicate_of")


def run(folder: Path, out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, "-m", "dinobatch", "classify", str(folder), "-o", str(out), "-m",
                             str(model), "-b", "8", "-q"], env=env, stderr=subprocess.DEVNULL)


def check(out: Path) -> str:
    import pyarrow.parquet as pq

    problems = []
    for f in out.glob("*.parquet"):
        try:
            paths = pq.read_table(f, columns=["path"])["path"].to_pylist()
        except Exception as exc:  # a visible file that cannot be read is exactly what must never happen
            problems.append(f"{f.name} unreadable: {exc}")
            continue
        if len(paths) != len(set(paths)):
            problems.append(f"{f.name} has doubled rows")
    for part in (out / "_cache").rglob("part-*.parquet"):
        try:
            pq.read_table(part, columns=["sha256"])
        except Exception as exc:
            problems.append(f"{part.name} unreadable: {exc}")
    return "; ".join(problems) or "ok"


def current(out: Path) -> dict:
    from dinobatch.results import current_rows

    return {r["path"]: tuple(str(r[k]) for k in COMPARED) for r in current_rows(out).to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    from dinobatch.model import ModelSpec, Preprocessing, build_module, save_model
    from dinobatch.scan import walk

    tmp = Path(tempfile.mkdtemp(prefix="crash-"))
    sample = tmp / "sample"
    sample.mkdir()
    for i, e in enumerate([e for e in walk(args.folder) if e.error is None][:args.limit]):
        os.symlink(e.abspath, sample / f"{i:04d}_{Path(e.path).name}")
    torch.manual_seed(0)
    model = tmp / "model.pt"
    save_model(model, ModelSpec("resnet18", tuple(f"c{i}" for i in range(15)), Preprocessing(resize=73, crop=64)),
               build_module("resnet18", 15).state_dict())
    t = time.monotonic()
    assert run(sample, tmp / "reference", model).wait() == 0
    full = time.monotonic() - t
    print(f"uninterrupted run over {args.limit} real files: {full:.1f} s")
    rng = random.Random(args.seed)
    out = tmp / "out"
    print(f"{'kill':>4} {'after s':>8} {'cache parts':>11} {'rows files':>10}  visible output")
    for k in range(1, args.kills + 1):
        proc = run(sample, out, model)
        delay = rng.uniform(0.5, full)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        parts = len(list((out / "_cache").rglob("part-*.parquet"))) if out.exists() else 0
        rows = len(list(out.glob("*.parquet"))) if out.exists() else 0
        state = "finished before the kill" if finished else check(out) if out.exists() else "nothing yet"
        print(f"{k:>4} {delay:>8.2f} {parts:>11} {rows:>10}  {state}")
    assert run(sample, out, model).wait() == 0
    same = current(out) == current(tmp / "reference")
    print(f"\nafter {args.kills} kills and one complete run: current rows "
          f"{'EQUAL' if same else 'DIFFER FROM'} the uninterrupted run's ({len(current(out))} files)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
