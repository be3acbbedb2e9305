"""Command line: parse options into a frozen config, call the library, map the outcome to an exit code."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

import click

from . import __version__
from .cli_params import SECONDS, config_type_error
from .config import CONFIG_ENV, MAX_BATCH_SIZE, MODEL_ENV, ClassifyConfig, load_config_file
from .device import CUDA_MAX_WORKERS, PRECISIONS
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, ConfigError, DinobatchError, OutputError
from .model import MAX_CROP, MAX_RESIZE
from .terminal import printable

__all__ = ["main", "cli"]

log = logging.getLogger("dinobatch")

_PROGRESS_LOG_EVERY_S = 10.0
# The --device help of every command that runs a model.
DEVICE_HELP = "auto, cpu, cuda or cuda:N (asked for and missing: error)."


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    """Log lines for people: names in a message escaped (terminal.printable), one record per line."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        text = record.getMessage()
        # a captured warning is laid out in lines on purpose (location, then the source line)
        keep = record.name == "py.warnings"
        record.msg, record.args = printable(text.rstrip("\n") if keep else text, keep_newlines=keep), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = msg, args

    def formatException(self, ei) -> str:
        return printable(super().formatException(ei), keep_newlines=True)


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("dinobatch.log_format") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("dinobatch: %(levelname)s: %(message)s" if verbose
                                            else "dinobatch: %(message)s"))
    logging.captureWarnings(True)  # library warnings become log records (JSON ones with --log-format json)
    for name in ("dinobatch", "py.warnings"):
        logging.getLogger(name).handlers[:] = [handler]
        logging.getLogger(name).propagate = False
    root = logging.getLogger("dinobatch")
    root.setLevel(level)
    root.propagate = False


