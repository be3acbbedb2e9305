"""`dinobatch classify` on CPU beside the model's own ceiling and a timm-style loop, in one run; with
--precisions, the same for bf16 autocast and an int8 model, beside the decode-only ceiling.

    .venv/bin/python benchmarks/classify.py [FOLDER] [--limit N] [--batch-size 32] [--repeats 3]
    .venv/bin/python benchmarks/classify.py FOLDER --limit 300 --precisions fp32,bf16,int8 [--compile]

FOLDER defaults to ../shared/data/dinos (read in place; a sample is linked, never copied). The
model is a randomly initialised torchvision ResNet50 with 15 classes (speed depends on the
architecture, not the weights), the same in every row. dinobatch's process settings
(device.tune_process: glibc allocator, threads) are applied once at the start, so every row runs
under them; the first row repeats the ceiling without them in a subprocess, for comparison.

Rows (images/s; ratio = row / ceiling):
  ceiling       forward pass only, random tensors, channels-last, after warm-up (median of repeats)
  timm-style    PIL full decode + torchvision Resize/CenterCrop/ToTensor/Normalize in a DataLoader
                with 2 workers, channels-last model: what a hand-written inference script does
  dinobatch     classify() end to end with default options on the sample: wall time from call to
                return (walk, sha256, decode, hashes, model, duplicates, Parquet), fresh output

With --precisions (fp32 always measured first in each round, as the baseline of the others):
  ceiling P     the forward pass as classify runs it at precision P (Runtime.autocast: bf16 autocast;
                int8: the int8 model file's module), random tensors, channels-last
  decode        the decode ceiling: sha256 of every file and the decode stage (facts, hashes, model
                input) in classify's burst pool on every core, no model: what classify can reach at best
  e2e P         classify() end to end at precision P (--precision bf16; int8: `dinobatch model quantize`
                of the same model, calibrated on the sample), with the share of its time in the model
  goals         bf16 e2e / fp32 e2e, int8 e2e / fp32 e2e, and each e2e / min(its ceiling, decode)
  / shared      e2e / 1/(1/ceiling + 1/decode): the bound where decode and model take turns on the same
                cores, as on a CPU-only machine, where min(ceiling, decode) is out of reach (each
                ceiling is measured on every core, so the two cannot both run at their ceilings)
  --compile     fp32 (and int8) e2e with classify --compile: compile time included, as a run pays it
  --split-workers K   each precision's e2e again with -j K: K decode processes beside the model instead of
                the burst pool (every core decodes, then the model runs on every core): the core split
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

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
    from dinobatch.config import ClassifyConfig
    from dinobatch.jobs.classify import classify

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


PRECISIONS = ("fp32", "bf16", "int8")


def int8_file(model: Path, sample: Path, out: Path) -> Path:
    """The int8 model file of model (`dinobatch model quantize`, calibrated on the sample)."""
    cmd = [sys.executable, "-m", "dinobatch", "model", "quantize", str(model), "--calibration", str(sample),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        sys.exit(f"`dinobatch model quantize` failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return out


def module_rate(module, precision: str, batch_size: int, batches: int, repeats: int, crop: int = 224,
                compile: bool = False) -> tuple[float, float]:
    """Model-only images/s of module as classify runs it at precision (Runtime.prepare and autocast;
    int8: the int8 graph in fp32 autocast), random input, median of repeats; and the seconds of the
    first call (warm-up; with compile, the compile)."""
    import functools

    import torch

    from dinobatch.models.forward import forward_with_features
    from dinobatch.runtime.device import Runtime

    runtime = Runtime(torch.device("cpu"), "fp32" if precision == "int8" else precision)
    module = runtime.prepare(module)
    forward = functools.partial(forward_with_features, module)  # (logits, features), as the Predictor runs it
    if compile:
        forward = torch.compile(forward, dynamic=False)
    x = torch.randn(batch_size, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    rates = []
    with runtime.autocast():
        t = time.perf_counter()
        forward(x)  # warm-up: oneDNN primitives, the allocator's first growth (and the compile)
        first = time.perf_counter() - t
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(batches):
                forward(x)
            rates.append(batch_size * batches / (time.perf_counter() - t))
    return statistics.median(rates), first


def decode_rate(paths: list[Path], batch_size: int) -> float:
    """The decode ceiling, files/s: sha256 of every file, then the decode stage (facts, pHash/dHash,
    224 px model input) of each content in classify's burst pool on every core, and no model."""
    import hashlib

    from dinobatch.engines.local import ImageDataset, decoded_batches
    from dinobatch.models.file import Preprocessing
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.stages.decode import WorkItem

    t = time.perf_counter()
    contents: dict[str, list[str]] = {}
    for p in paths:
        contents.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(str(p))
    items = [WorkItem(tuple(files), sha) for sha, files in contents.items()]
    for _ in decoded_batches(ImageDataset(items, Preprocessing()), resolve_runtime("cpu", "fp32"), batch_size, None):
        pass
    return len(paths) / (time.perf_counter() - t)


