"""Command line: one module per command group; common.py holds what they share."""

from dinobatch.cli.main import cli, main

__all__ = ["cli", "main"]
