"""A disk that fills after the rows file is committed: the run is recorded as it happened, the
optional steps after it (file index, cache compaction) are warnings, and no cache part is lost.

The full disk is dinobatch.runtime.faults' DINOBATCH_FAIL_AT: the named atomic write raises
OSError(ENOSPC) after its temporary file is complete, so the real failure path runs (the
temporary file removed, OutputError raised) without a root-only tmpfs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_OUTPUT
from dinobatch.runtime.faults import FAIL_ENV
from dinobatch.store.results import COMPACT_PARTS
from dinobatch.store.runs import current_rows, latest_run
from tests.helpers import REPO, picture, save


def classify(folder: Path, out: Path, model: Path, *extra: str):
    """dinobatch classify in this process, one image per batch (so one cache part per image)."""
    args = ["classify", str(folder), "-o", str(out), "-m", str(model), "-j", "0", "-b", "1", "-q", *extra]
    return CliRunner().invoke(cli, args)


def images(folder: Path, n: int, first: int = 0) -> Path:
    for i in range(first, first + n):
        save(picture(i, (48, 36)), folder / f"{i}.png")
    return folder


def summary(out: Path) -> dict:
    return json.loads((out / "_summary.json").read_text())


def parts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_cache").rglob("part-*.parquet"))


def newest_rows_file(out: Path) -> Path:
    return sorted(out.glob("*.parquet"))[-1]


def test_a_compaction_that_fails_for_space_is_a_warning_and_the_run_is_recorded(tmp_path, tiny_model, monkeypatch):
    folder = images(tmp_path / "inbox", COMPACT_PARTS + 2)  # one part per image: more than compaction allows
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_ENV, "write:1:zcompact")
    full = classify(folder, out, tiny_model)
    assert full.exit_code == 0, full.output
    assert "No space left on device" in full.stderr and "compact" in full.stderr  # said, even with -q
    s = summary(out)
    assert Path(s["rows_file"]) == newest_rows_file(out) and s["run_id"] == newest_rows_file(out).stem
    assert json.loads((out / "_runs" / f"{s['run_id']}.json").read_text()) == s
    assert len(s["warnings"]) == 1 and "compact" in s["warnings"][0] and "No space left" in s["warnings"][0]
    assert len(parts(out)) == COMPACT_PARTS + 2 and not any("zcompact" in p for p in parts(out))
    assert not list(out.rglob(".*.tmp"))  # the failed merge left no temporary file behind
    first = {r["path"]: r["probs"] for r in current_rows(out).to_pylist()}

    monkeypatch.delenv(FAIL_ENV)
    again = classify(folder, out, tiny_model, "--json")
    assert again.exit_code == 0, again.output
    s = json.loads(again.stdout)
    assert s["inferred"] == 0 and s["reused"] == COMPACT_PARTS + 2  # every part was still there and readable
    assert s["warnings"] == [] and len(parts(out)) == 1  # compacted this time
    assert {r["path"]: r["probs"] for r in current_rows(out).to_pylist()} == first


def test_a_file_index_that_cannot_be_saved_is_a_warning_and_changes_nothing_else(tmp_path, tiny_model, monkeypatch):
    folder = images(tmp_path / "inbox", 3)
    out = tmp_path / "out"
    monkeypatch.setenv(FAIL_ENV, "write:1:files.parquet")
    full = classify(folder, out, tiny_model)
    assert full.exit_code == 0, full.output
    s = summary(out)
    assert s["run_id"] == newest_rows_file(out).stem and s["counts"]["ok"] == 3
    assert len(s["warnings"]) == 1 and "file index" in s["warnings"][0] and "No space left" in s["warnings"][0]
    monkeypatch.delenv(FAIL_ENV)
    again = classify(folder, out, tiny_model, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["inferred"] == 0


def test_a_summary_that_cannot_be_written_is_exit_7_saying_the_rows_were_committed(tmp_path, tiny_model,
                                                                                  monkeypatch):
    folder = images(tmp_path / "inbox", 3)
    out = tmp_path / "out"
    assert classify(folder, out, tiny_model).exit_code == 0
    earlier = summary(out)["run_id"]
    images(folder, 1, first=3)
    monkeypatch.setenv(FAIL_ENV, "write:1:_summary.json")
    full = classify(folder, out, tiny_model)
    assert full.exit_code == EXIT_OUTPUT
    rows_file = newest_rows_file(out)
    assert rows_file.stem != earlier and str(rows_file) in full.stderr and "committed" in full.stderr
    # no summary that describes the earlier run as the latest; the run's own record is in _runs/
    assert not (out / "_summary.json").exists()
    table, record = latest_run(out)
    assert record["run_id"] == rows_file.stem and "3.png" in table["path"].to_pylist()

    monkeypatch.delenv(FAIL_ENV)
    assert classify(folder, out, tiny_model).exit_code == 0
    assert summary(out)["run_id"] == newest_rows_file(out).stem
    paths = current_rows(out)["path"].to_pylist()
    assert sorted(paths) == ["0.png", "1.png", "2.png", "3.png"]  # one current row per file, after the retry


def test_a_disk_full_from_the_compaction_on_still_leaves_the_runs_summary(tmp_path, tiny_model):
    """The summary is written before the optional work that could use up the space, so a disk that
    fills during compaction (and stays full) costs a warning, not the run's record."""
    n = COMPACT_PARTS + 2
    folder = images(tmp_path / "inbox", n)
    out = tmp_path / "out"
    writes_before_compaction = n + 1 + 2 + 1  # one part per image, the rows file, the summary twice, the index
    env = {**os.environ, "PYTHONPATH": str(REPO), FAIL_ENV: f"write:{writes_before_compaction + 1}"}
    args = ["classify", folder, "-o", out, "-m", tiny_model, "-j", "0", "-b", "1", "-q"]
    full = subprocess.run([sys.executable, "-m", "dinobatch", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    assert "the cache was not compacted" in full.stderr and "does not list these warnings" in full.stderr
    s = summary(out)
    assert s["run_id"] == newest_rows_file(out).stem and s["counts"]["ok"] == n
    assert len(parts(out)) == n and not list(out.rglob(".*.tmp"))
