"""`dinobatch serve` under load: micro-batched beside a naive server (one forward pass per request), in one run.

    .venv/bin/python benchmarks/serve.py [FOLDER] [--model MODEL] [--requests 48] [--clients 1,8,32]

FOLDER defaults to ../shared/data/dinos: real photos, read in place and posted as they are. The
model defaults to a randomly initialised torchvision ResNet50 with 15 classes (speed depends on the
architecture, not the weights). Both servers are the same `python -m dinobatch serve` process with the
same model, device and precision; they run one after the other, never together:

  naive     --batch-size 1 --max-wait-ms 0: every request its own forward pass
  batched   --batch-size B --max-wait-ms W (the defaults, 32 and 5, unless given)

For each number of concurrent clients (each a thread with its own keep-alive connection, posting
the photos in turn) it sends --requests requests after a short warm-up and prints requests/s and
the p50/p95/p99 latency of each server, and batched/naive. The goal (issue 15): at 32 clients at
least 3x the naive throughput with a p99 no worse. Last, the model alone in this process (the same
settings classify and serve apply) at batch 1 and at the batch size: the most batching can give on
this device is their ratio, and a server's requests/s cannot pass the batched ceiling.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))  # benchmarks/classify.py's make_model: the benchmarks' random ResNet50


def photos(folder: Path, count: int) -> list[tuple[str, bytes]]:
    """count photos spread over the folder's species (sorted, every k-th), as (name, bytes)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        sys.exit(f"no photos under {folder}")
    step = max(1, len(files) // count)
    return [(p.name, p.read_bytes()) for p in files[::step][:count]]


class Server:
    """A dinobatch serve child process on a free port, stopped on exit."""

    def __init__(self, model: Path, extra: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "dinobatch", "serve", "-m", str(model), "--port", "0",
                                      *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.url = None
        for line in self.proc.stderr:
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if self.url is None:
            sys.exit("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # drain the log
        import httpx

        for _ in range(600):
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=5)
                if health.status_code == 200:
                    self.health = health.json()
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        sys.exit("the server did not answer /healthz")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def load(url: str, images: list[tuple[str, bytes]], clients: int, requests: int) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of `requests` predictions sent by `clients` concurrent clients."""
    import httpx

    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []

    def client(_: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = images[i % len(images)]
                t = time.perf_counter()
                answer = http.post("/api/predict", files={"image": (name, data, "image/jpeg")})
                took = time.perf_counter() - t
                if answer.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {answer.status_code}: {answer.text}")
                with lock:
                    latencies.append(took)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return requests / (time.perf_counter() - start), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def measure(model: Path, extra: list[str], images, levels: list[int], requests: int) -> tuple[dict[int, tuple], dict]:
    """{clients: (req/s, p50, p95, p99 in ms)} for one server configuration, and its /healthz."""
    out = {}
    with Server(model, extra) as server:
        load(server.url, images, 2, 4)  # warm-up: oneDNN primitives, the allocator's first growth
        for clients in levels:
            rate, lat = load(server.url, images, clients, max(requests, clients))
            out[clients] = (rate, *(1000 * percentile(lat, q) for q in (50, 95, 99)))
    return out, server.health


def ceilings(model: Path, batch_size: int, device: str, precision: str, rounds: int = 3) -> dict[int, float]:
    """{batch: images/s} of the model's forward pass alone at batch 1 and batch_size, 224 px inputs."""
    import torch

    from dinobatch.models.file import load_model
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process

    runtime = resolve_runtime(device, precision)
    tune_process(runtime)
    loaded = load_model(model)
    module, crop = runtime.prepare(loaded.module), loaded.spec.preprocessing.crop
    out = {}
    for batch in (1, batch_size):
        x = torch.randn(batch, 3, crop, crop).to(runtime.device, memory_format=torch.channels_last)
        with torch.inference_mode(), runtime.autocast():
            module(x)
            t, n = time.perf_counter(), 0
            while n < max(rounds * batch, 32):
                module(x)
                n += batch
        out[batch] = n / (time.perf_counter() - t)
    return out


def main() -> None:
    from classify import make_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(REPO.parent / "shared" / "data" / "dinos"))
    parser.add_argument("--model", default=None, help="model file [default: a random ResNet50]")
    parser.add_argument("--requests", type=int, default=48, help="requests per row (at least the clients)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    images = photos(Path(args.folder), 64)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp) / "resnet50.pt")
        same = ["--device", args.device, "--precision", args.precision]
        naive, _ = measure(model, [*same, "--batch-size", "1", "--max-wait-ms", "0"], images, levels, args.requests)
        batched, health = measure(model, [*same, "--batch-size", str(args.batch_size), "--max-wait-ms",
                                          str(args.max_wait_ms)], images, levels, args.requests)
    print(f"dinobatch serve, {model.name if args.model else 'random ResNet50'}, {health['device']} "
          f"{health['precision']}, {os.cpu_count()} cores, "
          f"{len(images)} photos of {args.folder}, {args.requests} requests a row")
    print(f"{'clients':>7} | {'naive req/s':>11} {'p50':>7} {'p95':>7} {'p99':>7} | "
          f"{'batched req/s':>13} {'p50':>7} {'p95':>7} {'p99':>7} | {'x naive':>7}")
    for c in levels:
        n, b = naive[c], batched[c]
        print(f"{c:>7} | {n[0]:>11.1f} {n[1]:>6.0f}ms {n[2]:>6.0f}ms {n[3]:>6.0f}ms | "
              f"{b[0]:>13.1f} {b[1]:>6.0f}ms {b[2]:>6.0f}ms {b[3]:>6.0f}ms | {b[0] / n[0]:>6.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp) / "resnet50.pt")
        ceiling = ceilings(model, args.batch_size, args.device, args.precision)
    one, many = ceiling[1], ceiling[args.batch_size]
    print(f"the model alone: batch 1 {one:.1f} img/s, batch {args.batch_size} {many:.1f} img/s: batching can give "
          f"at most {many / one:.2f}x here; batched at {max(levels)} clients reached "
          f"{batched[max(levels)][0] / many:.0%} of the batched ceiling")


if __name__ == "__main__":
    main()
