"""Throughput and peak memory of `dinobatch scan` beside imagededup and a plain hashing loop.

    .venv/bin/python benchmarks/scan.py [FOLDER] [--workers N] [--repeat 3] [--large-mp 72]
    .venv/bin/python benchmarks/scan.py --scale 1000 20000 100000 [--keep DIR]

FOLDER defaults to ../shared/data/dinos (read in place). Every run is a fresh interpreter, started
through a small wrapper so that its peak memory is its own: 'peak tree' is the sum of the resident
sets of the run and all its worker processes, sampled every 10 ms; 'largest' is ru_maxrss of the
largest single process. Contenders run in turns, --repeat rounds, and the fastest run of each is
shown. Seconds and CPU seconds (user + system, workers included) are taken inside the run around
the call, imports excluded, except for the CLI row: the whole `python -m dinobatch scan` command,
interpreter start and imports included. 'x imagededup' is images/s over imagededup's; 'x by CPU'
is imagededup's CPU seconds over the row's: the work each does, whatever share of the cores it got
(on a shared machine wall-clock ratios move with other people's load; CPU seconds move less).
The large-image case writes a JPEG and a PNG of --large-mp megapixels to a temporary folder.

--scale runs the CLI alone over generated folders of small JPEGs (benchmarks/incremental.py's
generator, kept in --keep DIR between runs if given): memory against the number of files, each
folder's peaks beside the smallest one's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

_IMAGEDEDUP = """
import json, logging, sys, time
logging.disable(logging.CRITICAL)
from imagededup.methods import PHash
import os
c, t = os.times(), time.perf_counter()
hashes = PHash(verbose=False).encode_images(sys.argv[1], recursive=True)
seconds, d = time.perf_counter() - t, os.times()
cpu = sum(getattr(d, k) - getattr(c, k) for k in ("user", "system", "children_user", "children_system"))
print(json.dumps({"seconds": seconds, "cpu": cpu, "files": len(hashes)}))
"""
_LOOP = """
import json, os, sys, time
import imagehash
from PIL import Image
paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs if not f.startswith("."))
c, t = time.process_time(), time.perf_counter()
for p in paths:
    with Image.open(p) as im:
        imagehash.phash(im)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "files": len(paths)}))
"""
_LIBRARY = """
import json, os, sys, time
from dinobatch.config import ScanConfig
from dinobatch.jobs.scan import scan_folder
workers = None if sys.argv[3] == "auto" else int(sys.argv[3])
c, t = os.times(), time.perf_counter()
s = scan_folder(ScanConfig(folder=sys.argv[1], output=sys.argv[2], workers=workers))
seconds, d = time.perf_counter() - t, os.times()
cpu = sum(getattr(d, k) - getattr(c, k) for k in ("user", "system", "children_user", "children_system"))
print(json.dumps({"seconds": seconds, "cpu": cpu, "files": s.files, "torch": "torch" in sys.modules}))
"""
# Runs argv, then prints its wall time and the largest ru_maxrss in its process tree (KiB) last.
_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
wall = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(rc.stdout.strip())
print(json.dumps({"rc": rc.returncode, "wall": wall, "tree_cpu": usage.ru_utime + usage.ru_stime,
                  "largest_kib": usage.ru_maxrss}))
"""


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (from /proc; 0 once they are gone)."""
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                stack.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def run_measured(argv: list[str]) -> dict:
    """Run argv in a fresh process tree: its JSON line, wall seconds, peak tree RSS and largest RSS (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *argv], stdout=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            try:
                pids = [int(c) for c in children.read_text().split()]
            except OSError:
                pids = []
            peak[0] = max(peak[0], sum(_tree_rss(c) for c in pids))  # the wrapper itself left out
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    lines = out.strip().splitlines()
    tail = json.loads(lines[-1])
    if tail["rc"] != 0:
        raise SystemExit(f"failed (exit {tail['rc']}): {' '.join(argv)}")
    inner = json.loads(lines[-2]) if len(lines) > 1 and lines[-2].startswith("{") else {}
    return {**inner, "wall": tail["wall"], "tree_cpu": tail["tree_cpu"], "peak_mib": peak[0] / 2**20,
            "largest_mib": tail["largest_kib"] / 1024}


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with the highest memory seen over all of them."""
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_mib": max(r["peak_mib"] for r in runs),
            "largest_mib": max(r["largest_mib"] for r in runs)}


def have_imagededup() -> str | None:
    """None when imagededup is importable here, else the reason it is not."""
    done = subprocess.run([sys.executable, "-c", "import imagededup.methods"], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["import failed"])[-1]


def contenders(folder: Path, workers: str, out: str) -> list[tuple[str, list[str] | str]]:
    """(label, command or the reason it cannot run) of each run compared."""
    py = sys.executable
    cli = [py, "-m", "dinobatch", "scan", str(folder), "-o", out, "-q"]
    cli += [] if workers == "auto" else ["-j", workers]
    return [("imagededup PHash().encode_images", have_imagededup() or [py, "-c", _IMAGEDEDUP, str(folder)]),
            ("Image.open + imagehash.phash loop, 1 process", [py, "-c", _LOOP, str(folder)]),
            (f"dinobatch scan, library call, workers {workers}", [py, "-c", _LIBRARY, str(folder), out, workers]),
            (f"dinobatch scan, CLI (wall incl. start), workers {workers}", cli)]


def measure_folder(folder: Path, workers: str, repeat: int, tmp: Path) -> list[tuple[str, dict | str]]:
    """Each contender's best of `repeat` runs, taken in turns so that a busy spell hits all alike."""
    todo = contenders(folder, workers, str(tmp / "scan.parquet"))
    runs: dict[str, list[dict]] = {label: [] for label, _ in todo}
    for _ in range(repeat):
        for label, argv in todo:
            if isinstance(argv, list):
                r = run_measured(argv)
                if "seconds" not in r:  # the CLI: its whole wall time and the CPU of its process tree
                    r = {**r, "seconds": r["wall"], "cpu": r["tree_cpu"]}
                runs[label].append(r)
    return [(label, argv if isinstance(argv, str) else best_of(runs[label])) for label, argv in todo]


