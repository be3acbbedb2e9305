"""The README and `--help` tell a user the same, true things: every option is explained, none is invented."""

from __future__ import annotations

import re

import click
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.curation.curate import REASONS
from dinobatch.runtime.device import CUDA_MAX_WORKERS
from tests.helpers import REPO
from tests.helpers import cli_commands as _commands

_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND_BEFORE = re.compile(r"`(?:dinobatch )?([a-z]+(?: [a-z]+)?) $")  # "`classify --embeddings`"


def _section(readme: str, name: str) -> str:
    """The README's section on `dinobatch NAME`, up to the next heading of any level."""
    parts = readme.split(f"### `dinobatch {name}", 1)
    assert len(parts) == 2, f"README has no section for dinobatch {name}"
    return re.split(r"\n#{2,3} ", parts[1], maxsplit=1)[0]


def test_every_option_of_every_command_has_help():
    for name, command in _commands(cli):
        ctx = click.Context(command, info_name=name, show_default=False)
        for param in command.params:
            if isinstance(param, click.Option):
                record = param.get_help_record(ctx)
                assert record and record[1].strip(), f"dinobatch {name} {param.opts[-1]} has no help text"


def test_readme_names_no_option_a_command_does_not_have():
    readme = (REPO / "README.md").read_text()
    names = dict(_commands(cli))
    for name, command in names.items():
        body = _section(readme, name)
        params = command.get_params(click.Context(command, info_name=name))  # with --help
        known = {opt for param in params for opt in [*param.opts, *getattr(param, "secondary_opts", [])]}
        for match in _OPTION.finditer(body):
            # "`classify --embeddings`" in curate's section names another command's option
            before = _COMMAND_BEFORE.search(body[max(0, match.start() - 40):match.start()])
            if before and before.group(1) in names and before.group(1) != name:
                assert match.group() in {o for p in names[before.group(1)].params for o in p.opts}, (
                    f"README's section on {name} names {before.group(1)} {match.group()}, which does not exist")
                continue
            assert match.group() in known, f"README's section on {name} names {match.group()}, which it does not have"


def test_curate_fail_on_help_names_every_reason():
    out = CliRunner().invoke(cli, ["curate", "--help"], terminal_width=2000).output
    fail_on = next(line for line in out.splitlines() if "--fail-on" in line)
    for reason in REASONS:
        assert reason in fail_on, f"curate --fail-on help does not name {reason}"


def test_classify_workers_help_states_the_real_default():
    out = CliRunner().invoke(cli, ["classify", "--help"], terminal_width=2000).output
    workers = next(line for line in out.splitlines() if "--workers" in line)
    assert "half the cores" not in workers
    assert "one process per usable core" in workers and f"at most {CUDA_MAX_WORKERS}" in workers
