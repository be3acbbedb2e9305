"""Kill classify (and scan) with SIGKILL at random moments over a real folder; check that nothing is
lost or doubled and that no worker outlives its run.

    .venv/bin/python benchmarks/crash.py [FOLDER] [--kills 20] [--fresh-kills 10] [--scan-kills 10]
                                         [--limit 120] [--seed 0]

FOLDER defaults to ../shared/data/dinos (read in place; a sample is linked, never copied). The model is
a random resnet18 at 64 px (what is checked is bookkeeping, not accuracy). After each kill the visible
output is checked (every rows file readable, one row per file, no half-written visible file); after
the last kill a run completes and its current rows must equal those of an uninterrupted run.

Each run starts in a session of its own with its stdout and stderr on pipes, as under cron. After
each kill: how long until both pipes are closed (every process holding them gone), and how many
processes of the run (its process group, or workers re-parented to init) are alive 1 s after the
kill; those are then killed, so that one failure does not spoil the next measurement. As the kills
above leave less and less to infer, --fresh-kills more runs on empty outputs, and --scan-kills
scans, are killed at a random moment once their workers are running.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COMPARED = ("path", "sha256", "status", "error", "label", "probs", "duplicate_of")


ORPHAN_GRACE_S = 1.0  # how soon after the kill the run's processes must be gone and its pipes closed


def run(folder: Path, out: Path, model: Path) -> subprocess.Popen:
    return start(["classify", str(folder), "-o", str(out), "-m", str(model), "-b", "8", "-q"])


def start(args: list[str]) -> subprocess.Popen:
    """dinobatch ARGS in a session of its own (its pid is the session id), output on pipes."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    return subprocess.Popen([sys.executable, "-m", "dinobatch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen) -> int:
    """Wait for a run that is not killed, reading its output; its exit code."""
    proc.communicate()
    return proc.returncode


def session(sid: int) -> list[int]:
    """Live processes (zombies hold nothing) whose session is sid: the killed run's group and any
    worker of it re-parented to init."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split() if stat else []
        if fields and int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


def pipes_closed_after(proc: subprocess.Popen, limit: float) -> float | None:
    """Seconds until both of proc's pipes reach end-of-file (their output dropped); None past limit."""
    t0 = time.monotonic()
    pipes = [proc.stdout, proc.stderr]
    while pipes:
        left = limit - (time.monotonic() - t0)
        if left <= 0:
            return None
        for pipe in select.select(pipes, [], [], left)[0]:
            if not os.read(pipe.fileno(), 65536):
                pipes.remove(pipe)
    return time.monotonic() - t0


