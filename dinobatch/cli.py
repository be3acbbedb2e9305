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
from .config import CONFIG_ENV, MODEL_ENV, ClassifyConfig, load_config_file
from .device import PRECISIONS
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_THRESHOLD, ConfigError, DinobatchError, OutputError

__all__ = ["main", "cli"]

log = logging.getLogger("dinobatch")

_PROGRESS_LOG_EVERY_S = 10.0


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("dinobatch.log_format") == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("dinobatch: %(levelname)s: %(message)s" if verbose
                                               else "dinobatch: %(message)s"))
    root = logging.getLogger("dinobatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _run(action: Callable[[], Any]) -> Any:
    """Run a command body; turn domain errors, interrupts and bugs into a message and an exit code."""

    def on_term(signum, frame):  # cron's timeout or a shutdown: stop like Ctrl-C, keeping finished work
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
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
    """An error for the operator: a log record in JSON mode (so shippers see it), else plain stderr."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("dinobatch.log_format") == "json":
        log.error("%s", message)
    else:
        click.echo(f"dinobatch: {message}", err=True)


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
                try:
                    params[key].type_cast_value(ctx, raw)
                except click.BadParameter as exc:
                    raise ConfigError(f"{value}: [{ctx.command.name}] {key} = {raw!r}: {exc.message}") from exc
        except DinobatchError as exc:
            click.echo(f"dinobatch: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _log_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    ctx.meta["dinobatch.log_format"] = value
    return value


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
@click.argument("folder", type=click.Path(file_okay=False, path_type=str))
@click.option("--config", type=click.Path(dir_okay=False), envvar=CONFIG_ENV, callback=_load_config,
              is_eager=True, expose_value=False, help=f"TOML file with a [classify] table [env {CONFIG_ENV}].")
@click.option("-o", "--out", default="results", help="Output folder for Parquet rows and summaries.")
@click.option("-m", "--model", envvar=MODEL_ENV, default="imagenet",
              help=f"Model file, or 'imagenet' (torchvision ResNet50 weights) [env {MODEL_ENV}].")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N (asked for and missing: error).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU.")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=32)
@click.option("-j", "--workers", type=click.IntRange(min=0), default=None,
              help="Decode worker processes [default: half the cores on CPU, cores-1 (max 8) on CUDA].")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, help="Labels kept in topk_labels.")
@click.option("--embeddings", is_flag=True, help="Also store the 2048-d penultimate features per image.")
@click.option("--force", is_flag=True, help="Recompute every prediction, ignoring earlier results.")
@click.option("--species", type=click.Path(dir_okay=False), default=None,
              help="Species facts CSV [default: manifests/species.csv].")
@click.option("--phash-max", type=click.IntRange(0, 64), default=8, help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, 64), default=3, help="Near duplicate: dHash distance.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0,
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
    c = s.counts
    click.echo(f"{s.files} files: {c.get('ok', 0)} ok, {c.get('duplicate', 0)} duplicate, "
               f"{c.get('error', 0)} error ({s.duplicate_groups} duplicate groups)")
    rate = f", {s.images_per_second} images/s" if s.images_per_second else ""
    click.echo(f"inferred {s.inferred} new, reused {s.reused}; {s.seconds:.1f} s{rate} on {s.runtime}")
    click.echo(f"rows: {s.rows_file}")
    for err in s.errors[:5]:
        click.echo(f"  error: {err['path']}: {err['error']}")


@cli.group()
def model() -> None:
    """Create and inspect dinobatch model files."""


@model.command("import")
@click.argument("state_dict", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", default="resnet50", help="torchvision architecture of the state_dict.")
@click.option("--labels", "labels_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file: one class label per line, in class-index order.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--resize", type=click.IntRange(min=1), default=256, help="Shorter side before cropping.")
@click.option("--crop", type=click.IntRange(min=1), default=224, help="Centre crop (model input size).")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default="bilinear")
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
            click.echo(f"wrote {out}: {arch}, {len(loaded.spec.labels)} classes, "
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
        click.echo(f"model:          {loaded.name}\nfingerprint:    {loaded.fingerprint}\n"
                   f"architecture:   {spec.arch}\nclasses:        {len(spec.labels)}\n"
                   f"preprocessing:  resize {p.resize} ({p.interpolation}), crop {p.crop}, "
                   f"mean {list(p.mean)}, std {list(p.std)}\ntemperature:    {spec.temperature}\n"
                   f"source:         {json.dumps(spec.source)}")
        click.echo("labels:         " + ", ".join(spec.labels[:20]) + (" ..." if len(spec.labels) > 20 else ""))

    _run(body)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--model", default=None, help="Only this model (a fingerprint or its first characters).")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="Write the current rows to FILE (.parquet, .csv or .jsonl) instead of printing them.")
@_verbosity
def results(folder, model, out, quiet, verbose) -> None:
    """Print or export the current rows of a classify output folder: one per file and model."""
    _setup_logging(quiet, verbose)

    def body():
        from .results import atomic_path, current_rows, write_table

        table = current_rows(folder, model)
        if out is None:
            for r in table.select(["path", "status", "label", "confidence", "duplicate_of", "error"]).to_pylist():
                conf = f"{r['confidence']:.3f}" if r["confidence"] is not None else "-"
                extra = r["duplicate_of"] or r["error"] or ""
                click.echo(f"{r['path']}\t{r['status']}\t{r['label'] or '-'}\t{conf}\t{extra}")
            return
        suffix = out.rsplit(".", 1)[-1].lower()
        if suffix == "parquet":
            write_table(table, out)
        elif suffix in ("csv", "jsonl"):
            import pyarrow.csv as pacsv

            with atomic_path(out, "write") as tmp:
                if suffix == "csv":
                    flat = table.drop_columns([c for c in table.column_names
                                               if str(table.schema.field(c).type).startswith(("list", "binary"))])
                    pacsv.write_csv(flat, tmp)
                else:
                    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in table.to_pylist()),
                                   encoding="utf-8")
        else:
            raise ConfigError(f"--out {out}: use a .parquet, .csv or .jsonl file name")
        if not quiet:
            click.echo(f"wrote {table.num_rows} current rows to {out}")

    _run(body)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Manifest file (.parquet).")
@click.option("--split", "fractions", default="0.8,0.1,0.1", help="train,val,test fractions.")
@click.option("--seed", type=int, default=0, help="Seed of the split.")
@click.option("--kind", default=None, help="Value of the kind column for every row (e.g. photo, drawing).")
@click.option("--phash-max", type=click.IntRange(0, 64), default=8, help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, 64), default=3, help="Near duplicate: dHash distance.")
@_verbosity
def manifest(folder, out, fractions, seed, kind, phash_max, dhash_max, quiet, verbose) -> None:
    """List FOLDER/<label>/... as a Parquet manifest with leak-free, stratified splits."""
    _setup_logging(quiet, verbose)

    def body():
        from .manifest import build_manifest, write_manifest

        try:
            parts = _floats(fractions)
        except ValueError as exc:
            raise ConfigError(f"--split must be three numbers like 0.8,0.1,0.1: {exc}") from exc
        progress = _Progress(enabled=not quiet)
        table = build_manifest(folder, fractions=parts, seed=seed, kind=kind, phash_max=phash_max,
                               dhash_max=dhash_max, progress=progress)
        progress.close()
        write_manifest(table, out, folder)
        if not quiet:
            rows = table.to_pylist()
            splits = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test")}
            groups = {r["group"] for r in rows if r["group"] is not None}
            click.echo(f"{len(rows)} files, {len({r['label'] for r in rows})} labels: {splits['train']} train, "
                       f"{splits['val']} val, {splits['test']} test, "
                       f"{sum(1 for r in rows if r['status'] == 'error')} error; "
                       f"{len(groups)} duplicate groups kept within one split\nwrote {out}")

    _run(body)


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("--level", type=click.IntRange(0, 6), required=True, help="Augmentation level 0-6.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for images and manifest.")
@click.option("--splits", default="train", help="Comma-separated splits to augment.")
@click.option("--seed", type=int, default=0)
@_verbosity
def augment(manifest_path, level, out, splits, seed, quiet, verbose) -> None:
    """Write every augmented variant of MANIFEST's images, and a manifest naming each one's source."""
    _setup_logging(quiet, verbose)

    def body():
        from .augment import materialize, multiplier
        from .manifest import load_manifest, write_manifest

        progress = _Progress(enabled=not quiet)
        table = materialize(load_manifest(manifest_path), level, out, splits=tuple(splits.split(",")),
                            seed=seed, progress=progress)
        progress.close()
        path = write_manifest(table, f"{out}/manifest.parquet", out)
        if not quiet:
            click.echo(f"wrote {table.num_rows} images (x{multiplier(level)} per original) and {path}")

    _run(body)


def _train_options(f):
    for decorator in reversed([
        click.option("--arch", default="resnet50", help="torchvision ResNet-family architecture."),
        click.option("--pretrained", default="imagenet", help="imagenet, none, or a dinobatch model file."),
        click.option("--epochs", type=click.IntRange(min=0), default=10, help="Epochs at --lr."),
        click.option("--lr", type=float, default=0.01, help="Learning rate."),
        click.option("--final-epochs", type=click.IntRange(min=0), default=1, help="Epochs at --final-lr after those."),
        click.option("--final-lr", type=float, default=None, help="Learning rate of the final epochs [default: lr/2]."),
        click.option("-b", "--batch-size", type=click.IntRange(min=1), default=128),
        click.option("--momentum", type=float, default=0.9),
        click.option("--weight-decay", type=float, default=1e-4),
        click.option("--augment-level", type=click.IntRange(0, 6), default=2, help="On-the-fly augmentation."),
        click.option("--freeze-backbone", is_flag=True, help="Train the classifier only."),
        click.option("--image-size", type=click.IntRange(min=16), default=224, help="Model input size (crop)."),
        click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                     help="auto: bf16/fp16 AMP on CUDA, fp32 on CPU."),
        click.option("-j", "--workers", type=click.IntRange(min=0), default=None, help="Data loader workers."),
        click.option("--seed", type=int, default=0, help="Seed of initialisation, order and augmentation."),
    ]):
        f = decorator(f)
    return f


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@_train_options
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt, the checkpoint of an interrupted run.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as JSON and exit.")
@_verbosity
def train(manifest_path, out, resume, print_config, quiet, verbose, **options) -> None:
    """Fine-tune a ResNet on MANIFEST's train split; keep the best epoch; calibrate on val."""
    _setup_logging(quiet, verbose)

    def body():
        from .train import TrainConfig, train as run_train

        cfg = TrainConfig(manifest=manifest_path, out=out, **options)
        if print_config:
            click.echo(json.dumps(cfg.to_dict(), indent=2))
            return
        progress = _Progress(enabled=not quiet)
        try:
            result = run_train(cfg, resume=resume, progress=progress)
        finally:
            progress.close()
        if not quiet:
            for m in result.metrics:
                click.echo(f"epoch {m['epoch']:>2}: lr {m['lr']:.4g}  train loss {m['train_loss']:.4f} "
                           f"acc {m['train_acc']:.3f}  val loss {_num(m['val_loss'])} top-1 {_num(m['val_top1'])} "
                           f"top-3 {_num(m['val_top3'])}")
            cal = result.calibration
            if "ece_before" in cal:
                click.echo(f"calibration: temperature {cal['temperature']:.3f}, ECE {cal['ece_before']:.4f} -> "
                           f"{cal['ece_after']:.4f}")
            click.echo(f"best epoch {result.best_epoch}; wrote {result.model}")

    _run(body)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", envvar=MODEL_ENV, required=True, help=f"Model file [env {MODEL_ENV}].")
@click.option("--split", default="test", help="Split to evaluate (train, val, test, or 'all').")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option("--device", default="auto")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=32)
@click.option("-j", "--workers", type=click.IntRange(min=0), default=None)
@_verbosity
def evaluate(manifest_path, model, split, out, device, precision, batch_size, workers, quiet, verbose) -> None:
    """Loss, top-1/top-3, F1, per-class figures and confusion matrix of MODEL on a split."""
    _setup_logging(quiet, verbose)

    def body():
        from .evaluate import evaluate as run_evaluate, format_table

        progress = _Progress(enabled=not quiet)
        result = run_evaluate(manifest_path, model, out, split=None if split == "all" else split, device=device,
                              precision=precision, batch_size=batch_size, workers=workers, progress=progress)
        progress.close()
        if not quiet:
            click.echo(format_table(result.metrics))
            click.echo(f"wrote {result.out}/metrics.json, predictions.parquet, confusion.png")

    _run(body)


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for trials.")
@click.option("--batch-size", "batch_sizes", default="128", help="Comma-separated values.")
@click.option("--lr", "lrs", default="0.01", help="Comma-separated values.")
@click.option("--augment-level", "levels", default="2", help="Comma-separated values.")
@click.option("--epochs", "epoch_list", default="10", help="Comma-separated values.")
@click.option("--arch", default="resnet50")
@click.option("--pretrained", default="imagenet")
@click.option("--final-epochs", type=click.IntRange(min=0), default=1)
@click.option("--image-size", type=click.IntRange(min=16), default=224)
@click.option("--freeze-backbone", is_flag=True)
@click.option("--device", default="auto")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto")
@click.option("-j", "--workers", type=click.IntRange(min=0), default=None)
@click.option("--seed", type=int, default=0)
@_verbosity
def sweep(manifest_path, out, batch_sizes, lrs, levels, epoch_list, quiet, verbose, **options) -> None:
    """Train every combination of the comma-separated values; one row per trial in OUT/trials.parquet."""
    _setup_logging(quiet, verbose)

    def body():
        from .sweep import best_trial, sweep as run_sweep
        from .train import TrainConfig

        try:
            grid = {"batch_size": _ints(batch_sizes), "lr": _floats(lrs), "augment_level": _ints(levels),
                    "epochs": _ints(epoch_list)}
        except ValueError as exc:
            raise ConfigError(f"grid values must be comma-separated numbers: {exc}") from exc
        base = TrainConfig(manifest=manifest_path, out=str(out), **options)
        progress = _Progress(enabled=not quiet)
        rows = run_sweep(base, grid, out, progress=progress)
        progress.close()
        if not quiet:
            for r in rows:
                detail = (f"val loss {_num(r['val_loss'])} top-1 {_num(r['val_top1'])} macro F1 {_num(r['val_macro_f1'])}"
                          if r["status"] == "ok" else f"error: {r['error']}")
                click.echo(f"{r['trial']}: {detail} ({r['seconds']} s)")
            best = best_trial(rows)
            click.echo(f"best: {best['trial']} {best['model']}" if best else "no trial finished")

    _run(body)


