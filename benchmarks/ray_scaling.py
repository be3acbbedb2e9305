"""classify on a Ray cluster beside the local engine, in one run; and a cost model for millions of files.

    .venv/bin/python benchmarks/ray_scaling.py [FOLDER] [--limit 120] [--rounds 1] [--json FIT.json]
    .venv/bin/python benchmarks/ray_scaling.py --simulate 10000000 [--fit FIT.json] [--nodes 1,2,4,8,16]

Measure mode. FOLDER defaults to ../shared/data/dinos (a sample of --limit files is linked, never
copied). The model is a random ResNet18 with 15 classes and the default preprocessing (speed does
not depend on the weights). Rows, each `python -m dinobatch classify` as a user runs it (imports,
model load, walk, sha256, decode, hashes, model, duplicates, Parquet), fresh output, wall seconds:
  local           --engine local (default options: every core of this machine)
  ray, 1 node     --engine ray --address ADDR, a ray.cluster_utils.Cluster head of one CPU
  ray, 2 nodes    the same cluster with a second one-CPU node added
A one-CPU node runs one model actor (one torch thread) beside one decode task, as engines.ray sizes
them. Each node is pinned to a core of its own (--pin, the default where the machine has 2 cores or
more: the node's processes, and the Ray workers they start, inherit the CPU affinity they were
started with), and the Ray rows' driver (the classify process) runs on the head's core, as it would
on the head machine of a real cluster: "1 node" is one core doing everything, "2 nodes" two, as two
one-core machines would be. --no-pin lets every process use every core (the nodes then share them,
and the one-node row gets the second core's help). The local row is never pinned (every core).
Other processes' load changes every row: each row prints the load average (1 min) before and after.
Each setting also prints every core's busy share during its timed runs (/proc/stat: all processes'
work): a pinned node's core that is not near 100% waited for work, which the wall clock cannot tell.
--copies K makes the folder K times larger at run time, in a temporary folder that is removed after:
each file once as it is (linked) and K-1 times re-encoded as JPEG (qualities 92, 88, ...: new
contents of the same pixels, so nothing is answered from the cache and decoding costs about the
same), for a run long enough that the model actors' start stops dominating.
Each setting also runs once on a quarter of the sample (--small): the per-file rate beyond that run,
(files - small files) / (wall - small wall), is the engine's throughput once started (the fixed cost:
imports, connecting, starting the model actors and loading the model, cancels out); the wall-clock
rate over the whole sample is printed beside it. Then the stage costs on one core, in this process (read + sha256,
decode + hashes + model input, the model's forward pass, the rows' Parquet write), are fitted with
the runs into a cost model (printed; --json saves it for --simulate).

Simulate mode: expected hours for N files on K GPU nodes from that model (or, without --fit,
from figures measured on 2026-12-04; see docs/performance.md). Assumptions, all printed: a GPU
node's model throughput is the H200's measured ResNet50 bf16 ceiling (--gpu-img-s); each node
decodes on --decode-cores cores at this machine's per-core decode cost; per-block overheads are
paid by the nodes in parallel; the driver alone lists, commits, writes the rows and runs the
duplicate search over the gathered hashes (16 bytes a file). Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
SPECIES = REPO / "manifests" / "species.csv"
HASH_BYTES = 16  # what the driver gathers per file for the duplicate search: pHash and dHash, 8 bytes each
# Files per Ray block, as dinobatch.engines.ray cuts them (fingerprint tasks; decode tasks).
FINGERPRINT_BLOCK, DECODE_BLOCK = 512, 16


@dataclass
class Fit:
    """Per-file costs (one core, seconds), per-block overhead and fixed costs: the cost model's inputs."""

    list: float  # the driver's walk (listing and stat), per file
    read: float  # read the bytes and sha256 them
    decode: float  # decode once: facts, hashes and the model input
    model_cpu: float  # the model's forward pass on one CPU core (for reference; GPU nodes use --gpu-img-s)
    write: float  # the driver's share: the rows' Parquet and the cache commit
    block: float  # per Ray block (task scheduling, Arrow hand-over), beyond the per-file costs
    fixed_local: float  # a local run's seconds for 0 files (start, model load), from two folder sizes
    fixed_ray: float  # a Ray run's seconds for 0 files (connect, actors, model load on them), the same way
    dedupe_per_million: float  # near_pairs over random hashes, seconds per million files
    measured: str  # where and when