def kill_and_count(proc: subprocess.Popen) -> tuple[int, str, int]:
    """SIGKILL proc (if still running); how many other processes the run had then (its workers),
    when its pipes closed (s, or '>1.0') and how many of its processes were alive ORPHAN_GRACE_S
    later. Whatever is left is killed."""
    workers = len([pid for pid in session(proc.pid) if pid != proc.pid])
    killed_at = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    closed = pipes_closed_after(proc, ORPHAN_GRACE_S - (time.monotonic() - killed_at))
    time.sleep(max(0.0, ORPHAN_GRACE_S - (time.monotonic() - killed_at)))
    left = session(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    proc.stdout.close()
    proc.stderr.close()
    return workers, (f"{closed:.2f}" if closed is not None else f">{ORPHAN_GRACE_S:.1f}"), len(left)


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
    from dinobatch.store.runs import current_rows

    return {r["path"]: tuple(str(r[k]) for k in COMPARED) for r in current_rows(out).to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--fresh-kills", type=int, default=10, help="classify kills, each on an empty output")
    ap.add_argument("--scan-kills", type=int, default=10)
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model
    from dinobatch.io.walk import walk

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
    assert finish(run(sample, tmp / "reference", model)) == 0
    full = time.monotonic() - t
    print(f"uninterrupted run over {args.limit} real files: {full:.1f} s")
    rng = random.Random(args.seed)
    out = tmp / "out"
    orphaned = kill_classify(sample, lambda k: out, model, args.kills, lambda proc: time.sleep(rng.uniform(0.5, full)))
    assert finish(run(sample, out, model)) == 0
    same = current(out) == current(tmp / "reference")
    print(f"\nafter {args.kills} kills and one complete run: current rows "
          f"{'EQUAL' if same else 'DIFFER FROM'} the uninterrupted run's ({len(current(out))} files)")
    if args.fresh_kills:  # the runs above reuse the cache more and more: these are killed while inferring
        print("\nclassify, each kill on an empty output, at a random moment once its workers are running:")
        orphaned += kill_classify(sample, lambda k: tmp / f"fresh{k}", model, args.fresh_kills,
                                  lambda proc: working(proc, full, rng.uniform(0, full / 4)))
    if args.scan_kills:
        orphaned += kill_scan(sample, tmp / "scan.parquet", args.scan_kills, rng)
    print(f"runs that left a process alive or a pipe open {ORPHAN_GRACE_S:.0f} s after the kill: {orphaned}")
    sys.exit(0 if same and not orphaned else 1)


HEADER = f"{'kill':>4} {'after s':>8} {'workers':>7} {'pipes closed s':>14} {'left':>4}"


def working(proc: subprocess.Popen, limit: float, then: float) -> None:
    """Wait until proc has forked a worker (or has exited, or `limit` s have passed), then `then` s."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline and len(session(proc.pid)) < 2:
        time.sleep(0.02)
    time.sleep(then)


def kill_classify(sample: Path, output: Callable[[int], Path], model: Path, kills: int,
                  wait: Callable[[subprocess.Popen], None]) -> int:
    """Kill classify `kills` times, kill k writing to output(k), once wait(run) returns; print what
    each kill left; the runs that left a process alive or a pipe open."""
    print(f"{HEADER} {'cache parts':>11} {'rows files':>10}  visible output")
    orphaned = 0
    for k in range(1, kills + 1):
        out = output(k)
        t = time.monotonic()
        proc = run(sample, out, model)
        wait(proc)
        delay = time.monotonic() - t
        finished = proc.poll() is not None
        workers, closed, left = kill_and_count(proc)
        orphaned += closed.startswith(">") or left > 0
        parts = len(list((out / "_cache").rglob("part-*.parquet"))) if out.exists() else 0
        rows = len(list(out.glob("*.parquet"))) if out.exists() else 0
        state = "finished before the kill" if finished else check(out) if out.exists() else "nothing yet"
        print(f"{k:>4} {delay:>8.2f} {workers:>7} {closed:>14} {left:>4} {parts:>11} {rows:>10}  {state}")
    return orphaned


def kill_scan(sample: Path, output: Path, kills: int, rng: random.Random) -> int:
    """Kill scan `kills` times while it hashes (its workers running); the runs that left a process
    alive or a pipe open. The output, replaced whole, must never be a half-written file."""
    import pyarrow.parquet as pq

    t = time.monotonic()
    assert finish(start(["scan", str(sample), "-o", str(output), "-q"])) == 0
    full = time.monotonic() - t
    print(f"\nscan, uninterrupted: {full:.1f} s; killed at a random moment once its workers are running:"
          f"\n{HEADER}  output")
    orphaned = 0
    for k in range(1, kills + 1):
        t = time.monotonic()
        proc = start(["scan", str(sample), "-o", str(output), "-q"])
        working(proc, full, rng.uniform(0, full / 4))
        delay = time.monotonic() - t
        finished = proc.poll() is not None
        workers, closed, left = kill_and_count(proc)
        orphaned += closed.startswith(">") or left > 0
        rows = pq.read_metadata(output).num_rows  # the previous output, intact, or a complete new one
        print(f"{k:>4} {delay:>8.2f} {workers:>7} {closed:>14} {left:>4}  "
              f"{'finished before the kill, ' if finished else ''}{rows} rows, readable")
    return orphaned


if __name__ == "__main__":
    main()
