"""An empty inbox (only hidden files such as .gitkeep) is a normal cron night, not an error: exit 0.
A person running it is told on stderr which folder is empty and what belongs there; with -q (cron)
nothing is said, so an empty night mails nobody."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.store.runs import current_rows


@pytest.fixture
def empty_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / ".gitkeep").write_text("")
    return inbox


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_classify_on_an_empty_folder_says_what_to_put_there(empty_inbox, tiny_model, tmp_path, flags):
    result = invoke("classify", empty_inbox, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", *flags)
    assert result.exit_code == 0, result.output
    assert str(empty_inbox) in result.stderr and "no files to" in result.stderr
    assert "put the images there" in result.stderr
    if "--json" in flags:
        assert json.loads(result.stdout)["files"] == 0  # stdout stays clean JSON


def test_an_empty_folder_under_cron_is_silent(empty_inbox, tiny_model, tmp_path):
    result = invoke("classify", empty_inbox, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "-q")
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""


def test_scan_on_an_empty_folder_says_what_to_put_there(empty_inbox, tmp_path):
    result = invoke("scan", empty_inbox, "-o", tmp_path / "scan.parquet", "-j", "0")
    assert result.exit_code == 0, result.output
    assert str(empty_inbox) in result.stderr and "no files to" in result.stderr
    assert "put the images there" in result.stderr


def test_a_folder_with_images_gets_no_such_warning(tmp_path, tiny_model):
    from tests.helpers import picture, save

    save(picture(0), tmp_path / "in" / "a.png")
    result = invoke("classify", tmp_path / "in", "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "-q")
    assert result.exit_code == 0 and "no files to" not in result.stderr


def _offline(monkeypatch, tmp_path) -> None:
    """No cached torchvision weights, and any download fails at once (nothing listens on the proxy)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def test_an_empty_folder_offline_exits_0_without_the_default_weights(empty_inbox, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    result = invoke("classify", empty_inbox, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 0 and summary["model"]["name"] == "imagenet"
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["run_id"] == summary["run_id"]
    assert pq.read_table(summary["rows_file"]).num_rows == 0
    assert not (tmp_path / "torch").exists()  # nothing was fetched


def test_an_empty_folder_names_the_model_file_without_loading_it(empty_inbox, tiny_model, tmp_path, monkeypatch):
    from dinobatch.models.file import file_sha256

    def no_load(path):
        raise AssertionError(f"loaded {path}")

    from tests.helpers import picture, save

    save(picture(0), tmp_path / "in" / "a.png")
    first = invoke("classify", tmp_path / "in", "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "-q")
    assert first.exit_code == 0 and len(current_rows(tmp_path / "out")) == 1
    monkeypatch.setattr("dinobatch.models.file.load_model", no_load)
    result = invoke("classify", empty_inbox, "-m", tiny_model, "-o", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"]["fingerprint"] == file_sha256(tiny_model)
    # the empty rows file is that model's newest run, as when the model is loaded: its earlier rows
    # (the image classified before) are no longer current
    assert len(current_rows(tmp_path / "out")) == 0


def test_an_empty_folder_still_refuses_a_missing_model_file(empty_inbox, tmp_path):
    result = invoke("classify", empty_inbox, "-m", tmp_path / "nope.pt", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 4 and "model file not found" in result.stderr


def test_an_empty_folder_still_refuses_a_model_file_that_is_not_one(empty_inbox, tmp_path):
    text = tmp_path / "model.pt"
    text.write_text("not a model\n")
    result = invoke("classify", empty_inbox, "-m", text, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 4 and "is not a PyTorch file" in result.stderr


def test_an_empty_folder_still_refuses_torchvision_weights_that_do_not_exist(empty_inbox, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)
    result = invoke("classify", empty_inbox, "-m", "imagenet:BOGUS", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 4 and "unknown resnet50 weights 'BOGUS'" in result.stderr


def test_an_empty_folder_still_refuses_a_gpu_the_machine_lacks(empty_inbox, tiny_model, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("classify", empty_inbox, "-m", tiny_model, "-o", tmp_path / "out", "--device", "cuda", "-q")
    assert result.exit_code == 5, result.output


def test_results_and_curate_see_an_empty_night_of_the_default_weights(empty_inbox, tmp_path, monkeypatch):
    """Offline, the default weights' fingerprint is unknown on an empty night: the run is still a run."""
    _offline(monkeypatch, tmp_path)
    assert invoke("classify", empty_inbox, "-o", tmp_path / "out", "-q").exit_code == 0
    shown = invoke("results", tmp_path / "out")
    assert shown.exit_code == 0, shown.output
    queued = CliRunner().invoke(cli, ["curate", str(tmp_path / "out"), "-o", str(tmp_path / "queue")])
    assert queued.exit_code == 6 and "the latest classify run has no rows" in queued.stderr


def test_curate_after_an_empty_night_says_the_run_has_no_rows(empty_inbox, tiny_model, tmp_path):
    assert invoke("classify", empty_inbox, "-m", tiny_model, "-o", tmp_path / "out", "-q").exit_code == 0
    result = CliRunner().invoke(cli, ["curate", str(tmp_path / "out"), "-o", str(tmp_path / "queue")])
    assert result.exit_code == 6 and "the latest classify run has no rows" in result.stderr
