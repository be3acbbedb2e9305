"""Resumable across engines: a classify run killed midway on one engine is finished by the other, which
infers only what the killed run had not committed; a Ray worker node lost mid-run costs no committed work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinobatch.store.runs import current_rows
from tests.helpers import REPO, picture, save

pytest.importorskip("ray.data", reason="the Ray engine needs the ray extra: pip install 'dinobatch[ray]'")

# pictures, besides a copy and a corrupt file; enough for several of either engine's committed batches
# (the Ray engine commits a decode block at a time, the local one a --batch-size batch)
PICTURES = 40


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "inbox"
    for i in range(PICTURES):
        save(picture(i), root / f"{i:02d}.png")
    (root / "copy.png").write_bytes((root / "00.png").read_bytes())
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    return root


def classify(folder, out, model, engine: str, address: str | None, **kw) -> subprocess.CompletedProcess | subprocess.Popen:
    """dinobatch classify in a process of its own (a driver the test can kill), batches of 2."""
    args = ["classify", folder, "-o", out, "-m", model, "-b", "2", "-q", "--json", "--engine", engine]
    if engine == "ray":
        args += ["--address", address]
    env = {k: v for k, v in os.environ.items() if k not in ("DINOBATCH_CRASH_AT", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    if kw.get("crash_at"):
        env["DINOBATCH_CRASH_AT"] = kw["crash_at"]
    command = [sys.executable, "-m", "dinobatch", *map(str, args)]
    if kw.get("background"):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def committed(out: Path) -> int:
    """Contents in the content cache: what a killed run kept."""
    return sum(pq.read_metadata(p).num_rows for p in (out / "_cache").glob("*/part-*.parquet"))


def finish(folder, out, model, engine: str, address: str | None) -> dict:
    done = classify(folder, out, model, engine, address)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_current_row_per_file(out: Path, folder: Path) -> None:
    rows = current_rows(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in folder.iterdir())
    assert {r["path"]: r["status"] for r in rows}["bad.jpg"] == "error"
    assert all(r["label"] for r in rows if r["status"] != "error")


@pytest.mark.parametrize("killed, resumer", [("ray", "local"), ("local", "ray")])
def test_a_run_killed_midway_is_finished_by_the_other_engine(ray_cluster, folder, tmp_path, tiny_model,
                                                            killed, resumer):
    out = tmp_path / "out"
    run = classify(folder, out, tiny_model, killed, ray_cluster.address, crash_at="batch:1")
    assert run.returncode == -signal.SIGKILL, run.stderr  # the driver died after its first committed batch
    kept = committed(out)
    assert 0 < kept < PICTURES
    summary = finish(folder, out, tiny_model, resumer, ray_cluster.address)
    assert (summary["inferred"], summary["reused"]) == (PICTURES - kept, kept)  # nothing committed inferred again
    assert_one_current_row_per_file(out, folder)


def test_a_worker_node_lost_mid_run_costs_no_committed_work(ray_cluster, tmp_path, tiny_model):
    folder = tmp_path / "inbox"
    for i in range(60):
        save(picture(100 + i), folder / f"{i:02d}.png")
    extra = ray_cluster.add_node()  # removed below; the shared nodes stay
    out = tmp_path / "out"
    run = classify(folder, out, tiny_model, "ray", ray_cluster.address, background=True)
    try:
        deadline = time.monotonic() + 120
        while committed(out) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None and committed(out) >= 2, "the run ended before the node could be removed"
        ray_cluster.remove_node(extra)  # mid-run: some batches committed, the rest still in flight
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    kept = committed(out)
    summary = json.loads(stdout) if run.returncode == 0 else finish(folder, out, tiny_model, "ray", ray_cluster.address)
    print(f"node lost mid-run: exit {run.returncode}, {kept} contents committed before any rerun")
    if run.returncode == 0:  # the run itself survived the loss
        assert summary["inferred"] == 60 and kept == 60
    else:  # the rerun finished it: the committed contents were not inferred again
        assert (summary["inferred"], summary["reused"]) == (60 - kept, kept), stderr
    rows = current_rows(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in folder.iterdir())
    assert all(r["status"] != "error" and r["label"] for r in rows)