def _run(action: Callable[[], Any]) -> Any:
    """Run a command body; turn domain errors, interrupts and bugs into a message and an exit code."""

    def on_term(signum, frame):  # cron's timeout or a shutdown: stop like Ctrl-C, keeping finished work
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    ctx = click.get_current_context(silent=True)
    pending = ctx.meta.get(_INPUT_ERROR) if ctx is not None else None
    try:
        if pending is not None:  # a FOLDER argument that is missing or not a folder (see _InputFolder)
            raise pending
        return action()
    except DinobatchError as exc:
        _say_error(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _say_error("interrupted; finished batches are saved and a rerun continues from them")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `dinobatch results DIR | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception:  # a bug: say so plainly, with the traceback, and a distinct exit code
        log.exception("unexpected error (please report it with this traceback)")
        sys.exit(EXIT_FAILED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say_error(message: str) -> None:
    """An error for the operator: a log record in JSON mode (so shippers see it), else plain stderr
    on one line, names escaped."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("dinobatch.log_format") == "json":
        log.error("%s", message)
    else:
        click.echo(f"dinobatch: {printable(message)}", err=True)


class _Progress:
    """A tqdm bar on a terminal; a log line every few seconds otherwise (cron, pipes)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bars: dict[str, Any] = {}
        self.last_log = 0.0
        self.started: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or total == 0:
            return
        if self.tty:
            self._bar(stage, done, total)
            return
        now = time.monotonic()
        if stage not in self.started:
            self.started[stage] = self.last_log = now
        if now - self.last_log >= _PROGRESS_LOG_EVERY_S or done == total:
            elapsed = now - self.started[stage]
            unit = "batches" if stage.startswith("epoch") else "files"
            rate = f", {done / elapsed:.1f} {unit}/s" if elapsed >= 1 else ""
            log.info("%s: %d/%d (%.0f%%)%s", stage, done, total, 100 * done / total, rate)
            self.last_log = now

    def _bar(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            unit = "batch" if stage.startswith("epoch") else "img"
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE fills Click's default_map, so flags and environment variables still win."""
    if value:
        params = {p.name: p for p in ctx.command.params if p.name not in ("config", "folder")}
        try:
            values = load_config_file(value, ctx.command.name, set(params))
            for key, raw in values.items():  # check types here, so the message names the file and key
                where = f"{value}: [{ctx.command.name}] {key} = {raw!r}"
                wrong = config_type_error(params[key], raw)
                if wrong:
                    raise ConfigError(f"{where}: {wrong}")
                try:
                    params[key].type_cast_value(ctx, raw)
                except click.BadParameter as exc:
                    raise ConfigError(f"{where}: {exc.message}") from exc
        except DinobatchError as exc:
            _say_error(f"error: {exc}")
            ctx.exit(exc.exit_code)
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _log_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    ctx.meta["dinobatch.log_format"] = value
    return value


_INPUT_ERROR = "dinobatch.input_error"


class _InputFolder(click.ParamType):
    """A FOLDER argument: missing or not a folder is an InputError (exit 6, as documented), not
    Click's usage error (exit 2); the value is passed on as given."""

    name = "folder"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .errors import InputError
        from .scan import check_folder

        try:
            check_folder(value)
        except InputError as exc:  # raised by _run, once the command has set up logging (--log-format json)
            if ctx is not None:
                ctx.meta.setdefault(_INPUT_ERROR, exc)
            else:
                raise
        return os.fspath(value)


INPUT_FOLDER = _InputFolder()


def _verbosity(f):
    f = click.option("--log-format", type=click.Choice(["text", "json"]), default="text", expose_value=False,
                     callback=_log_format, is_eager=True, help="Log lines as text or as JSON objects.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(f)
    return click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dinobatch")
def cli() -> None:
    """Curate an image-classification dataset with a model in the loop."""


@cli.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("--config", type=click.Path(dir_okay=False), envvar=CONFIG_ENV, callback=_load_config,
              is_eager=True, expose_value=False, help=f"TOML file with a [classify] table [env {CONFIG_ENV}].")
@click.option("-o", "--out", default="results", help="Output folder for Parquet rows and summaries.")
@click.option("-m", "--model", envvar=MODEL_ENV, default="imagenet",
              help=f"Model file, or 'imagenet' (torchvision ResNet50 weights) [env {MODEL_ENV}].")
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU.")
@click.option("-b", "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=None,
              help="Images per batch [default: 32 on CPU, the largest that fits (<= 512) on CUDA].")
@click.option("-j", "--workers", type=click.IntRange(min=0), default=None,
              help=("How images are decoded [default: on CPU, between batches, a pool of one process per usable "
                    f"core; on CUDA, cores-1 (at most {CUDA_MAX_WORKERS}) DataLoader workers]; N: N DataLoader "
                    "workers beside the model; 0: in this process."))
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the model: faster batches after a one-off compile (worth it for large runs).")
@click.option("--gpu-decode/--no-gpu-decode", default=True,
              help="On CUDA, decode JPEGs on the GPU (nvjpeg); other formats always on the CPU.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, help="Labels kept in topk_labels.")
@click.option("--embeddings", is_flag=True, help="Also store the 2048-d penultimate features per image.")
@click.option("--force", is_flag=True, help="Recompute every prediction, ignoring earlier results.")
@click.option("--species", type=click.Path(dir_okay=False), default=None,
              help="Species facts CSV [default: manifests/species.csv].")
@click.option("--phash-max", type=click.IntRange(0, 64), default=8, help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, 64), default=3, help="Near duplicate: dHash distance.")
@click.option("--wait", type=SECONDS, default=0.0,
              help="Seconds to wait for another run on the same --out before exiting with code 9.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the run summary to this file (atomically), for monitoring.")
@_verbosity
def classify(folder: str, quiet: bool, verbose: bool, as_json: bool, summary_json: str | None,
             **options: Any) -> None:
    """Classify every image under FOLDER; write one Parquet row per file to --out."""
    _setup_logging(quiet, verbose)

    def body():
        from .classify import classify as run_classify

        cfg = ClassifyConfig(folder=folder, **options)
        progress = _Progress(enabled=not quiet)
        try:
            summary = run_classify(cfg, progress)
        finally:
            progress.close()
        if summary_json:
            from .results import atomic_path

            try:
                os.makedirs(os.path.dirname(os.path.abspath(summary_json)), exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the folder of {summary_json}: {exc.strerror or exc}") from exc
            with atomic_path(summary_json, "write summary") as tmp:
                tmp.write_text(json.dumps(summary.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        if as_json:
            click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
        elif not quiet:
            _print_summary(summary)

    _run(body)


def _print_summary(s) -> None:
    _print_counts(s)
    # images_per_second is the inference stage's rate (decode + model over the new contents), not files
    # over the run's seconds, which also walk, hash and write: the line says which is which
    rate = f"; decode and inference: {s.images_per_second} images/s" if s.images_per_second else ""
    click.echo(f"inferred {s.inferred} new, reused {s.reused} ({s.runtime})")
    click.echo(f"{s.seconds:.1f} s in all{rate}")
    click.echo(f"rows: {printable(s.rows_file)}")
    _print_errors(s.errors, s.counts.get("error", 0))


def _print_counts(s) -> None:
    """A run's first summary line (classify's and scan's): files by status and duplicate groups."""
    c = s.counts
    click.echo(f"{s.files} files: {c.get('ok', 0)} ok, {c.get('duplicate', 0)} duplicate, "
               f"{c.get('error', 0)} error ({s.duplicate_groups} duplicate groups)")


_ERRORS_SHOWN = 5  # errors a summary prints; every one is a row with status "error"


def _print_errors(errors: list[dict[str, str]], total: int) -> None:
    """The first few errors of a run, then how many more the rows hold, so a cut list is not read as all."""
    for err in errors[:_ERRORS_SHOWN]:
        click.echo(f"  error: {printable(err['path'])}: {printable(err['error'])}")
    more = total - min(len(errors), _ERRORS_SHOWN)
    if more > 0:
        click.echo(f"  ... and {more} more error{'s' if more > 1 else ''} (every one is a row with status error)")


@cli.group()
def model() -> None:
    """Create and inspect dinobatch model files."""


@model.command("import")
@click.argument("state_dict", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", default="resnet50", help="torchvision architecture of the state_dict.")
@click.option("--labels", "labels_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file: one class label per line, in class-index order.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--resize", type=click.IntRange(1, MAX_RESIZE), default=256, help="Shorter side before cropping.")
@click.option("--crop", type=click.IntRange(1, MAX_CROP), default=224, help="Centre crop (model input size).")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default="bilinear",
              help="Resampling of the resize.")
@_verbosity
def model_import(state_dict: str, arch: str, labels_path: str, out: str, resize: int, crop: int,
                 interpolation: str, quiet: bool, verbose: bool) -> None:
    """Wrap a PyTorch state_dict of a torchvision ResNet and its labels into a model file."""
    _setup_logging(quiet, verbose)

    def body():
        from .model import Preprocessing, import_state_dict

        loaded = import_state_dict(state_dict, arch=arch, labels_path=labels_path, out=out,
                                   preprocessing=Preprocessing(resize=resize, crop=crop,
                                                               interpolation=interpolation))
        if not quiet:
            click.echo(f"wrote {printable(out)}: {arch}, {len(loaded.spec.labels)} classes, "
                       f"fingerprint {loaded.fingerprint[:16]}")

    _run(body)


@model.command("info")
@click.argument("model_ref")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def model_info(model_ref: str, as_json: bool) -> None:
    """Show what a model file (or 'imagenet') holds: architecture, labels, preprocessing, source."""
    _setup_logging(False, False)

    def body():
        from dataclasses import asdict

        from .model import resolve_model

        loaded = resolve_model(model_ref)
        info = {"name": loaded.name, "fingerprint": loaded.fingerprint, **asdict(loaded.spec)}
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        spec = loaded.spec
        p = spec.preprocessing
        click.echo(f"model:          {printable(loaded.name)}\nfingerprint:    {loaded.fingerprint}\n"
                   f"architecture:   {spec.arch}\nclasses:        {len(spec.labels)}\n"
                   f"preprocessing:  resize {p.resize} ({p.interpolation}), crop {p.crop}, "
                   f"mean {list(p.mean)}, std {list(p.std)}\ntemperature:    {spec.temperature}\n"
                   f"source:         {json.dumps(spec.source)}")
        more = " ..." if len(spec.labels) > 20 else ""
        click.echo("labels:         " + ", ".join(printable(x) for x in spec.labels[:20]) + more)

    _run(body)


@cli.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("--model", default=None, help="Only this model (a fingerprint or its first characters).")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="Write the current rows to FILE (.parquet, .csv or .jsonl) instead of printing them.")
@_verbosity
def results(folder, model, out, quiet, verbose) -> None:
    """Print or export the current rows of a classify output folder: one per file and model."""
    _setup_logging(quiet, verbose)

    def body():
        from .results import atomic_path, current_rows, json_plain, write_table

        table = current_rows(folder, model)
        if out is None:
            _print_rows(table)
            return
        suffix = out.rsplit(".", 1)[-1].lower()
        if suffix == "parquet":
            write_table(table, out)
        elif suffix in ("csv", "jsonl"):
            import pyarrow.csv as pacsv

            with atomic_path(out, "write") as tmp:
                if suffix == "csv":
                    import pyarrow as pa

                    from .terminal import spreadsheet_safe_column

                    flat = table.drop_columns([c for c in table.column_names
                                               if str(table.schema.field(c).type).startswith(("list", "binary"))])
                    flat = pa.table({c: spreadsheet_safe_column(flat[c]) if pa.types.is_string(flat.schema.field(c).type)
                                     else flat[c] for c in flat.column_names})
                    pacsv.write_csv(flat, tmp)
                else:
                    tmp.write_text("".join(json.dumps(r, default=json_plain) + "\n" for r in table.to_pylist()),
                                   encoding="utf-8")
        else:
            raise ConfigError(f"--out {out}: use a .parquet, .csv or .jsonl file name")
        if not quiet:
            click.echo(f"wrote {table.num_rows} current rows to {printable(out)}")

    _run(body)


def _print_rows(table) -> None:
    """Tab-separated, under a header, one line per row: names escaped, so a tab or newline in one
    cannot shift a column or split a row."""
    click.echo("path\tstatus\tlabel\tconfidence\tdetail")
    for r in table.select(["path", "status", "label", "confidence", "duplicate_of", "error"]).to_pylist():
        conf = f"{r['confidence']:.3f}" if r["confidence"] is not None else "-"
        fields = (r["path"], r["status"], r["label"] or "-", conf, r["duplicate_of"] or r["error"] or "")
        click.echo("\t".join(printable(f) for f in fields))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dinobatch")


# the other commands register themselves on `cli` (imported last: they import this module's helpers)
from . import cli_curate, cli_scan, cli_train  # noqa: E402,F401
