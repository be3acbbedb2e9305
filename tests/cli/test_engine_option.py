"""--engine ray where Ray Data is not installed: a configuration error (exit 3) naming the extra, before any work."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_CONFIG


@pytest.mark.parametrize("command, output", [("classify", "out"), ("scan", "scan.parquet")])
def test_engine_ray_without_the_extra_names_it(tmp_path, monkeypatch, command, output):
    monkeypatch.setitem(sys.modules, "ray", None)  # as where `pip install 'dinobatch[ray]'` was never run
    monkeypatch.setitem(sys.modules, "ray.data", None)
    (tmp_path / "inbox").mkdir()
    args = [command, str(tmp_path / "inbox"), "-o", str(tmp_path / output), "--engine", "ray"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == EXIT_CONFIG, result.output
    assert "pip install 'dinobatch[ray]'" in result.output
    assert not (tmp_path / output).exists()  # refused before any work
