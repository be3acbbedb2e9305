"""DINOBATCH_DECODE_MEMORY, the decode budget of classify's worker pools, as a user sets it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.imaging.decode_budget import ENV
from dinobatch.errors import EXIT_CONFIG
from tests.helpers import picture, save


def classify(tmp_path, model, env: dict[str, str], workers: tuple[str, ...] = ("-j", "2")):
    folder = tmp_path / "in"
    save(picture(1, (600, 400)).convert("P"), folder / "a.gif")
    save(picture(2, (400, 600)).convert("RGBA"), folder / "b.png")
    args = ["classify", str(folder), "-m", str(model), "-o", str(tmp_path / "out"), *workers, "-q", "--json"]
    return CliRunner().invoke(cli, args, env=env, catch_exceptions=False)


@pytest.mark.parametrize("workers", [("-j", "2"), ()], ids=["loader", "burst-pool"])
def test_a_small_budget_still_classifies_every_image(tmp_path, tiny_model, workers):
    result = classify(tmp_path, tiny_model, {ENV: "1"}, workers)  # 1 MiB: every decode waits to run alone
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 0


def test_a_budget_that_is_not_a_number_of_mib_is_a_config_error_naming_it(tmp_path, tiny_model):
    result = classify(tmp_path, tiny_model, {ENV: "2GB"})
    assert result.exit_code == EXIT_CONFIG
    assert ENV in result.output and "'2GB'" in result.output


def test_a_bad_budget_is_refused_before_the_folder_is_read(tmp_path, tiny_model):
    """Refused at the start, not after the whole inbox was walked and hashed: no output folder is made."""
    result = classify(tmp_path, tiny_model, {ENV: "0"})
    assert result.exit_code == EXIT_CONFIG
    assert not (tmp_path / "out").exists()
