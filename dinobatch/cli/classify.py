"""Command line: classify."""

from __future__ import annotations

import json
from typing import Any

import click

from dinobatch.cli.common import (
    DEVICE_HELP,
    INPUT_FOLDER,
    Progress,
    default_of,
    engine_options,
    predict_options,
    print_counts,
    print_errors,
    run,
    setup_logging,
    verbosity,
)
from dinobatch.cli.params import FILE_NAME, MODEL_REF, SECONDS
from dinobatch.config import MODEL_ENV, ClassifyConfig
from dinobatch.dedupe import HASH_BITS
from dinobatch.io.terminal import printable


@click.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("-o", "--out", type=FILE_NAME, default=default_of(ClassifyConfig, "out"),
              help="Output folder for Parquet rows and summaries.")
@click.option("-m", "--model", type=MODEL_REF, envvar=MODEL_ENV, default=default_of(ClassifyConfig, "model"),
              help=f"Model file, or 'imagenet' (torchvision ResNet50 weights) [env {MODEL_ENV}].")
@click.option("--device", default=default_of(ClassifyConfig, "device"), help=DEVICE_HELP)
@predict_options
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the model: faster batches after a one-off compile (worth it for large runs).")
@click.option("--gpu-decode/--no-gpu-decode", default=default_of(ClassifyConfig, "gpu_decode"),
              help="On CUDA, decode JPEGs on the GPU (nvjpeg); other formats always on the CPU.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=default_of(ClassifyConfig, "top_k"),
              help="Labels kept in topk_labels.")
@click.option("--embeddings", is_flag=True, help="Also store the 2048-d penultimate features per image.")
@click.option("--force", is_flag=True, help="Recompute every prediction, ignoring earlier results.")
@click.option("--species", type=click.Path(dir_okay=False), default=None,
              help="Species facts CSV [default: manifests/species.csv].")
@click.option("--phash-max", type=click.IntRange(0, HASH_BITS), default=default_of(ClassifyConfig, "phash_max"),
              help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, HASH_BITS), default=default_of(ClassifyConfig, "dhash_max"),
              help="Near duplicate: dHash distance.")
@click.option("--wait", type=SECONDS, default=default_of(ClassifyConfig, "wait"),
              help="Seconds to wait for another run on the same --out before exiting with code 9.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the run summary to this file (atomically), for monitoring.")
@engine_options(ClassifyConfig)
@verbosity
def classify(folder: str, quiet: bool, verbose: bool, as_json: bool, summary_json: str | None,
             **options: Any) -> None:
    """Classify every image under FOLDER; write one Parquet row per file to --out."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.jobs.classify import classify as run_classify

        cfg = ClassifyConfig(folder=folder, **options)
        progress = Progress(enabled=not quiet)
        try:
            summary = run_classify(cfg, progress)
        finally:
            progress.close()
        if summary_json:  # the same bytes as OUT/_summary.json, for monitoring that does not know OUT
            from dinobatch.io.files import write_json

            write_json(summary.to_dict(), summary_json)
        if as_json:
            click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
        elif not quiet:
            _print_summary(summary)

    run(body)


def _print_summary(s) -> None:
    print_counts(s)
    # images_per_second is the inference stage's rate (decode + model over the new contents), not files
    # over the run's seconds, which also walk, hash and write: the line says which is which
    rate = f"; decode and inference: {s.images_per_second} images/s" if s.images_per_second else ""
    click.echo(f"inferred {s.inferred} new, reused {s.reused} ({s.runtime})")
    click.echo(f"{s.seconds:.1f} s in all{rate}")
    click.echo(f"rows: {printable(s.rows_file)}")
    from dinobatch.schema import STATUS_ERROR

    print_errors(s.errors, s.counts.get(STATUS_ERROR, 0))