@contextlib.contextmanager
def model_clock() -> Iterator[list[float]]:
    """Seconds classify spends in its Predictor's forward passes (the rest is walk, sha256, decode,
    duplicates, rows)."""
    from dinobatch.stages import infer

    call, spent = infer.Predictor.__call__, [0.0]

    def timed(self, x):
        t = time.perf_counter()
        try:
            return call(self, x)
        finally:
            spent[0] += time.perf_counter() - t

    infer.Predictor.__call__ = timed
    try:
        yield spent
    finally:
        infer.Predictor.__call__ = call


def _module(precision: str, model: Path, int8: Path | None):
    """The network a precision's ceiling runs: the model file's, or the int8 file's."""
    from dinobatch.models.file import load_model

    return load_model(int8 if precision == "int8" else model).module


def _e2e(precision: str, sample: Path, model: Path, int8: Path | None, out: Path,
         compile: bool = False, workers: int | None = None) -> tuple[float, float]:
    """classify() end to end at precision into a fresh out (with -j workers where given): images/s and the
    model's share of the wall time."""
    n = len(list(sample.iterdir()))
    # the int8 file as a user runs it: --precision auto
    ref, options = (int8, {"compile": compile}) if precision == "int8" else (model, {"precision": precision,
                                                                                   "compile": compile})
    options["workers"] = workers
    with model_clock() as spent:
        wall, _ = dinobatch_run(sample, ref, out, **options)
    return n / wall, spent[0] / wall


def precision_rounds(args, folder: Path) -> None:
    """--precisions: each precision's model ceiling and classify end to end beside fp32's of the same
    round, and the decode ceiling of the same round; then the goals' ratios and, with --compile, the
    compiled rows."""
    wanted = ["fp32"] + [p for p in args.precisions.split(",") if p in PRECISIONS and p != "fp32"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "resnet50-random.pt")
        paths = sample_folder(folder, tmp / "sample", args.limit)
        int8 = int8_file(model, tmp / "sample", tmp / "resnet50-int8.pt") if "int8" in wanted else None
        print(f"{len(paths)} files; int8 model: {int8 or 'not asked'}", flush=True)
        rounds = []
        for r in range(args.repeats):  # this machine drifts: each precision's e2e sits between its own ceilings
            got: dict[str, tuple[float, float, float]] = {"decode": (decode_rate(paths, args.batch_size), 0, 0)}
            for p in wanted:
                module = _module(p, model, int8)
                before, _ = module_rate(module, p, args.batch_size, args.ceiling_batches, 2)
                e2e, share = _e2e(p, tmp / "sample", model, int8, tmp / f"out-{p}-{r}")
                split = {k: _e2e(p, tmp / "sample", model, int8, tmp / f"out-{p}-{r}-j{k}", workers=k)
                         for k in args.split_workers}
                after, _ = module_rate(module, p, args.batch_size, args.ceiling_batches, 2)
                got[p] = ((before + after) / 2, e2e, share)
                got.update({f"{p} -j {k}": ((before + after) / 2, *rate) for k, rate in split.items()})
            rounds.append(got)
            print(f"round {r + 1}: " + "; ".join(f"{k} ceiling {v[0]:.2f} e2e {v[1]:.2f}" if k != "decode"
                                                  else f"decode {v[0]:.2f}" for k, v in got.items()), flush=True)
        print_precision_table(rounds, wanted, len(paths), args.batch_size)
        if args.compile:
            compile_rows(wanted, model, int8, tmp, paths, args)


def shared_bound(model: float, decode: float) -> float:
    """images/s at best when decoding and the model take turns on the same cores (a CPU-only machine: each
    ceiling already uses every core): each file costs 1/decode + 1/model seconds of the whole machine."""
    return 1 / (1 / model + 1 / decode)


