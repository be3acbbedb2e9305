"""The dinobatch command group: every command registered in one place."""

from __future__ import annotations

import click

from dinobatch import __version__
from dinobatch.cli import classify, curation, model, results, scan, training


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dinobatch")
def cli() -> None:
    """Curate an image-classification dataset with a model in the loop."""


for _command in (classify.classify, scan.scan, results.results, model.model, training.manifest, training.augment,
                 training.train, training.evaluate, training.sweep, curation.curate, curation.relabel,
                 curation.export, curation.similar):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dinobatch")
