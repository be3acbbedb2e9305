"""What every command shares: logging, progress, errors to exit codes, the FOLDER argument."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Collection, NoReturn

import click

from dinobatch.cli.params import FileName, ModelRef, config_type_error
from dinobatch.config import CONFIG_ENV, MAX_BATCH_SIZE, ClassifyConfig, load_config_file
from dinobatch.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError, DinobatchError
from dinobatch.io.terminal import printable
from dinobatch.runtime.device import AUTO_PRECISION_RULE, BATCH_SIZE_RULE, CUDA_MAX_WORKERS, PRECISIONS

log = logging.getLogger("dinobatch")


_PROGRESS_LOG_EVERY_S = 10.0


def default_of(config: type, name: str) -> Any:
    """The default of a config dataclass's field: an option's default is read from there, its one home."""
    field = next((f for f in dataclasses.fields(config) if f.name == name), None)
    if field is None or field.default is dataclasses.MISSING:
        raise TypeError(f"{config.__name__}.{name} is not a field with a default")
    return field.default


# The --device help of every command that runs a model.
DEVICE_HELP = "auto, cpu, cuda or cuda:N (asked for and missing: error)."
# The --precision help of every command that runs a model (train and sweep autocast as classify does).
PRECISION_HELP = f"auto: {AUTO_PRECISION_RULE}."
# The help of the options every command that predicts as classify does has (classify, evaluate, similar).
BATCH_SIZE_HELP = f"Images per batch [default: {BATCH_SIZE_RULE}]."
WORKERS_HELP = ("How images are decoded [default: on CPU, between batches, a pool of one process per usable core; "
                f"on CUDA, cores-1 (at most {CUDA_MAX_WORKERS}) DataLoader workers]; N: N DataLoader workers beside "
                "the model; 0: in this process.")


def predict_options(f):
    """--precision, -b/--batch-size and -j/--workers as classify has them: the commands that predict
    as classify does (classify, evaluate, similar) take the same values with the same defaults."""
    for decorator in reversed([
        click.option("--precision", type=click.Choice(PRECISIONS), default=default_of(ClassifyConfig, "precision"),
                     help=PRECISION_HELP),
        click.option("-b", "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=None, help=BATCH_SIZE_HELP),
        click.option("-j", "--workers", type=click.IntRange(min=0), default=None, help=WORKERS_HELP),
    ]):
        f = decorator(f)
    return f


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


def setup_logging(quiet: bool, verbose: bool) -> None:
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


def run(action: Callable[[], Any]) -> Any:
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
        fail(exc)
    except KeyboardInterrupt:
        say_error("interrupted; finished batches are saved and a rerun continues from them")
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `dinobatch results DIR | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_OK)
    except Exception:  # a bug: say so plainly, with the traceback, and a distinct exit code
        log.exception("unexpected error (please report it with this traceback)")
        sys.exit(EXIT_FAILED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(exc: DinobatchError) -> NoReturn:
    """Say a domain error and exit with its code: the one place an error becomes an exit code."""
    say_error(f"error: {exc}")
    sys.exit(exc.exit_code)


def say_error(message: str) -> None:
    """An error for the operator: a log record in JSON mode (so shippers see it), else plain stderr
    on one line, names escaped."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("dinobatch.log_format") == "json":
        log.error("%s", message)
    else:
        click.echo(f"dinobatch: {printable(message)}", err=True)


class Progress:
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