def _fail_on(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    out = []
    for value in values:
        reason, sep, share = value.partition("=")
        try:
            out.append((reason.strip(), float(share.rstrip("%")) / (100 if share.endswith("%") else 1)))
        except ValueError:
            raise ConfigError(f"--fail-on {value!r}: use REASON=SHARE, e.g. label_error=0.05 or any=10%") from None
        if not sep:
            raise ConfigError(f"--fail-on {value!r}: use REASON=SHARE, e.g. label_error=0.05")
    return tuple(out)


@cli.command()
@click.argument("predictions", type=click.Path(exists=True, file_okay=False))
@click.option("--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The labels people gave (manifest or CSV); without it: confidence, duplicates, outliers.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for the queue.")
@click.option("--html", "html_page", is_flag=True, help="Also write review.html (open it from disk).")
@click.option("--low-confidence", type=click.FloatRange(0, 1), default=0.5, help="Flag confidence below this.")
@click.option("--rank-by", type=click.Choice(["self_confidence", "normalized_margin"]), default="self_confidence",
              help="Ranking of suspected label errors.")
@click.option("--method", type=click.Choice(["prune_by_noise_rate", "confident_learning"]),
              default="prune_by_noise_rate", help="Confident-learning variant for label errors.")
@click.option("--embedding-duplicate", type=click.FloatRange(0, 1), default=0.97,
              help="Cosine similarity from which two embeddings are the same scene.")
@click.option("--outlier-z", type=float, default=3.5, help="Robust z-score from which an image is an outlier.")
@click.option("--fail-on", "fail_on", multiple=True, metavar="REASON=SHARE",
              help="Exit 8 when the share of images flagged for REASON (or 'any') passes SHARE.")
@_verbosity
def curate(predictions, manifest_path, out, html_page, low_confidence, rank_by, method, embedding_duplicate,
           outlier_z, fail_on, quiet, verbose) -> None:
    """Write a review queue of what most likely needs a look, from a classify output folder."""
    _setup_logging(quiet, verbose)

    def body():
        from .curate import CurateConfig, curate as run_curate
        from .review import write_outputs

        cfg = CurateConfig(predictions=predictions, out=out, manifest=manifest_path, low_confidence=low_confidence,
                           rank_by=rank_by, method=method, embedding_duplicate=embedding_duplicate,
                           outlier_z=outlier_z,
                           fail_on=_fail_on(fail_on))
        result = run_curate(cfg)
        paths = write_outputs(result, out, html_page=html_page)
        if not quiet:
            click.echo(f"{result.images} images, {len(result.queue)} to review: " +
                       ", ".join(f"{k} {v}" for k, v in result.counts.items() if v))
            click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
        for breach in result.breaches:
            click.echo(f"dinobatch: threshold passed: {breach}", err=True)
        if result.breaches:
            sys.exit(EXIT_THRESHOLD)

    _run(body)


@cli.command()
@click.argument("decisions", type=click.Path(exists=True, dir_okay=False))
@click.option("--manifest", "manifest_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="New manifest version [default: MANIFEST.vN.parquet beside it].")
@click.option("--dry-run", is_flag=True, help="Print the changes; write nothing.")
@click.option("--user", default=None, help="Name recorded in the audit log [default: the login name].")
@_verbosity
def relabel(decisions, manifest_path, out, dry_run, user, quiet, verbose) -> None:
    """Apply a CSV of path,action[,label][,note] (keep, relabel, remove) to a manifest."""
    _setup_logging(quiet, verbose)

    def body():
        from .decisions import relabel as run_relabel

        changes, target = run_relabel(decisions, manifest_path, out=out, dry_run=dry_run, user=user)
        if not quiet or dry_run:
            for c in changes:
                detail = f" -> {c.new_label}" if c.action == "relabel" else ""
                click.echo(f"{c.action:<8} {c.path}: {c.old_label}{detail}" + (f"  ({c.note})" if c.note else ""))
            click.echo(f"{len(changes)} decisions; " + ("dry run, nothing written" if dry_run else f"wrote {target}"))

    _run(body)


@cli.command()
@click.argument("predictions", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to copy into.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), required=True,
              help="Copies at or above this confidence go to TO/<label>/, the rest to TO/_review/.")
@_verbosity
def export(predictions, to, min_confidence, quiet, verbose) -> None:
    """Copy (never move) classified images into TO/<label>/ or TO/_review/."""
    _setup_logging(quiet, verbose)

    def body():
        from .decisions import export as run_export

        counts = run_export(predictions, to, min_confidence=min_confidence)
        if not quiet:
            click.echo(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to copy")

    _run(body)


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", envvar=MODEL_ENV, required=True, help=f"Model file [env {MODEL_ENV}].")
@click.option("--reference", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Manifest of labelled reference images.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, help="Species to list per image.")
@click.option("--neighbours", type=click.IntRange(min=0), default=3, help="Nearest reference images to list.")
@click.option("--species", type=click.Path(dir_okay=False), default=None, help="Species facts CSV.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for cached reference embeddings [default: ~/.cache/dinobatch/embeddings].")
@click.option("--device", default="auto")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_verbosity
def similar(images, model, reference, top_k, neighbours, species, cache, device, as_json, quiet, verbose) -> None:
    """Which species each IMAGE (a child's drawing, say) looks like, by embedding similarity."""
    _setup_logging(quiet, verbose)

    def body():
        from pathlib import Path

        from .similar import similar as run_similar

        results = run_similar(list(images), model, reference, top_k=top_k, neighbours=neighbours, device=device,
                              species_csv=species, cache_dir=Path(cache) if cache else None)
        if as_json:
            click.echo(json.dumps(results, indent=2))
            return
        for r in results:
            if r["error"]:
                click.echo(f"{r['image']}: error: {r['error']}")
                continue
            best = r["species"][0]
            facts = ", ".join(str(best[k]) for k in ("species_scientific_name", "species_period", "species_diet")
                              if best.get(k))
            click.echo(f"{r['image']}: looks like {best['label']} ({best['similarity']:.3f})" + (f" - {facts}" if facts else ""))
            for s in r["species"][1:]:
                click.echo(f"    then {s['label']} ({s['similarity']:.3f})")
            for n in r["nearest"]:
                click.echo(f"    nearest: {n['path']} [{n['label']}] ({n['similarity']:.3f})")

    _run(body)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="dinobatch")
