"""A FOLDER argument that is missing or is a file: exit 6 (InputError) with a message naming it, for
every command that takes a folder, as docs/output.md's exit-code table says (not Click's usage code 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_INPUT

COMMANDS = {
    "classify": ["classify", "{p}", "-o", "{tmp}/out"],
    "scan": ["scan", "{p}", "-o", "{tmp}/scan.parquet"],
    "results": ["results", "{p}"],
    "manifest": ["manifest", "{p}", "-o", "{tmp}/m.parquet"],
    "curate": ["curate", "{p}", "-o", "{tmp}/queue"],
    "export": ["export", "{p}", "--to", "{tmp}/to", "--min-confidence", "0.5"],
}


@pytest.mark.parametrize("kind", ["a file", "missing"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_that_is_a_file_or_missing_exits_6_naming_it(tmp_path, command, kind):
    target = tmp_path / "given.txt"
    if kind == "a file":
        target.write_text("not a folder\n")
    args = [a.format(p=target, tmp=tmp_path) for a in COMMANDS[command]]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == EXIT_INPUT, result.output
    message = result.stderr
    assert "given.txt" in message and ("not a folder" in message or "not found" in message), message
    assert "Usage:" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "queue").exists() and not (tmp_path / "to").exists()
