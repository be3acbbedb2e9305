"""Names with control characters (newline, tab, ESC sequences) never reach a terminal raw: every
human-facing output shows them escaped (\\n, \\t, \\x1b); --json and the Parquet keep them exact."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_INPUT
from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model
from tests.helpers import picture, save

# a line break, a tab, clear-screen, a window title and a colour: what the probe put in names
NASTY = ["new\nline.png", "tab\there.png", "clear\x1b[2Jscreen.png", "title\x1b]0;pwned\x07.png"]
BROKEN = "broken\x1b[31mred.jpg"
RAW = ("\x1b", "\x07")  # must never appear in human-facing text


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_escaped(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"raw {ch!r} reached the terminal: {text!r}"


@pytest.fixture(scope="module")
def nasty_model(tmp_path_factory):
    """A tiny model whose labels carry a colour sequence and a window-title sequence."""
    torch.manual_seed(0)
    labels = ("red\x1b[31mlabel", "title\x1b]0;x\x07label", "plain")
    path = tmp_path_factory.mktemp("nasty") / "nasty\x1b[2J.pt"
    save_model(path, ModelSpec(arch="resnet18", labels=labels, preprocessing=Preprocessing(resize=36, crop=32)),
               build_module("resnet18", 3).state_dict())
    return path


@pytest.fixture(scope="module")
def classified(tmp_path_factory, nasty_model):
    """A classify output folder over files with nasty names, one of them unreadable."""
    root = tmp_path_factory.mktemp("esc")
    folder = root / "in\x1b[2J"
    for i, name in enumerate(NASTY):
        save(picture(i), folder / name)
    (folder / BROKEN).write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = invoke("classify", folder, "-m", nasty_model, "-o", root / "out", "-j", "0")
    return root, folder, result


def test_results_prints_one_escaped_line_per_row_under_a_header(classified):
    root, _, _ = classified
    result = invoke("results", root / "out")
    assert result.exit_code == 0
    lines = result.stdout.split("\n")
    assert lines[-1] == ""  # every line ends with a newline
    lines = lines[:-1]
    assert lines[0] == "path\tstatus\tlabel\tconfidence\tdetail"
    assert len(lines) == 1 + len(NASTY) + 1  # header + one line per file, none split
    assert all(line.count("\t") == 4 for line in lines)  # a tab in a name does not shift the columns
    shown = {line.split("\t")[0] for line in lines[1:]}
    assert shown == {"new\\nline.png", "tab\\there.png", "clear\\x1b[2Jscreen.png", "title\\x1b]0;pwned\\x07.png",
                     "broken\\x1b[31mred.jpg"}
    assert_escaped(result.output)


def test_classify_summary_error_list_and_log_lines_are_escaped(classified):
    _, _, result = classified
    assert result.exit_code == 0
    assert "error: broken\\x1b[31mred.jpg: " in result.stdout
    assert "in\\x1b[2J" in result.stderr  # 'found N files under FOLDER', a log line
    assert_escaped(result.output)


def test_json_keeps_the_exact_names(classified, nasty_model):
    root, folder, _ = classified
    result = invoke("classify", folder, "-m", nasty_model, "-o", root / "out", "-j", "0", "--json", "-q")
    errors = json.loads(result.stdout)["errors"]
    assert [e["path"] for e in errors] == [BROKEN]


def test_error_messages_are_escaped(tmp_path, nasty_model):
    result = invoke("classify", tmp_path / "gone\x1b]0;t\x07\nhere", "-m", nasty_model, "-o", tmp_path / "o")
    assert result.exit_code == EXIT_INPUT
    assert "gone\\x1b]0;t\\x07\\nhere" in result.stderr
    assert result.stderr.count("\n") == 1  # one error line, not split by the name
    assert_escaped(result.output)


def test_click_usage_errors_are_escaped(tmp_path):
    result = invoke("classify", tmp_path, "--precision", "no\x1b[2Jsuch")
    assert result.exit_code == 2 and "no\\x1b[2Jsuch" in result.output
    assert_escaped(result.output)


def test_scan_log_lines_are_escaped(tmp_path):
    folder = tmp_path / "scan\x1b[2Jme"
    save(picture(1), folder / "a\x1b[31m.png")
    result = invoke("scan", folder, "-o", tmp_path / "s.parquet", "-j", "0")
    assert result.exit_code == 0 and "scan\\x1b[2Jme" in result.stderr
    assert_escaped(result.output)


def test_model_info_and_export_show_labels_escaped(classified, nasty_model, tmp_path):
    root, _, _ = classified
    info = invoke("model", "info", nasty_model)
    assert info.exit_code == 0 and "red\\x1b[31mlabel" in info.stdout and "nasty\\x1b[2J.pt" in info.stdout
    assert_escaped(info.output)
    exported = invoke("export", root / "out", "--to", tmp_path / "to", "--min-confidence", "0")
    assert exported.exit_code == 0
    assert_escaped(exported.output)


def test_relabel_dry_run_prints_one_escaped_line_per_decision(tmp_path):
    folder = tmp_path / "data"
    for i, label in enumerate(["red\x1b[31m", "plain"]):
        for j in range(3):
            save(picture(10 * i + j), folder / label / f"{j}\n\x1b]0;t\x07.png")
    manifest = tmp_path / "m.parquet"
    made = invoke("manifest", folder, "-o", manifest, "--split", "1,0,0")
    assert made.exit_code == 0
    decisions = tmp_path / "d.csv"
    with open(decisions, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "action", "label", "note"])
        writer.writerow(["red\x1b[31m/0\n\x1b]0;t\x07.png", "relabel", "plain", "note\nwith\x1b[2J"])
        writer.writerow(["plain/1\n\x1b]0;t\x07.png", "remove", "", ""])
    result = invoke("relabel", decisions, "--manifest", manifest, "--dry-run")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3  # two decisions and the count, none split
    assert_escaped(result.output)


def test_json_log_lines_keep_the_exact_names(tmp_path, nasty_model):
    gone = tmp_path / "gone\x1b[2J\nhere"
    result = invoke("classify", gone, "-m", nasty_model, "-o", tmp_path / "o", "--log-format", "json")
    assert result.exit_code == EXIT_INPUT
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert str(gone) in record["message"]
