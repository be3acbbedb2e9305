"""classify --engine ray on a real two-node Ray cluster (tests/conftest.py's ray_cluster, started once): the same
rows as the local engine on the same folder, and one cache shared by both engines."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dinobatch.cli.main import cli
from dinobatch.engines.ray_common import CRASHED
from dinobatch.runtime import faults
from tests.helpers import REPO, jpeg_bytes, picture, save
from tests.helpers import run_classify as run_local

WEIRD = REPO.parent / "shared" / "data" / "weird"
# what must agree exactly between the engines (probabilities and the floats made from them: within 1e-5)
_EXACT = ("path", "status", "error", "sha256", "duplicate_of", "duplicate_kind", "label", "topk_labels", "format",
          "width", "height", "mode", "phash", "dhash", "precision")
_CLOSE = ("confidence", "probs", "topk_probs", "margin", "entropy")


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    """A few tiny images with a copy, a near copy, and a corrupt, an empty and an unreadable file."""
    root = tmp_path_factory.mktemp("ray") / "inbox"
    for i in range(5):
        save(picture(i + 1), root / ("sub" if i % 2 else "") / f"p{i}.jpg", quality=90)
    save(picture(7, (320, 240)), root / "big.png")
    save(picture(7, (320, 240)).resize((160, 120), Image.LANCZOS), root / "small_copy.jpg", quality=90)
    (root / "copy_of_p0.jpg").write_bytes((root / "p0.jpg").read_bytes())
    (root / "corrupt.jpg").write_bytes(jpeg_bytes(picture(8))[:700])
    (root / "empty.png").write_bytes(b"")
    os.symlink(root / "gone.jpg", root / "unreadable.jpg")  # a link to nothing (root reads any mode bits)
    return root


def _ray(folder: Path, out: Path, model: Path, address: str, *extra: str) -> dict:
    """classify --engine ray through the CLI; the run's rows by path, and its summary."""
    args = ["classify", str(folder), "-o", str(out), "-m", str(model), "-b", "4", "--engine", "ray",
            "--address", address, "--species", str(REPO / "manifests" / "species.csv"), "--json", "-q", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json

    summary = json.loads(result.stdout)
    return summary, {r["path"]: r for r in pq.read_table(summary["rows_file"]).to_pylist()}


def _assert_same_rows(local: dict, ray: dict) -> None:
    assert sorted(ray) == sorted(local)
    for path, row in local.items():
        other = ray[path]
        assert {c: other[c] for c in _EXACT} == {c: row[c] for c in _EXACT}, path
        for c in _CLOSE:
            assert (other[c] is None) == (row[c] is None), (path, c)
            if row[c] is not None:
                a, b = (row[c], other[c]) if isinstance(row[c], list) else ([row[c]], [other[c]])
                assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(a, b)), (path, c)


def test_ray_rows_equal_the_local_engines_on_awkward_files(tmp_path, awkward, tiny_model, ray_cluster):
    _, local = run_local(awkward, tmp_path / "local", tiny_model)
    summary, ray = _ray(awkward, tmp_path / "ray", tiny_model, ray_cluster.address)
    _assert_same_rows(local, ray)
    assert {p for p, r in ray.items() if r["status"] == "error"} == {"corrupt.jpg", "empty.png", "unreadable.jpg"}
    assert {r["precision"] for r in ray.values() if r["status"] != "error"} == {summary["config"]["precision"]}
    assert (ray["p0.jpg"]["duplicate_of"], ray["small_copy.jpg"]["duplicate_of"]) == ("copy_of_p0.jpg", "big.png")
    assert summary["config"]["engine"] == "ray" and summary["config"]["device"] == "cpu"
    assert summary["inferred"] == 7  # eight readable contents, one an exact copy


def test_a_ray_run_after_a_local_run_infers_nothing_new(tmp_path, awkward, tiny_model, ray_cluster):
    out = tmp_path / "out"
    first, local = run_local(awkward, out, tiny_model)
    summary, ray = _ray(awkward, out, tiny_model, ray_cluster.address)
    assert (summary["inferred"], summary["reused"]) == (0, first.inferred)
    _assert_same_rows(local, ray)
    save(picture(20), awkward.parent / "more" / "new.jpg", quality=90)  # one new content: only it is inferred
    summary, _ = _ray(awkward.parent / "more", out, tiny_model, ray_cluster.address)
    assert summary["inferred"] == 1