def make_large(folder: Path, megapixels: float) -> None:
    """One JPEG and one PNG of about `megapixels`, 4:3, drawn like the test pictures."""
    from tests.conftest import picture

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    img = picture(72, (width, width * 3 // 4))
    folder.mkdir()
    img.save(folder / "large.jpg", quality=90)
    img.save(folder / "large.png", compress_level=1)


def print_table(title: str, files: int, rows: list[tuple[str, dict | str]]) -> None:
    base = next((r for label, r in rows if label.startswith("imagededup") and isinstance(r, dict)), None)
    print(f"\n{title}")
    print(f"{'run':<52} {'seconds':>7} {'images/s':>8} {'x imagededup':>12} {'CPU s':>6} "
          f"{'x by CPU':>8} {'peak tree MiB':>13} {'largest MiB':>11}")
    for label, r in rows:
        if isinstance(r, str):
            print(f"{label:<52} not measured: {r}")
            continue
        n = r.get("files") or files
        ratio = f"{(n / r['seconds']) / (n / base['seconds']):.2f}" if base else "-"
        by_cpu = f"{base['cpu'] / r['cpu']:.2f}" if base else "-"
        print(f"{label:<52} {r['seconds']:>7.2f} {n / r['seconds']:>8.1f} {ratio:>12} {r['cpu']:>6.2f} "
              f"{by_cpu:>8} {r['peak_mib']:>13.0f} {r['largest_mib']:>11.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(REPO.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--workers", default="auto", help="scan's --workers (default: every usable core)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the fastest is shown")
    ap.add_argument("--large-mp", type=float, default=72.0, help="megapixels of the large-image case (0: skip)")
    ap.add_argument("--scale", type=int, nargs="+", help="numbers of generated files: memory against folder size")
    ap.add_argument("--keep", help="with --scale: keep (and reuse) the generated folders here")
    args = ap.parse_args()
    if args.scale:
        return scale(args.scale, args.workers, args.keep)
    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"benchmark folder not found: {folder}")
    import PIL
    import imagehash

    from dinobatch.jobs.scan import default_scan_workers
    from dinobatch.io.walk import walk

    files = list(walk(folder))
    print(f"machine: {default_scan_workers()} usable cores ({os.cpu_count()} cpus), load average "
          f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}, Pillow {PIL.__version__}, "
          f"imagehash {imagehash.__version__}, imagededup {_version('imagededup')}")
    print(f"folder: {folder} ({len(files)} files, {sum(e.size or 0 for e in files) / 2**20:.0f} MiB); "
          f"best of {args.repeat} runs each")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = measure_folder(folder, args.workers, args.repeat, tmp)
        print_table(f"{folder.name}: {len(files)} files", len(files), rows)
        if args.large_mp > 0:
            make_large(tmp / "large", args.large_mp)
            rows = measure_folder(tmp / "large", args.workers, 1, tmp)
            mp = f"{args.large_mp:g} MP"
            print_table(f"large images: one {mp} JPEG and one {mp} PNG (peak memory)", 2, rows)


def scale(sizes: list[int], workers: str, keep: str | None) -> None:
    """The CLI over generated folders of each size: time, files/s, peak memory and its growth."""
    from incremental import generate

    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep) if keep else Path(tmp)
        print(f"{'files':>8} {'seconds':>8} {'files/s':>8} {'peak tree MiB':>13} {'largest MiB':>11} "
              f"{'largest growth':>14} {'per file':>9}")
        first = None
        for n in sorted(sizes):
            folder = root / f"scan-scale-{n}"
            if not (folder / ".complete").exists():
                generate(folder, n)
                (folder / ".complete").touch()  # hidden: never scanned
            argv = [sys.executable, "-m", "dinobatch", "scan", str(folder), "-o", str(Path(tmp) / "s.parquet"), "-q"]
            r = run_measured(argv + ([] if workers == "auto" else ["-j", workers]))
            first = first or (n, r)
            grown = r["largest_mib"] - first[1]["largest_mib"]
            per_file = f"{grown * 2**20 / (n - first[0]):.0f} B" if n > first[0] else "-"
            print(f"{n:>8} {r['wall']:>8.1f} {n / r['wall']:>8.0f} {r['peak_mib']:>13.0f} {r['largest_mib']:>11.0f} "
                  f"{grown:>+14.0f} {per_file:>9}", flush=True)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
