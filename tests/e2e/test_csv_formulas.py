"""Every CSV dinobatch writes is safe to open in a spreadsheet: a file name or label starting with
=, +, - or @ is shown as text, never run as a formula (issue 16), and relabel still finds the row
when a reviewer copies such a guarded path from the queue into a decisions CSV."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
from click.testing import CliRunner

from dinobatch.cli.main import cli
from tests.helpers import picture, save

HOSTILE = ["=1+2.png", "@SUM(A1).png", "+cmd.png", "-x.png"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def cells(path, column):
    with open(path, newline="", encoding="utf-8") as fh:
        return sorted(row[column] for row in csv.DictReader(fh))


def test_results_csv_and_curate_queue_guard_formula_cells(tmp_path, tiny_model):
    inbox = tmp_path / "inbox"
    for i, name in enumerate(HOSTILE + ["plain.png"]):
        save(picture(i), inbox / name)
    invoke("classify", inbox, "-o", tmp_path / "results", "-m", tiny_model, "-j", "0", "-q")
    invoke("results", tmp_path / "results", "-o", tmp_path / "rows.csv")
    assert cells(tmp_path / "rows.csv", "path") == sorted(["'" + n for n in HOSTILE] + ["plain.png"])
    invoke("curate", tmp_path / "results", "-o", tmp_path / "q", "--low-confidence", "1")
    assert cells(tmp_path / "q" / "queue.csv", "path") == sorted(["'" + n for n in HOSTILE] + ["plain.png"])


def test_relabel_takes_a_path_guarded_in_the_queue(tmp_path):
    for i, (label, name) in enumerate([("-raptor", "1.png"), ("-raptor", "2.png"), ("rex", "3.png"),
                                       ("rex", "4.png")]):
        save(picture(i), tmp_path / "data" / label / name)
    invoke("manifest", tmp_path / "data", "-o", tmp_path / "m.parquet", "-q")
    (tmp_path / "d.csv").write_text("path,action\n'-raptor/1.png,remove\n", encoding="utf-8")
    invoke("relabel", tmp_path / "d.csv", "--manifest", tmp_path / "m.parquet")
    rows = {r["path"]: r["status"] for r in pq.read_table(tmp_path / "m.v2.parquet").to_pylist()}
    assert rows["-raptor/1.png"] == "removed" and rows["-raptor/2.png"] == "ok"