def test_ray_rows_equal_the_local_engines_on_the_weird_files(tmp_path, tiny_model, ray_cluster):
    if not WEIRD.is_dir():
        pytest.skip(f"{WEIRD} is absent (the shared real-data folder; see CONTRIBUTING.md)")
    _, local = run_local(WEIRD, tmp_path / "local", tiny_model)
    _, ray = _ray(WEIRD, tmp_path / "ray", tiny_model, ray_cluster.address)
    _assert_same_rows(local, ray)


def test_a_ray_run_at_bf16_says_bf16_in_every_row_as_a_local_run_does(tmp_path, awkward, tiny_model, ray_cluster):
    _, local = run_local(awkward, tmp_path / "local", tiny_model, precision="bf16")
    summary, ray = _ray(awkward, tmp_path / "ray", tiny_model, ray_cluster.address, "--precision", "bf16")
    assert summary["config"]["precision"] == "bf16"
    assert {p: r["precision"] for p, r in ray.items()} == {p: r["precision"] for p, r in local.items()}
    assert {r["precision"] for r in ray.values() if r["status"] != "error"} == {"bf16"}


def test_every_ray_actor_runs_the_precision_the_driver_resolved(tmp_path, awkward, tiny_model, ray_cluster,
                                                                 monkeypatch):
    """auto is resolved once for the run: a driver on a CPU with AMX records bf16, and the actors on nodes
    without it run (and their rows record) bf16 too, not each node's own choice."""
    monkeypatch.setattr("dinobatch.runtime.cpu.has_amx_bf16", lambda: True)  # this process only: the driver
    summary, rows = _ray(awkward, tmp_path / "ray", tiny_model, ray_cluster.address)
    assert summary["config"]["precision"] == "bf16"
    assert {r["precision"] for r in rows.values() if r["status"] != "error"} == {"bf16"}


def test_a_ray_run_of_an_int8_model_records_int8(tmp_path, awkward, tiny_model, ray_cluster):
    int8 = tmp_path / "tiny-int8.pt"
    made = CliRunner().invoke(cli, ["model", "quantize", str(tiny_model), "--calibration", str(awkward),
                                    "--calibration-images", "4", "-o", str(int8)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    summary, rows = _ray(awkward, tmp_path / "out", int8, ray_cluster.address)
    assert (summary["config"]["precision"], summary["config"]["device"]) == ("int8", "cpu")
    assert summary["runtime"] == "cpu, int8"
    assert {r["precision"] for r in rows.values() if r["status"] != "error"} == {"int8"}  # what the actors ran


def test_a_file_that_kills_its_ray_worker_is_an_error_row(tmp_path, awkward, tiny_model, ray_cluster, monkeypatch):
    _, local = run_local(awkward, tmp_path / "local", tiny_model)
    monkeypatch.setenv(faults.ENV, "decode:1:p2.jpg")  # every process that decodes it dies (SIGKILL)
    _, ray = _ray(awkward, tmp_path / "ray", tiny_model, ray_cluster.address)
    assert (ray["p2.jpg"]["status"], ray["p2.jpg"]["error"], ray["p2.jpg"]["label"]) == ("error", CRASHED, None)
    _assert_same_rows({p: r for p, r in local.items() if p != "p2.jpg"},
                      {p: r for p, r in ray.items() if p != "p2.jpg"})


def test_an_address_where_nothing_listens_is_a_config_error_at_once(tmp_path, awkward, tiny_model):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", faults.ENV)}
    command = [sys.executable, "-m", "dinobatch", "classify", str(awkward), "-o", str(tmp_path / "out"), "-m",
               str(tiny_model), "--engine", "ray", "--address", "127.0.0.1:1", "-q"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)},
                          timeout=60)
    assert (done.returncode, time.monotonic() - start < 20) == (3, True), done.stderr
    assert "127.0.0.1:1" in done.stderr and "RAY_ADDRESS" in done.stderr
