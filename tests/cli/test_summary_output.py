"""The run summaries as a user reads them: scan's on stdout like classify's (nothing with -q), an
error list cut at a few that says how many more there are, and rates that say what they measure."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from tests.helpers import picture, save


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def seven_bad(tmp_path):
    folder = tmp_path / "in"
    save(picture(0), folder / "good.png")
    for i in range(7):
        (folder / f"bad{i}.png").write_bytes(b"not a png " + bytes([i]))
    return folder


def test_classify_lists_a_few_errors_and_says_how_many_more(seven_bad, tiny_model, tmp_path):
    result = invoke("classify", seven_bad, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0")
    assert result.exit_code == 0, result.output
    listed = [line for line in result.stdout.splitlines() if line.startswith("  error: ")]
    assert len(listed) == 5
    assert "  ... and 2 more errors" in result.stdout


def test_scan_prints_its_summary_on_stdout_and_nothing_with_quiet(seven_bad, tmp_path):
    result = invoke("scan", seven_bad, "-o", tmp_path / "s.parquet", "-j", "0")
    assert result.exit_code == 0, result.output
    assert "8 files: 1 ok, 0 duplicate, 7 error (0 duplicate groups)" in result.stdout
    assert "8 files:" not in result.stderr
    assert str(tmp_path / "s.parquet") in result.stdout
    assert "  ... and 2 more errors" in result.stdout
    quiet = invoke("scan", seven_bad, "-o", tmp_path / "s.parquet", "-j", "0", "-q")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_classify_says_what_its_images_per_second_measures(seven_bad, tiny_model, tmp_path):
    result = invoke("classify", seven_bad, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0")
    assert result.exit_code == 0, result.output
    # the rate is the inference stage's (decode + model), not files / the run's seconds: the line says so
    timing = re.search(r"([\d.]+) s in all; decode and inference: ([\d.]+) images/s", result.stdout)
    assert timing, result.stdout
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert float(timing.group(2)) == summary["images_per_second"]  # the JSON key keeps its meaning


def test_a_rerun_logs_counts_that_add_up(seven_bad, tiny_model, tmp_path):
    args = ("classify", seven_bad, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0")
    assert invoke(*args).exit_code == 0
    rerun = invoke(*args)  # the good file is reused; the seven unreadable ones are tried again
    assert rerun.exit_code == 0, rerun.output
    todo = int(re.search(r"(\d+) unique contents to decode and infer", rerun.stderr).group(1))
    done = re.search(r"inferred (\d+) new contents?, (\d+) could not be decoded", rerun.stderr)
    assert done, rerun.stderr
    assert (todo, int(done.group(1)), int(done.group(2))) == (7, 0, 7)