# Measured on 2026-12-04 on the development machine (2 cores, shared, no GPU) by this script's measure mode
# (--limit 600 --rounds 1, the 600 JPEGs of the development set). The per-block overhead did not separate
# from the run-to-run noise there (fitted 0): rerun measure mode on a quiet machine for it.
DEFAULT_FIT = Fit(list=0.000089, read=0.000360, decode=0.007393, model_cpu=0.048758, write=0.000005, block=0.0,
                  fixed_local=6.06, fixed_ray=19.36, dedupe_per_million=2.86,
                  measured="benchmarks/ray_scaling.py --limit 600, 2026-12-04, 2 shared cores")


def small_model(path: Path) -> Path:
    """A random ResNet18 with 15 classes, default preprocessing (the package's own model file)."""
    import torch

    from dinobatch.models.file import ModelSpec, build_module, save_model

    torch.manual_seed(0)
    labels = tuple(f"class_{i}" for i in range(15))
    save_model(path, ModelSpec("resnet18", labels, source={"kind": "benchmark"}), build_module("resnet18", 15).state_dict())
    return path


def cpu_times() -> dict[str, tuple[int, int]]:
    """(busy, total) clock ticks of each core since boot, from /proc/stat (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in ticks]
            idle = values[3] + values[4]  # idle + iowait
            out[name[3:]] = (sum(values[:8]) - idle, sum(values[:8]))
    return out


def busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> str:
    """Each core's busy share between two cpu_times() (every process's work, this run's and others')."""
    shares = []
    for core, (b1, t1) in sorted(after.items(), key=lambda kv: int(kv[0])):
        b0, t0 = before.get(core, (b1, t1))
        shares.append(f"core {core} {100 * (b1 - b0) / max(1, t1 - t0):.0f}%")
    return ", ".join(shares)


BUSY: dict[str, str] = {}  # each timed run's per-core busy shares, by its output folder's name


def classify(folder: Path, out: Path, model: Path, engine: str, address: str | None = None,
             cores: set[int] | None = None) -> float:
    """Wall seconds of `python -m dinobatch classify` as a user runs it (on cores, where given: the head's);
    raises RuntimeError if it fails. Each core's busy share during the run goes to BUSY."""
    args = [sys.executable, "-m", "dinobatch", "classify", str(folder), "-o", str(out), "-m", str(model), "-q",
            "--species", str(SPECIES), "--engine", engine, *(["--address", address] if address else []),
            "--summary-json", str(out.parent / f"{out.name}.json")]
    ticks, t = cpu_times(), time.perf_counter()
    done = subprocess.run(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    wall = time.perf_counter() - t
    BUSY[out.name] = busy(ticks, cpu_times())
    if done.returncode != 0:
        raise RuntimeError(f"classify --engine {engine} exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads((out.parent / f"{out.name}.json").read_text())
    if summary["reused"]:  # an answer from a cache is not a measurement of the engine
        raise RuntimeError(f"classify --engine {engine} reused {summary['reused']} cached predictions")
    return wall


def runs(tag: str, folders: tuple[Path, Path, Path], model: Path, tmp: Path, rounds: int,
         address: str | None = None, cores: set[int] | None = None) -> tuple[float, float]:
    """(seconds on the small folder, median seconds on the sample) for one engine setting, after an untimed
    run on 4 other files (the first run on fresh nodes starts their worker processes) (tag:
    local, ray-1, ray-2), each run into its own fresh output: a shared one would answer from its cache."""
    engine, load = tag.split("-")[0], os.getloadavg()[0]
    classify(folders[2], tmp / f"warm-{tag}", model, engine, address, cores)  # first run on fresh nodes: not timed
    fixed = classify(folders[0], tmp / f"fixed-{tag}", model, engine, address, cores)
    walls = [classify(folders[1], tmp / f"out-{tag}-{r}", model, engine, address, cores) for r in range(rounds)]
    print(f"  {tag}: load average {load:.1f} before, {os.getloadavg()[0]:.1f} after; busy during the full "
          f"runs: {'; '.join(BUSY[f'out-{tag}-{r}'] for r in range(rounds))}", flush=True)
    return fixed, statistics.median(walls)


def stage_costs(paths: list[Path], model: Path) -> dict[str, float]:
    """Seconds per file on one core of read + sha256, decode (facts, hashes, model input), the forward pass."""
    import torch

    from dinobatch.imaging.decode import decode
    from dinobatch.imaging.preprocess import model_input
    from dinobatch.models.file import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    prep = loaded.spec.preprocessing
    t, blobs = time.perf_counter(), []
    for p in paths:
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        blobs.append(data)
    read = (time.perf_counter() - t) / len(paths)
    t = time.perf_counter()
    for data in blobs:
        model_input(decode(data, min_side=prep.resize).image, prep)
    decode_s = (time.perf_counter() - t) / len(paths)
    module, x = loaded.module.eval(), torch.randn(32, 3, prep.crop, prep.crop)
    with torch.inference_mode():
        module(x)
        t = time.perf_counter()
        for _ in range(3):
            module(x)
    return {"read": read, "decode": decode_s, "model_cpu": (time.perf_counter() - t) / 96}


def write_cost(out: Path) -> float:
    """Seconds per row to write the rows' Parquet again (the driver's serial share), from a run's output."""
    import pyarrow.parquet as pq

    rows = max(out.rglob("*.parquet"), key=lambda p: p.stat().st_size)
    table = pq.read_table(rows)
    t = time.perf_counter()
    pq.write_table(table, out / "rewrite.parquet.tmp")
    return (time.perf_counter() - t) / max(1, table.num_rows)


def dedupe_cost(n: int = 200_000) -> float:
    """Seconds per million files of near_pairs (pHash at the default distance) over n random hashes."""
    import numpy as np

    from dinobatch.dedupe import DEFAULT_PHASH_MAX
    from dinobatch.dedupe.hamming import near_pairs

    hashes = np.random.default_rng(0).integers(0, 2 ** 63, n, dtype=np.int64).astype(np.uint64)
    t = time.perf_counter()
    near_pairs(hashes, DEFAULT_PHASH_MAX)
    return (time.perf_counter() - t) * 1e6 / n


def list_cost(folder: Path) -> float:
    """Seconds per file of the driver's walk of folder (listing and stat, as classify starts)."""
    from dinobatch.io.walk import walk_table

    t = time.perf_counter()
    n = walk_table(folder).num_rows
    return (time.perf_counter() - t) / max(1, n)


def blocks(files: float) -> float:
    """Ray blocks a run of this many new files makes (fingerprint blocks and decode blocks)."""
    return -(-files // FINGERPRINT_BLOCK) + -(-files // DECODE_BLOCK)


def with_copies(paths: list[Path], dest: Path, copies: int) -> list[Path]:
    """paths, then copies-1 re-encoded JPEG versions of each (new contents, same pixels) written to dest."""
    from PIL import Image, ImageOps

    out = list(paths)
    dest.mkdir()
    for k in range(1, copies):
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                target = dest / f"{k}-{i:05d}.jpg"
                ImageOps.exif_transpose(im).convert("RGB").save(target, quality=96 - 4 * k)
                out.append(target)
    return out


def link_sample(paths: list[Path], dest: Path) -> Path:
    """paths linked (never copied) into dest."""
    dest.mkdir()
    for i, p in enumerate(paths):
        os.symlink(p, dest / f"{i:05d}{p.suffix}")
    return dest


def measure(args: argparse.Namespace) -> None:
    """The three engine settings side by side on one sample, the stage costs, and the fit."""
    from classify import sample_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = sample_folder(Path(args.folder), tmp / "real", args.limit)
        paths = with_copies(paths, tmp / "copies", args.copies)
        link_sample(paths, tmp / "in")
        small = args.small if args.small is not None else max(4, len(paths) // 4)
        folders = (link_sample(paths[:small], tmp / "in-small"), tmp / "in", link_sample(paths[-4:], tmp / "in-warm"))
        model = small_model(tmp / "resnet18.pt")
        walls: dict[str, tuple[float, float] | str] = {"local": runs("local", folders, model, tmp, args.rounds)}
        print(f"local: {walls['local'][1]:.2f} s", flush=True)
        if not args.local_only:
            walls.update(ray_runs(folders, model, tmp, args.rounds, pin=args.pin))
        costs = stage_costs(paths[:args.stage_files], model)
        fit = fit_costs(costs, walls, n=len(paths), small=small, list_s=list_cost(folders[1]),
                        write=write_cost(tmp / "out-local-0"))
    print_measured(walls, len(paths), small, fit)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(fit), indent=1) + "\n")
        print(f"fit saved to {args.json} (use: --simulate N --fit {args.json})")


@contextmanager
def started_on(cores: set[int] | None) -> Iterator[None]:
    """Processes started inside run on cores (CPU affinity is inherited); None: no change."""
    before = os.sched_getaffinity(0) if cores else None
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        if before:
            os.sched_setaffinity(0, before)


def cluster_config(node_cpus: int) -> dict[str, int]:
    """The Ray system config docs/cluster.md recommends (engines.ray_common.worker_config), or Ray's defaults
    with --ray-defaults."""
    from dinobatch.engines.ray_common import worker_config

    return {} if RAY_DEFAULTS else worker_config(node_cpus)


RAY_DEFAULTS = False  # --ray-defaults


def ray_runs(folders: tuple[Path, Path, Path], model: Path, tmp: Path, rounds: int,
             pin: bool = True) -> dict[str, tuple[float, float] | str]:
    """Ray on a one-CPU head, then with a second one-CPU node (each on a core of its own where pin, the
    driver on the head's); a failed run's row is its error."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 256 << 20}
    first, second = sorted(os.sched_getaffinity(0))[:2]
    head_core, worker_core = ({first}, {second}) if pin else (None, None)
    out: dict[str, tuple[float, float] | str] = {}
    with started_on(head_core):  # the head's system config is the cluster's (docs/cluster.md: worker reuse)
        cluster = Cluster(initialize_head=True, head_node_args={**node, "_system_config": cluster_config(1)})
    try:
        for nodes, name in ((1, "ray, 1 node"), (2, "ray, 2 nodes")):
            if nodes == 2:
                with started_on(worker_core):
                    cluster.add_node(**node)
                cluster.wait_for_nodes()
            try:
                out[name] = runs(f"ray-{nodes}", folders, model, tmp, rounds, address=cluster.address,
                                 cores=head_core)
                print(f"{name}: {out[name][1]:.2f} s", flush=True)
            except RuntimeError as exc:
                out[name] = str(exc)
                print(f"{name}: FAILED\n{exc}", flush=True)
    finally:
        cluster.shutdown()
    return out


def fit_costs(costs: dict[str, float], walls: dict, *, n: int, small: int, list_s: float, write: float) -> Fit:
    """The cost model's inputs: stage costs as measured; each engine's fixed cost, the two runs' line
    (small files, n files) taken back to 0 files; and the per-block overhead that makes the one-node Ray
    run's per-file time (one CPU does every stage) come out as measured."""
    def fixed(got: tuple[float, float]) -> float:
        return max(0.0, got[0] - small * (got[1] - got[0]) / (n - small))

    one = walls.get("ray, 1 node")
    fixed_ray, block = DEFAULT_FIT.fixed_ray, DEFAULT_FIT.block
    if isinstance(one, tuple):
        fixed_ray = fixed(one)
        per_file = costs["read"] + costs["decode"] + costs["model_cpu"] + write + list_s
        block = max(0.0, ((one[1] - one[0]) / (n - small) - per_file) * n / blocks(n))
    return Fit(list=list_s, write=write, block=block, fixed_local=fixed(walls["local"]), fixed_ray=fixed_ray,
               dedupe_per_million=dedupe_cost(), measured=f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores",
               **costs)


def print_measured(walls: dict, n: int, small: int, fit: Fit) -> None:
    """The engines side by side (images/s over the whole run, and beyond the small run), ratios, the fit."""
    local = walls["local"]
    print(f"\n{'setting':<14} {'wall s':>8} {'images/s':>9} {f'wall s ({small})':>14} {'images/s beyond':>16}"
          f"   ({n} files; the last column: (files - {small}) / (wall - wall on {small}))")
    rate: dict[str, float] = {}
    for name, got in walls.items():
        if isinstance(got, str):
            print(f"{name:<14} {'failed':>8}")
            continue
        fixed, wall = got
        if wall > fixed:
            rate[name] = (n - small) / (wall - fixed)
        beyond = f"{rate[name]:16.2f}" if name in rate else f"{'n/a (noise)':>16}"
        print(f"{name:<14} {wall:8.2f} {n / wall:9.2f} {fixed:14.2f} {beyond}")
    one, two = walls.get("ray, 1 node"), walls.get("ray, 2 nodes")
    if isinstance(one, tuple) and isinstance(two, tuple):
        print(f"ray 2 nodes / ray 1 node: {one[1] / two[1]:.2f}x wall clock", end="")
        if "ray, 1 node" in rate and "ray, 2 nodes" in rate:
            print(f", {rate['ray, 2 nodes'] / rate['ray, 1 node']:.2f}x images/s beyond the fixed cost", end="")
        print(" (goal >= 1.7)")
    if isinstance(two, tuple):
        print(f"ray 2 nodes / local (2 cores): {local[1] / two[1]:.2f}x wall clock", end="")
        if "ray, 2 nodes" in rate and "local" in rate:
            print(f", {rate['ray, 2 nodes'] / rate['local']:.2f}x images/s beyond the fixed cost", end="")
        print(f" (goal >= 0.8); Ray's overhead over local: {two[1] - local[1]:+.2f} s ({two[1] / local[1] - 1:+.0%})")
    print("\nfit (seconds; per file on one core unless said):")
    for key, value in asdict(fit).items():
        print(f"  {key:<20} {value if isinstance(value, str) else f'{value:.6f}'}")


def simulate(args: argparse.Namespace) -> None:
    """Expected hours for N files on K GPU nodes, with every assumption printed."""
    fit = Fit(**json.loads(Path(args.fit).read_text())) if args.fit else DEFAULT_FIT
    n, crop = args.simulate, 224
    decode_rate = args.decode_cores / (fit.read + fit.decode)
    node_rate = min(args.gpu_img_s, decode_rate)
    serial = fit.fixed_ray + n * (fit.list + fit.write) + n / 1e6 * fit.dedupe_per_million
    print(f"cost model from: {fit.measured}")
    print(f"assumptions: a GPU node's model throughput {args.gpu_img_s:,.0f} img/s (H200, ResNet50 bf16 ceiling, "
          f"docs/performance.md); {args.decode_cores} decode cores a node at {1 / (fit.read + fit.decode):.0f} "
          f"img/s a core (read {fit.read * 1e3:.2f} ms + decode {fit.decode * 1e3:.2f} ms, this machine's files) "
          f"= {decode_rate:,.0f} img/s; per-block overhead {fit.block * 1e3:.1f} ms over {blocks(n):,.0f} blocks, "
          f"paid by the nodes in parallel; the driver lists ({fit.list * 1e6:.0f} us/file), writes rows "
          f"({fit.write * 1e6:.0f} us/file) and runs near_pairs ({fit.dedupe_per_million:.1f} s a million "
          f"random hashes, linear) alone: {serial / 3600:.2f} h that no node count shortens")
    print(f"gather to the driver for the duplicate search: {HASH_BYTES} B x {n:,} = {HASH_BYTES * n / 1e6:,.0f} MB; "
          f"model input through the object store: {crop * crop * 3} B a file = {crop * crop * 3 * n / 1e12:.2f} TB")
    print(f"\n{'GPU nodes':>9} {'img/s a node':>13} {'bound by':>9} {'cluster h':>10} {'driver h':>9} {'total h':>8}")
    for k in args.nodes:
        cluster = n / (k * node_rate) + blocks(n) * fit.block / k
        print(f"{k:>9} {node_rate:13,.0f} {'decode' if decode_rate < args.gpu_img_s else 'GPU':>9} "
              f"{cluster / 3600:10.2f} {serial / 3600:9.2f} {(cluster + serial) / 3600:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(REPO.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--limit", type=int, default=120, help="files of FOLDER in the sample")
    ap.add_argument("--rounds", type=int, default=1, help="runs per setting (median)")
    ap.add_argument("--copies", type=int, default=1, help="the sample K times over (K-1 re-encoded copies)")
    ap.add_argument("--small", type=int, help="files of the small run (default: a quarter of the sample, at least 4)")
    ap.add_argument("--stage-files", type=int, default=60, help="files timed stage by stage")
    ap.add_argument("--local-only", action="store_true", help="the local engine only (no Ray)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2,
                    help="each Ray node on a core of its own, the driver on the head's (default: with 2 cores or more)")
    ap.add_argument("--ray-defaults", action="store_true",
                    help="start the test cluster with Ray's default system config, not docs/cluster.md's")
    ap.add_argument("--json", help="save the fitted cost model here")
    ap.add_argument("--simulate", type=int, metavar="N", help="print the cost model's hours for N files")
    ap.add_argument("--fit", help="a cost model saved by --json (default: the figures of 2026-12-04)")
    ap.add_argument("--nodes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16])
    ap.add_argument("--gpu-img-s", type=float, default=15_843.0, help="a GPU node's model throughput")
    ap.add_argument("--decode-cores", type=int, default=15, help="decoding cores a GPU node (cores-1 of 16)")
    args = ap.parse_args()
    global RAY_DEFAULTS
    RAY_DEFAULTS = args.ray_defaults
    simulate(args) if args.simulate else measure(args)


if __name__ == "__main__":
    main()
