"""CUDA figures in one run: model-only AMP ceiling and `dinobatch classify` end to end, with and
without torch.compile and GPU JPEG decoding. Run through benchmarks/gpu.sh on a lent GPU machine.

    python3 benchmarks/gpu.py [--files 3000] [--size 1024x768] [--device cuda] [--out DIR]

A folder of generated JPEGs (photo-sized, distinct) is written to a temporary folder; the model is
a randomly initialised ResNet50 with 15 classes (speed does not depend on the weights). Each row's
figure is images/s; ratio = row / the model-only ceiling at the same precision and batch, measured
in the same run. `--device cpu --files 64 --size 320x240` is a dry run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from classify import make_model  # noqa: E402  (benchmarks/classify.py: the same random ResNet50)


def generate(folder: Path, n: int, size: tuple[int, int]) -> None:
    """n distinct JPEGs of the given size, written by all cores."""
    from multiprocessing import Pool

    folder.mkdir(parents=True)
    chunks = [(folder, range(lo, min(n, lo + 100)), size) for lo in range(0, n, 100)]
    with Pool() as pool:
        pool.starmap(_generate_chunk, chunks)


def _generate_chunk(folder: Path, numbers: range, size: tuple[int, int]) -> None:
    """Gradients and shapes, so they compress like photos; distinct per number."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    for i in numbers:
        rng = random.Random(i)
        tint = np.array([rng.random() for _ in range(3)], np.float32)
        img = Image.fromarray((base * tint + rng.randrange(60)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.ellipse([x, y, x + rng.randrange(w // 8, w // 2), y + rng.randrange(h // 8, h // 2)],
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"{i:06d}.jpg", quality=90)


def ceiling(model_path: Path, runtime, batch_size: int, compile: bool, seconds: float = 10.0) -> float:
    """Model-only images/s on random uint8 input already on the device (normalisation included)."""
    import torch

    from dinobatch.models.forward import forward_with_features
    from dinobatch.models.file import load_model

    module = runtime.prepare(load_model(model_path).module)
    forward = torch.compile(lambda x: forward_with_features(module, x), dynamic=False) if compile else (
        lambda x: forward_with_features(module, x))
    x = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8, device=runtime.device)
    x = x.contiguous(memory_format=torch.channels_last)
    rates = []
    with runtime.autocast():
        for _ in range(3):
            forward(x.float() / 255)  # warm-up (and the compile)
        _sync(runtime)
        for _ in range(3):
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < seconds / 3:
                forward(x.float() / 255)
                n += batch_size
            _sync(runtime)
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def _sync(runtime) -> None:
    import torch

    if runtime.is_cuda:
        torch.cuda.synchronize(runtime.device)


def classify_run(folder: Path, model: Path, out: Path, device: str, **options) -> dict:
    """dinobatch classify end to end (fresh output): wall seconds, images/s and the summary's facts."""
    from dinobatch.jobs.classify import classify
    from dinobatch.config import ClassifyConfig

    t = time.perf_counter()
    s = classify(ClassifyConfig(folder=str(folder), out=str(out), model=str(model), device=device,
                                species=str(HERE.parent / "manifests" / "species.csv"), **options))
    wall = time.perf_counter() - t
    return {"wall_s": round(wall, 2), "img_s": round(s.files / wall, 1), "infer_img_s": s.images_per_second,
            "batch_size": s.config["batch_size"], "runtime": s.runtime, "counts": s.counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    import torch

    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process
    from dinobatch.runtime.device import default_batch_size
    from dinobatch.models.file import load_model

    runtime = resolve_runtime(args.device, "auto")
    tune_process(runtime)
    print(f"device: {runtime.describe()}; torch {torch.__version__}", flush=True)
    size = tuple(int(v) for v in args.size.split("x"))
    figures: dict = {"device": runtime.describe(), "torch": torch.__version__, "files": args.files, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        generate(tmp / "in", args.files, size)
        print(f"generated {args.files} JPEGs {args.size} in {time.perf_counter() - t:.0f} s", flush=True)
        model = make_model(tmp / "resnet50.pt")
        batch = default_batch_size(runtime, module=runtime.prepare(load_model(model).module), crop=224)
        figures["batch"] = batch
        rows = []
        for compile in (False, True):
            top = ceiling(model, runtime, batch, compile)
            rows.append((f"ceiling, {runtime.precision}, channels-last, batch {batch}, compile={compile}", top, top))
            print(rows[-1], flush=True)
            for gpu_decode in ((True, False) if runtime.is_cuda else (False,)):
                name = f"classify end to end, compile={compile}, gpu_decode={gpu_decode}"
                r = classify_run(tmp / "in", model, tmp / f"out-{compile}-{gpu_decode}", args.device,
                                 compile=compile, gpu_decode=gpu_decode)
                figures[name] = r
                rows.append((name, r["img_s"], top))
                print(name, json.dumps(r), flush=True)
            if not compile and runtime.is_cuda:
                # -j auto stops at 8 decode workers; the first H200 run was decode-bound with 16 cores
                from dinobatch.runtime.device import usable_cores

                for workers in sorted({min(16, usable_cores() - 1), usable_cores()} - {8}):
                    name = f"classify end to end, compile=False, gpu_decode=False, -j {workers}"
                    r = classify_run(tmp / "in", model, tmp / f"out-j{workers}", args.device,
                                     compile=False, gpu_decode=False, workers=workers)
                    figures[name] = r
                    rows.append((name, r["img_s"], top))
                    print(name, json.dumps(r), flush=True)
        figures["rows"] = [(n, round(v, 1), round(v / b, 3)) for n, v, b in rows]
    print(f"\n{'measure':<72} {'img/s':>9} {'ratio':>6}")
    for name, value, ratio in figures["rows"]:
        print(f"{name:<72} {value:>9.1f} {ratio:>6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