def config_option(table: str, tables: Collection[str]) -> click.Option:
    """The --config FILE option of the command whose TOML table is `table` ('scan', 'model.import');
    `tables` are every command's, which the file may also hold. cli.main gives one to every command."""
    return click.Option(["--config"], type=click.Path(dir_okay=False), envvar=CONFIG_ENV, is_eager=True,
                        expose_value=False, callback=functools.partial(_load_config, table=table, tables=tuple(tables)),
                        help=f"TOML file with a [{table}] table [env {CONFIG_ENV}].")


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None, *, table: str,
                 tables: tuple[str, ...]) -> str | None:
    """--config FILE fills Click's default_map, so flags and environment variables still win."""
    if value:
        try:
            values = _config_values(ctx, value, table, tables)
        except DinobatchError as exc:
            fail(exc)
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _config_values(ctx: click.Context, path: str, table: str, tables: tuple[str, ...]) -> dict[str, Any]:
    """The command's table of the file as {parameter: value}, each value checked against its option's type
    here, so the message names the file, table and key."""
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config"}
    keys = {p.name: p.name for p in params.values()}  # the parameter's name (as_json), and
    keys.update({o.lstrip("-").replace("-", "_"): p.name for p in params.values() for o in p.opts
                 if o.startswith("--")})  # its option's long name (json), as a user reads it in --help
    paths = [n for n, p in params.items() if isinstance(p.type, (click.Path, FileName))]
    models = [n for n, p in params.items() if isinstance(p.type, ModelRef)]
    values = load_config_file(path, table, keys, sections=tables, paths=paths, models=models)
    for key, raw in values.items():
        where = f"{path}: [{table}] {key} = {raw!r}"
        wrong = config_type_error(params[key], raw)
        if wrong:
            raise ConfigError(f"{where}: {wrong}")
        try:
            params[key].type_cast_value(ctx, raw)
        except click.BadParameter as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
    return values


def _log_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    ctx.meta["dinobatch.log_format"] = value
    return value


_INPUT_ERROR = "dinobatch.input_error"


class _InputFolder(click.ParamType):
    """A FOLDER argument, a local path or a URI (s3://bucket/prefix; see io.uri): missing, not a folder
    or not listable is an InputError (exit 6, as documented), not Click's usage error (exit 2); the
    value is passed on as given."""

    name = "folder"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from dinobatch.errors import InputError
        from dinobatch.io.walk import check_folder

        try:
            check_folder(value)
        except InputError as exc:  # raised by run, once the command has set up logging (--log-format json)
            if ctx is not None:
                ctx.meta.setdefault(_INPUT_ERROR, exc)
            else:
                raise
        return os.fspath(value)


INPUT_FOLDER = _InputFolder()


def verbosity(f):
    f = click.option("--log-format", type=click.Choice(["text", "json"]), default="text", expose_value=False,
                     callback=_log_format, is_eager=True, help="Log lines as text or as JSON objects.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")(f)
    return click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress.")(f)


def print_counts(s) -> None:
    """A run's first summary line (classify's and scan's): files by status and duplicate groups."""
    from dinobatch.schema import STATUSES  # here: the schema module loads pyarrow, which --help does not need

    counts = ", ".join(f"{s.counts.get(status, 0)} {status}" for status in STATUSES)
    click.echo(f"{s.files} files: {counts} ({s.duplicate_groups} duplicate groups)")


_ERRORS_SHOWN = 5  # errors a summary prints; every one is a row with status "error"


def print_errors(errors: list[dict[str, str]], total: int) -> None:
    """The first few errors of a run, then how many more the rows hold, so a cut list is not read as all."""
    from dinobatch.schema import Col

    for err in errors[:_ERRORS_SHOWN]:
        click.echo(f"  error: {printable(err[Col.PATH])}: {printable(err[Col.ERROR])}")
    more = total - min(len(errors), _ERRORS_SHOWN)
    if more > 0:
        click.echo(f"  ... and {more} more error{'s' if more > 1 else ''} (every one is a row with status error)")


def engine_options(config: type):
    """--engine and --address as classify and scan take them (their defaults: config's fields)."""
    from dinobatch.engines import ENGINES, RAY_EXTRA

    def decorate(f):
        f = click.option("--address", envvar="RAY_ADDRESS", default=default_of(config, "address"),
                         help="--engine ray: the Ray cluster to join [default: a local Ray started for the run; "
                              "env RAY_ADDRESS].")(f)
        return click.option("--engine", type=click.Choice(ENGINES), default=default_of(config, "engine"),
                            help=f"What runs the work: this machine, or a Ray cluster (needs {RAY_EXTRA}).")(f)
    return decorate
