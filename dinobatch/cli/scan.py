"""Command line, model-free inventory: scan (registered on cli's group)."""

from __future__ import annotations

import logging
import sys

import click

from dinobatch.cli.common import (
    INPUT_FOLDER,
    Progress,
    default_of,
    engine_options,
    print_counts,
    print_errors,
    run,
    say_error,
    setup_logging,
    verbosity,
)
from dinobatch.config import ScanConfig
from dinobatch.dedupe import HASH_BITS
from dinobatch.errors import EXIT_INTERRUPTED
from dinobatch.io.terminal import printable

log = logging.getLogger("dinobatch")


@click.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("-o", "--output", default=default_of(ScanConfig, "output"), type=click.Path(dir_okay=False),
              help="Parquet file to write (atomically): one row per file found.")
@click.option("-j", "--workers", type=click.IntRange(min=0), default=None,
              help="Hashing processes [default: every usable core]; 0 hashes in this process.")
@click.option("--phash-max", type=click.IntRange(0, HASH_BITS), default=default_of(ScanConfig, "phash_max"),
              help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, HASH_BITS), default=default_of(ScanConfig, "dhash_max"),
              help="Near duplicate: dHash distance.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the run summary to this file (atomically), for monitoring.")
@engine_options(ScanConfig)
@verbosity
def scan(folder: str, output: str, workers: int | None, phash_max: int, dhash_max: int,
         summary_json: str | None, engine: str, address: str | None, quiet: bool, verbose: bool) -> None:
    """Inventory FOLDER without a model: sha256, pHash, dHash and duplicate groups, one row per file."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.io.files import write_json
        from dinobatch.jobs.scan import scan_folder

        cfg = ScanConfig(folder=folder, output=output, workers=workers, phash_max=phash_max,
                         dhash_max=dhash_max, engine=engine, address=address)
        progress = Progress(enabled=not quiet)
        try:
            summary = scan_folder(cfg, progress)
        except KeyboardInterrupt:  # classify's message would promise saved batches: scan has none
            say_error("interrupted; nothing was written (the output is only ever replaced whole)")
            sys.exit(EXIT_INTERRUPTED)
        finally:
            progress.close()
        if summary_json:
            write_json(summary.to_dict(), summary_json)
        _log_summary(summary)
        if not quiet:
            _print_summary(summary)

    run(body)


def _print_summary(s) -> None:
    """The summary on stdout, as classify prints its own."""
    print_counts(s)
    rate = f", {s.images_per_second} images/s" if s.images_per_second else ""
    click.echo(f"{s.seconds:.1f} s{rate}\nrows: {printable(s.output)}")
    from dinobatch.schema import STATUS_ERROR

    print_errors(s.errors, s.counts[STATUS_ERROR])


def _log_summary(s) -> None:
    """With --log-format json, the summary also as one JSON log record on stderr, for log shippers."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.meta.get("dinobatch.log_format") != "json":
        return
    from dinobatch.schema import STATUSES

    counts = ", ".join(f"{s.counts[status]} {status}" for status in STATUSES)
    rate = f", {s.images_per_second} images/s" if s.images_per_second else ""
    log.info("%d files: %s (%d duplicate groups); %.1f s%s -> %s",
             s.files, counts, s.duplicate_groups, s.seconds, rate, s.output)
