"""Unchanged reruns never import torch nor load the model: the rows are rebuilt from the cache, the same
rows and summary a run that loads the model writes when it finds nothing to infer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import dinobatch.jobs.classify as classify_job
from dinobatch.store.results import ResultsDir
from tests.helpers import REPO, picture, save
from tests.helpers import run_classify as run

# Runs `python -m dinobatch ARGS...` and writes, at exit, the torch modules the process had imported.
_WRAPPER = """
import atexit, json, os, runpy, sys
atexit.register(lambda: open(os.environ["IMPORTED_OUT"], "w").write(json.dumps(
    sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))))
sys.argv = ["dinobatch", *sys.argv[1:]]
runpy.run_module("dinobatch", run_name="__main__")
"""


def _settle() -> None:
    """Files changed within two seconds of a run are (rightly) not trusted by their stat next run."""
    time.sleep(2.1)


def _cli(tmp_path: Path, folder: Path, out: Path, model: Path, *extra: str) -> tuple[dict, list[str]]:
    """classify in a fresh interpreter: its --json summary and the torch modules it imported."""
    imported = tmp_path / "imported.json"
    cmd = [sys.executable, "-c", _WRAPPER, "classify", str(folder), "-o", str(out), "-m", str(model), "--json",
           "-q", "--species", str(REPO / "manifests" / "species.csv"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "IMPORTED_OUT": str(imported)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), json.loads(imported.read_text())


def _rows(summary: dict):
    """The rows file without its run_id column, and its schema's metadata."""
    table = pq.read_table(summary["rows_file"])
    return table.drop_columns(["run_id"]), table.schema.metadata


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "in"
    for i in range(5):
        save(picture(10 + i), root / f"{i}.png")
    save(picture(10), root / "copy" / "same.png")  # an exact duplicate: a group the rerun must keep
    return root


@pytest.fixture
def model(tmp_path, tiny_model) -> Path:
    """A copy of the tiny model this test may touch or replace."""
    return Path(shutil.copy2(tiny_model, tmp_path / "model.pt"))


def test_an_unchanged_rerun_imports_no_torch_and_writes_the_same_rows_and_summary(tmp_path, folder, model):
    _settle()
    first, imported_first = _cli(tmp_path, folder, tmp_path / "out", model)
    second, imported_second = _cli(tmp_path, folder, tmp_path / "out", model)
    assert "torch" in imported_first  # the check sees torch where it is imported
    assert imported_second == []
    assert (second["inferred"], second["reused"], second["files"]) == (0, 5, 6)
    for key in ("counts", "duplicate_groups", "model", "config", "runtime", "errors"):
        assert second[key] == first[key], key
    assert second["counts"] == {"ok": 5, "duplicate": 1, "error": 0}
    # the same process keys; the threads a model would run on here (the same rule, without torch)
    assert sorted(second["process"]) == sorted(first["process"])
    assert second["process"]["threads"] == first["process"]["threads"]
    assert second["process"]["torch"].startswith("not imported") and first["process"]["torch"][0].isdigit()
    assert second["images_per_second"] is None and second["run_id"] != first["run_id"]
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["run_id"] == second["run_id"]
    assert _rows(second) == _rows(first)
    assert pq.read_table(second["rows_file"])["run_id"].unique().to_pylist() == [second["run_id"]]


def test_a_file_that_failed_to_decode_sends_the_rerun_down_the_normal_path(tmp_path, folder, model):
    save(picture(1), folder / "broken.jpg")
    (folder / "broken.jpg").write_bytes((folder / "broken.jpg").read_bytes()[:200])  # cut short
    _settle()
    first, _ = _cli(tmp_path, folder, tmp_path / "out", model)
    second, imported = _cli(tmp_path, folder, tmp_path / "out", model)
    assert "torch" in imported  # retried, as every run retries a content that failed
    assert second["counts"] == first["counts"] and second["counts"]["error"] == 1


def _loads(monkeypatch) -> list[str]:
    """Record each time the classify job loads a model."""
    loaded: list[str] = []
    real = classify_job.resolve_model

    def counting(ref):
        loaded.append(ref)
        return real(ref)

    monkeypatch.setattr(classify_job, "resolve_model", counting)
    return loaded


def test_a_touched_model_file_is_hashed_again_and_still_not_loaded(tmp_path, folder, model, monkeypatch):
    _settle()
    first, rows1 = run(folder, tmp_path / "out", model)
    loaded = _loads(monkeypatch)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))  # another mtime, the same bytes
    _settle()  # and a ctime old enough for the file index to keep the new stat
    second, rows2 = run(folder, tmp_path / "out", model)
    assert loaded == []
    assert (second.inferred, second.model) == (0, first.model)
    assert [dict(r, run_id=None) for r in rows2.values()] == [dict(r, run_id=None) for r in rows1.values()]
    index = ResultsDir(tmp_path / "out").read_file_index().to_pylist()
    assert [r["mtime_ns"] for r in index if r["abspath"] == os.fsencode(model)] == [st.st_mtime_ns - 10**10]


def test_a_changed_model_file_is_loaded_and_infers(tmp_path, folder, model, monkeypatch):
    import torch

    from dinobatch.models.file import build_module, load_model, save_model

    _settle()
    first, _ = run(folder, tmp_path / "out", model)
    spec = load_model(model).spec
    torch.manual_seed(1)
    save_model(model, spec, build_module(spec.arch, len(spec.labels)).state_dict())
    loaded = _loads(monkeypatch)
    second, _ = run(folder, tmp_path / "out", model)
    assert loaded == [str(model)]
    assert second.model["fingerprint"] != first.model["fingerprint"] and second.inferred == 5


def test_a_new_image_or_other_options_take_the_normal_path(tmp_path, folder, model, monkeypatch):
    _settle()
    run(folder, tmp_path / "out", model)
    loaded = _loads(monkeypatch)
    save(picture(99), folder / "new.png")
    summary, _ = run(folder, tmp_path / "out", model)
    assert (loaded, summary.inferred, summary.reused) == ([str(model)], 1, 5)
    _settle()
    run(folder, tmp_path / "out", model, top_k=2)  # options other than the last run's
    assert len(loaded) == 2
    summary, rows = run(folder, tmp_path / "out", model, top_k=2)
    assert len(loaded) == 2 and summary.inferred == 0
    assert all(len(r["topk_labels"]) == 2 for r in rows.values() if r["status"] != "error")
