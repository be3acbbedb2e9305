"""The dinobatch command group: every command registered in one place."""

from __future__ import annotations

import click

from dinobatch import __version__
from dinobatch.cli import classify, curation, model, results, scan, serve, training
from dinobatch.cli.common import config_option


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dinobatch")
def cli() -> None:
    """Curate an image-classification dataset with a model in the loop."""


for _command in (classify.classify, scan.scan, results.results, model.model, training.manifest, training.augment,
                 training.train, training.evaluate, training.sweep, curation.curate, curation.relabel,
                 curation.export, curation.similar, serve.serve):
    cli.add_command(_command)


def _tables(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    """Each command by its config file table: 'classify', 'model.import' for `dinobatch model import`."""
    tables: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            tables.update(_tables(command, f"{prefix}{name}."))
        else:
            tables[f"{prefix}{name}"] = command
    return tables


def _add_config_options(group: click.Group) -> None:
    """Every command gets the same --config FILE (after its arguments), reading its own table of the file."""
    tables = _tables(group)
    for table, command in tables.items():
        at = max((i + 1 for i, p in enumerate(command.params) if isinstance(p, click.Argument)), default=0)
        command.params.insert(at, config_option(table, tables))


_add_config_options(cli)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dinobatch")