def print_precision_table(rounds: list[dict], wanted: list[str], n: int, bs: int) -> None:
    """Medians over rounds, each precision beside fp32 and beside the lower of its ceiling and decode's."""
    def med(key: str, i: int) -> float:
        return statistics.median(r[key][i] for r in rounds)

    decode = med("decode", 0)
    print(f"\nResNet50 (random weights), batch {bs}, CPU, {n} files; medians of {len(rounds)} rounds")
    print(f"{'measure':<58} {'img/s':>8} {'x fp32':>7} {'/ bound':>8} {'model %':>8} {'/ shared':>9}")
    print(f"{'decode ceiling: sha256 + decode stage, burst pool, no model':<58} {decode:>8.2f}")
    for p in wanted:
        print(f"{'ceiling ' + p + ': forward only, channels-last, tuned':<58} {med(p, 0):>8.2f} "
              f"{med(p, 0) / med('fp32', 0):>7.2f}")
    for p in [k for k in rounds[0] if k != "decode"]:  # each precision, then its -j rows
        bound = min(med(p, 0), decode)
        ratio = statistics.median(r[p][1] / min(r[p][0], r["decode"][0]) for r in rounds)
        shared = statistics.median(r[p][1] / shared_bound(r[p][0], r["decode"][0]) for r in rounds)
        print(f"{'classify end to end, ' + p:<58} {med(p, 1):>8.2f} {med(p, 1) / med('fp32', 1):>7.2f} "
              f"{ratio:>8.2f} {100 * med(p, 2):>7.0f}% {shared:>9.2f}   (bound {bound:.2f}: "
              f"{'decode' if decode < med(p, 0) else 'model'}; shared {shared_bound(med(p, 0), decode):.2f})")
    for p in wanted[1:]:
        goal = {"bf16": 2.0, "int8": 3.0}.get(p)
        print(f"goal: {p} e2e / fp32 e2e = {med(p, 1) / med('fp32', 1):.2f} (goal >= {goal}; "
              f"e2e / min(ceiling, decode) goal >= 0.80)")


def compile_rows(wanted: list[str], model: Path, int8: Path | None, tmp: Path, paths, args) -> None:
    """classify --compile (compile time included) beside the eager run, and the compiled ceiling with its
    compile seconds, for fp32 and int8: where compiling pays back, and after how many files."""
    n = len(paths)
    print(f"\n--compile on CPU, {n} files (one run each; the compile is paid once per run)")
    print(f"{'precision':<10} {'eager e2e':>10} {'compiled e2e':>13} {'x':>6} {'ceiling':>8} {'compiled':>9} "
          f"{'compile s':>10} {'break-even files':>17}")
    for p in [p for p in wanted if p in ("fp32", "int8")]:
        module = _module(p, model, int8)
        eager_ceiling, _ = module_rate(module, p, args.batch_size, args.ceiling_batches, 2)
        try:
            compiled_ceiling, first = module_rate(module, p, args.batch_size, args.ceiling_batches, 2, compile=True)
            compiled, _ = _e2e(p, tmp / "sample", model, int8, tmp / f"out-{p}-compiled", compile=True)
        except Exception as exc:  # a compile that fails is a result here: printed, not fatal
            print(f"{p:<10} torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        eager, _ = _e2e(p, tmp / "sample", model, int8, tmp / f"out-{p}-eager")
        saved = 1 / eager_ceiling - 1 / compiled_ceiling  # seconds a file saves once compiled
        even = f"{first / saved:.0f}" if saved > 0 else "never"
        print(f"{p:<10} {eager:>10.2f} {compiled:>13.2f} {compiled / eager:>6.2f} {eager_ceiling:>8.2f} "
              f"{compiled_ceiling:>9.2f} {first:>10.1f} {even:>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--limit", type=int, default=None, help="use the first N files [default: all]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="ceiling / classify / ceiling rounds")
    ap.add_argument("--workers", type=int, default=None, help="classify --workers [default: dinobatch's]")
    ap.add_argument("--ceiling-batches", type=int, default=3, help="batches per ceiling measurement (x2)")
    ap.add_argument("--precisions", default=None, help="e.g. fp32,bf16,int8: ceilings and end to end per precision "
                    "beside fp32's and the decode ceiling [default: the fp32 rows above]")
    ap.add_argument("--compile", action="store_true", help="with --precisions: classify --compile rows too")
    ap.add_argument("--split-workers", type=lambda v: [int(k) for k in v.split(",")], default=[],
                    help="with --precisions: e2e rows with -j K too (K decode workers beside the model's threads, "
                    "instead of the burst pool of every core taking turns with the model), e.g. 1")
    args = ap.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"benchmark folder not found: {folder}")
    import torch

    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process

    settings = tune_process(resolve_runtime("cpu", "fp32"))
    print(f"machine: {len(os.sched_getaffinity(0))} cpus, torch {torch.__version__}; settings {json.dumps(settings)}; "
          f"load average {os.getloadavg()[0]:.1f} (others' work shares these cores)")
    if args.precisions:
        return precision_rounds(args, folder)
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
