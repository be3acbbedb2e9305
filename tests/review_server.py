"""Helpers for the review tests: a curated queue over generated images, and a real `dinobatch serve` process.

Import from here (`from tests.review_server import curated_queue, ServeProcess`); fixtures stay in the test
modules, which start ONE server per module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import LABELS, REPO, picture, run_classify, save


@dataclass(frozen=True)
class CuratedQueue:
    images: Path  # the dataset's image folder (<label>/<file>), the manifest's root
    manifest: Path  # m.parquet, beside (not inside) the images
    queue: Path  # curate -o


def curated_queue(tmp: Path, model: Path, per_label: int = 5) -> CuratedQueue:
    """Images in LABELS' folders (one exact copy filed under another label: a duplicate group), their
    manifest, a classify run with the tiny model, and curate --manifest flagging everything (the random
    model's confidence is under 1.0) with every item in review."""
    from click.testing import CliRunner

    from dinobatch.cli.main import cli
    from dinobatch.training.manifest import build_manifest, write_manifest

    images = tmp / "images"
    for k, label in enumerate(LABELS):
        for i in range(per_label):
            save(picture(100 * k + i), images / label / f"{label}_{i}.png")
    (images / LABELS[1] / "copy_of_first.png").write_bytes((images / LABELS[0] / f"{LABELS[0]}_0.png").read_bytes())
    manifest = write_manifest(build_manifest(images, seed=0), tmp / "m.parquet", images)
    run_classify(images, tmp / "predictions", model)
    queue = tmp / "queue"
    done = CliRunner().invoke(cli, ["curate", str(tmp / "predictions"), "--manifest", str(manifest), "-o", str(queue),
                                    "--low-confidence", "1", "--max-review", "0", "-q"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return CuratedQueue(images, manifest, queue)


def free_port() -> int:
    """A port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`dinobatch serve --model MODEL --queue QUEUE` as its own process on 127.0.0.1, ready when started."""

    def __init__(self, model: Path, queue: Path, log: Path) -> None:
        self.model, self.queue, self.log_path = model, queue, log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 90.0) -> "ServeProcess":
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dinobatch", "serve", "--model", str(self.model),
                                          "--queue", str(self.queue), "--port", str(port), "--device", "cpu"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dinobatch serve exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"dinobatch serve did not answer in {timeout:.0f} s: {self.log_path.read_text()}")

    def get(self, path: str) -> tuple[int, dict]:
        """(status, JSON body) of GET path."""
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> tuple[int, dict]:
        """(status, JSON body) of one request; an HTTP error status is returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                return res.status, json.loads(res.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def kill(self) -> None:
        """SIGKILL: no handler, no flush, no goodbye (what a crash or an OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone in 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
