"""Peak memory of `dinobatch classify` on huge palette and alpha images: an earlier commit beside this tree.

    .venv/bin/python benchmarks/decode_memory.py [--before 6de4d10] [--cases gif1 gif4 ...] [--keep DIR]

Generates each case's images (solid colours, each file its own colour so that no two are
duplicates: 60 KB a GIF, 350 KB a PNG on disk) and runs `python -m dinobatch classify` on them
with a tiny random model (decode memory is what is measured), once with the code of --before
(checked out in a temporary git worktree; default 6de4d10, before classify reduced first) and once
with this tree, a fresh --out each time, in turns. Rows:

  base        one 100x100 GIF: what classify costs whatever the images (torch, the model, the pool)
  base-j4     four of them, -j 4 -b 1: the same for the -j 4 rows below
  gif1        one 9000x9000 GIF (81 MP palette), default workers (a burst pool, one per core)
  gif4        four of them, default workers
  gif4-j4     four of them, -j 4 -b 1 (a DataLoader with 4 decoding workers, one image each)
  rgba1       one 9400x9400 RGBA PNG (88 MP, half transparent), default workers
  rgba4-j4    four of them, -j 4 -b 1: the decode budget (DINOBATCH_DECODE_MEMORY, 1024 MiB: three
              of these 337 MiB images) holds the fourth back
  rgba4-j4-b400  the same with DINOBATCH_DECODE_MEMORY=400: one at a time (this tree only)

Columns, per tree: 'tree PSS' is the peak of the summed proportional set sizes of the run and all
its workers (sampled every 20 ms; pages shared by forked workers, torch's among them, counted once:
the memory the machine actually gave the run); 'tree RSS' the same with resident set sizes
(shared pages counted in every process, as `ps` adds them up); 'largest' is ru_maxrss of the
largest single process; 's' is the run's wall time, interpreter start and torch import included.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIF_SIDE = 9000
RGBA_SIDE = 9400  # 88.4 MP: just under decode.MAX_PIXELS

# name: (kind, files, classify options, environment)
CASES = {
    "base": ("small", 1, [], {}),
    "base-j4": ("small", 4, ["-j", "4", "-b", "1"], {}),
    "gif1": ("gif", 1, [], {}),
    "gif4": ("gif", 4, [], {}),
    "gif4-j4": ("gif", 4, ["-j", "4", "-b", "1"], {}),
    "rgba1": ("rgba", 1, [], {}),
    "rgba4-j4": ("rgba", 4, ["-j", "4", "-b", "1"], {}),
    "rgba4-j4-b400": ("rgba", 4, ["-j", "4", "-b", "1"], {"DINOBATCH_DECODE_MEMORY": "400"}),
}

_MAKE_MODEL = """
import sys, torch
from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model
torch.manual_seed(0)
spec = ModelSpec(arch="resnet18", labels=("a", "b", "c"), preprocessing=Preprocessing(resize=36, crop=32),
                 source={"kind": "benchmark", "note": "random weights"})
save_model(sys.argv[1], spec, build_module("resnet18", 3).state_dict())
"""


def make_images(folder: Path, kind: str, count: int) -> None:
    """count solid images of kind (gif: 9000x9000 palette; rgba: 9400x9400 RGBA PNG; small: a 100x100
    GIF), each its own colour."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        if kind in ("gif", "small"):
            img = Image.new("P", (GIF_SIDE, GIF_SIDE) if kind == "gif" else (100, 100), i)
            img.putpalette([(37 * k + 11 * i) % 256 for k in range(768)])
            img.save(folder / f"solid{i}.gif")
        else:
            Image.new("RGBA", (RGBA_SIDE, RGBA_SIDE), (200, 30 + 40 * i, 60, 128)).save(
                folder / f"solid{i}.png", compress_level=1)


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                stack.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return pids


def _pss_rss(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in bytes, or zeros once it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return pss, rss


def run_measured(argv: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run argv; its peak tree PSS and RSS, largest single process and wall seconds (MiB, s)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"pss": 0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sizes = [_pss_rss(p) for p in _tree(proc.pid)]
            peak["pss"] = max(peak["pss"], sum(s[0] for s in sizes))
            peak["rss"] = max(peak["rss"], sum(s[1] for s in sizes))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(argv)}\n{stderr.decode()[-2000:]}")
    return {"pss": peak["pss"] / 2**20, "rss": peak["rss"] / 2**20, "largest": usage.ru_maxrss / 1024,
            "s": time.perf_counter() - start}


def classify_argv(folder: Path, model: Path, out: Path, options: list[str]) -> list[str]:
    return [sys.executable, "-m", "dinobatch", "classify", str(folder), "-m", str(model), "-o", str(out), "-q",
            *options]


def tree_env(root: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment that makes `python -m dinobatch` the code at root."""
    env = {k: v for k, v in os.environ.items() if k != "DINOBATCH_DECODE_MEMORY"}
    return {**env, "PYTHONPATH": str(root), **extra}


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), commit],
                   check=True, capture_output=True)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="6de4d10", help="commit measured beside this tree")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--keep", help="generate the images here and keep them between runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp_name:
        tmp = Path(tmp_name)
        images = Path(args.keep) if args.keep else tmp / "images"
        old = worktree(args.before, tmp / "before")
        try:
            trees = {"before": old, "after": REPO}
            models = {}
            for label, root in trees.items():
                models[label] = tmp / f"model-{label}.pt"
                subprocess.run([sys.executable, "-c", _MAKE_MODEL, str(models[label])], cwd=root,
                               env=tree_env(root, {}), check=True)
            print(f"before: {args.before}; after: this tree; {os.cpu_count()} CPUs; memory in MiB")
            print(f"{'':<15}" + "".join(f"{label:^40}" for label in trees))
            print(f"{'case':<15}" + "".join(f"{col:>10}" for _ in trees for col in ("tree PSS", "tree RSS",
                                                                                    "largest", "s")))
            for name in args.cases:
                kind, count, options, extra = CASES[name]
                folder = images / f"{kind}{count}"
                if not folder.exists():
                    make_images(folder, kind, count)
                cells = []
                for label, root in trees.items():
                    if extra and label == "before":  # an option the earlier code does not have
                        cells.append(f"{'-':>10}" * 4)
                        continue
                    r = run_measured(classify_argv(folder, models[label], tmp / f"out-{name}-{label}", options),
                                     root, tree_env(root, extra))
                    cells.append(f"{r['pss']:>10.0f}{r['rss']:>10.0f}{r['largest']:>10.0f}{r['s']:>10.1f}")
                print(f"{name:<15}" + "".join(cells), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    main()
