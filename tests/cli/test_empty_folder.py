"""An empty inbox (only hidden files such as .gitkeep) is a normal cron night, not an error: exit 0.
A person running it is told on stderr which folder is empty and what belongs there; with -q (cron)
nothing is said, so an empty night mails nobody."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli


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
