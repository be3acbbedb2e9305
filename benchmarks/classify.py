"""Throughput of dinobatch's scan+hash and classify, beside plain baselines measured in the same run.

    .venv/bin/python benchmarks/classify.py [FOLDER] [--limit N] [--batch-size 32]

FOLDER defaults to ../shared/data/dinos (read in place). The model is a randomly initialised
torchvision ResNet50 with 15 classes: speed depends on the architecture, not on the weights.
Figures are images per second; 'ratio' is dinobatch / baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def files_under(folder: Path, limit: int | None) -> list[Path]:
    from dinobatch.scan import walk

    paths = [Path(e.abspath) for e in walk(folder) if e.error is None]
    return paths[:limit] if limit else paths


def bench_hash_baseline(paths: list[Path]) -> float:
    """The plain loop: Image.open + imagehash.phash (full decode), as most scripts do it."""
    import imagehash
    from PIL import Image

    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            imagehash.phash(im)
    return len(paths) / (time.perf_counter() - t)


def bench_hash_dinobatch(paths: list[Path]) -> float:
    """dinobatch's per-file work without the model: read, sha256, draft decode, pHash + dHash."""
    from dinobatch.decode import DecodeError, decode
    from dinobatch.scan import read_bytes

    t = time.perf_counter()
    for p in paths:
        data = read_bytes(str(p))
        hashlib.sha256(data).hexdigest()
        try:
            decode(data, min_side=256)
        except DecodeError:
            pass
    return len(paths) / (time.perf_counter() - t)


def bench_model_only(model_path: Path, batch_size: int, batches: int, channels_last: bool) -> float:
    """Plain torchvision forward pass of the same model on random input, same batch size, fp32."""
    import torch

    from dinobatch.model import load_model

    module = load_model(model_path).module.eval()
    x = torch.randn(batch_size, 3, 224, 224)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        module(x)  # warm-up
        t = time.perf_counter()
        for _ in range(batches):
            module(x)
    return batch_size * batches / (time.perf_counter() - t)


def bench_classify(folder: Path, model_path: Path, batch_size: int, out: Path) -> tuple[float, float]:
    """dinobatch classify end to end into out: (seconds, inference-phase img/s)."""
    from dinobatch.classify import classify
    from dinobatch.config import ClassifyConfig

    t = time.perf_counter()
    summary = classify(ClassifyConfig(folder=str(folder), out=str(out), model=str(model_path),
                                      batch_size=batch_size, precision="fp32"))
    return time.perf_counter() - t, summary.images_per_second or 0.0


def make_model(tmp: Path) -> Path:
    import torch

    from dinobatch.model import ModelSpec, build_module, save_model

    torch.manual_seed(0)
    labels = tuple(f"class_{i}" for i in range(15))
    path = tmp / "resnet50-random.pt"
    save_model(path, ModelSpec("resnet50", labels, source={"kind": "benchmark"}),
               build_module("resnet50", 15).state_dict())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=str(HERE.parent.parent / "shared" / "data" / "dinos"))
    ap.add_argument("--limit", type=int, default=128, help="images for the classify comparison")
    ap.add_argument("--hash-limit", type=int, default=None, help="images for the hashing comparison")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        sys.exit(f"benchmark folder not found: {folder}")
    import torch

    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.is_available()}")
    paths = files_under(folder, args.hash_limit)
    rows = []
    base, ours = bench_hash_baseline(paths), bench_hash_dinobatch(paths)
    rows.append((f"scan+hash, {len(paths)} files", "Image.open + imagehash.phash loop", base, ours))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp)
        sample = tmp / "sample"
        sample.mkdir()
        for i, p in enumerate(files_under(folder, args.limit)):
            os.symlink(p, sample / f"{i:05d}{p.suffix}")  # a subset, linked, never copied
        n = len(list(sample.iterdir()))
        batches = max(3, n // args.batch_size)
        plain = bench_model_only(model, args.batch_size, batches, channels_last=False)
        ceiling = bench_model_only(model, args.batch_size, batches, channels_last=True)
        first_s, infer_phase = bench_classify(sample, model, args.batch_size, tmp / "out")
        rerun_s, _ = bench_classify(sample, model, args.batch_size, tmp / "out")
        label = f"classify, {n} files, resnet50 fp32 b{args.batch_size}"
        rows.append((label, "plain forward, random tensors", plain, n / first_s))
        rows.append((label, "forward, channels-last (the ceiling)", ceiling, n / first_s))
        rows.append(("  inference phase only", "forward, channels-last (the ceiling)", ceiling, infer_phase))
        rows.append(("unchanged rerun (s; ratio = rerun/first)", "first run (s)", first_s, rerun_s))
    print(f"\n{'measure':<44} {'baseline':<38} {'base img/s':>10} {'dinobatch':>10} {'ratio':>6}")
    for name, baseline, b, o in rows:
        print(f"{name:<44} {baseline:<38} {b:>10.1f} {o:>10.1f} {o / b:>6.2f}")


if __name__ == "__main__":
    main()
