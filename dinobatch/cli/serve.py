"""Command line: serve (the local web application; needs the dinobatch[serve] extra)."""

from __future__ import annotations

import logging
from typing import Any

import click

from dinobatch.cli.common import DEVICE_HELP, PRECISION_HELP, default_of, run, setup_logging, verbosity
from dinobatch.cli.params import FILE_NAME, FINITE, MODEL_REF
from dinobatch.config import MAX_BATCH_SIZE, MODEL_ENV
from dinobatch.errors import ConfigError
from dinobatch.runtime.device import PRECISIONS
from dinobatch.serve.config import ServeConfig

SERVE_EXTRA = "pip install 'dinobatch[serve]'"


@click.command()
@click.option("-m", "--model", type=MODEL_REF, envvar=MODEL_ENV, required=True,
              help=f"Model file, or 'imagenet' [env {MODEL_ENV}].")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Manifest of labelled reference images: /api/similar, and the duplicates /api/predict reports.")
@click.option("--queue", type=click.Path(exists=True, file_okay=False), default=None,
              help="curate's output folder: review it in the browser at /review.")
@click.option("--host", default=default_of(ServeConfig, "host"),
              help="Address to listen on; anything but loopback is logged as a warning.")
@click.option("--port", type=click.IntRange(0, 65535), default=default_of(ServeConfig, "port"),
              help="Port to listen on (0: any free port; the log says which).")
@click.option("--device", default=default_of(ServeConfig, "device"), help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(PRECISIONS), default=default_of(ServeConfig, "precision"),
              help=PRECISION_HELP)
@click.option("-b", "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE),
              default=default_of(ServeConfig, "batch_size"), help="Requests sharing one forward pass at most.")
@click.option("--max-wait-ms", type=FINITE, default=default_of(ServeConfig, "max_wait_ms"),
              help="Milliseconds a request waits for others to share its forward pass (0: no waiting).")
@click.option("--max-upload-mb", type=FINITE, default=default_of(ServeConfig, "max_upload_mb"),
              help="Largest upload accepted, in MB; a larger one gets HTTP 413 before it is read.")
@click.option("--species", type=FILE_NAME, default=None, help="Species facts CSV [default: manifests/species.csv].")
@click.option("--cache", type=FILE_NAME, default=None,
              help="Folder for cached reference embeddings [default: ~/.cache/dinobatch/embeddings].")
@click.option("--access-log", is_flag=True, help="Log every request (method, path, status).")
@verbosity
def serve(quiet: bool, verbose: bool, access_log: bool, **options: Any) -> None:
    """Serve the review page (--queue) and the app's endpoints (predict, similar) over HTTP."""
    setup_logging(quiet, verbose)

    def body():
        cfg = ServeConfig(**options)  # bad values: ConfigError (exit 3) before anything loads
        try:
            from dinobatch.serve.app import serve as run_server
        except ImportError as exc:
            raise ConfigError(f"dinobatch serve needs its extra ({exc.name} is missing): {SERVE_EXTRA}") from exc
        _log_uvicorn_like_dinobatch()
        run_server(cfg, access_log=access_log)

    run(body)


def _log_uvicorn_like_dinobatch() -> None:
    """uvicorn's messages through dinobatch's handler and level (text or JSON), not its own set-up."""
    ours = logging.getLogger("dinobatch")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [] if name != "uvicorn" else list(ours.handlers)
        logger.propagate = name != "uvicorn"
        logger.setLevel(ours.level)
