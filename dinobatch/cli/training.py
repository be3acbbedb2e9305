"""Command line, model side: manifest, augment, train, evaluate, sweep (registered on cli's group)."""

from __future__ import annotations

import json

import click

from dinobatch.cli.common import (
    DEVICE_HELP,
    INPUT_FOLDER,
    PRECISION_HELP,
    Progress,
    default_of,
    predict_options,
    run,
    setup_logging,
    verbosity,
)
from dinobatch.cli.params import FINITE, MODEL_REF, SECONDS, finite_float
from dinobatch.config import MODEL_ENV, ClassifyConfig, TrainConfig
from dinobatch.dedupe import DEFAULT_DHASH_MAX, DEFAULT_PHASH_MAX, HASH_BITS
from dinobatch.errors import ConfigError
from dinobatch.io.terminal import printable
from dinobatch.runtime.device import CPU_MAX_WORKERS, CUDA_MAX_WORKERS, PRECISIONS

_WORKERS_HELP = (f"Data loader workers [default: half the usable cores (at most {CPU_MAX_WORKERS}) on CPU, "
                 f"cores-1 (at most {CUDA_MAX_WORKERS}) on CUDA]; 0 loads in this process.")


def _wait_option(f):
    return click.option("--wait", type=SECONDS, default=0.0,
                        help="Seconds to wait for another run on the same --out before exiting with code 9.")(f)


def _floats(text: str) -> list[float]:
    return [finite_float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Manifest file (.parquet).")
@click.option("--split", "fractions", default="0.8,0.1,0.1", help="train,val,test fractions.")
@click.option("--seed", type=int, default=0, help="Seed of the split.")
@click.option("--kind", default=None, help="Value of the kind column for every row (e.g. photo, drawing).")
@click.option("--phash-max", type=click.IntRange(0, HASH_BITS), default=DEFAULT_PHASH_MAX,
              help="Near duplicate: pHash distance.")
@click.option("--dhash-max", type=click.IntRange(0, HASH_BITS), default=DEFAULT_DHASH_MAX,
              help="Near duplicate: dHash distance.")
@verbosity
def manifest(folder, out, fractions, seed, kind, phash_max, dhash_max, quiet, verbose) -> None:
    """List FOLDER/<label>/... as a Parquet manifest with leak-free, stratified splits."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.training.manifest import build_manifest, write_manifest

        try:
            parts = _floats(fractions)
        except ValueError as exc:
            raise ConfigError(f"--split must be three numbers like 0.8,0.1,0.1: {exc}") from exc
        progress = Progress(enabled=not quiet)
        table = build_manifest(folder, fractions=parts, seed=seed, kind=kind, phash_max=phash_max,
                               dhash_max=dhash_max, progress=progress)
        progress.close()
        write_manifest(table, out, folder)
        if not quiet:
            from dinobatch.schema import SPLITS, STATUS_ERROR, Col

            rows = table.to_pylist()
            splits = {s: sum(1 for r in rows if r[Col.SPLIT] == s) for s in SPLITS}
            groups = {r[Col.GROUP] for r in rows if r[Col.GROUP] is not None}
            click.echo(f"{len(rows)} files, {len({r[Col.LABEL] for r in rows})} labels: {splits['train']} train, "
                       f"{splits['val']} val, {splits['test']} test, "
                       f"{sum(1 for r in rows if r[Col.STATUS] == STATUS_ERROR)} error; "
                       f"{len(groups)} duplicate groups kept within one split\nwrote {printable(out)}")

    run(body)


@click.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("--level", type=click.IntRange(0, 6), required=True, help="Augmentation level 0-6.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for images and manifest.")
@click.option("--splits", default="train", help="Comma-separated splits to augment.")
@click.option("--seed", type=int, default=0, help="Seed of the augmentations drawn.")
@_wait_option
@verbosity
def augment(manifest_path, level, out, splits, seed, wait, quiet, verbose) -> None:
    """Write every augmented variant of MANIFEST's images, and a manifest naming each one's source."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.schema import Col
        from dinobatch.training.augment import augment as run_augment
        from dinobatch.training.augment import multiplier
        from dinobatch.training.manifest import describe_unreadable

        progress = Progress(enabled=not quiet)
        try:
            result, path = run_augment(manifest_path, level, out, splits=tuple(splits.split(",")), seed=seed,
                                       wait=wait, progress=progress)
        finally:
            progress.close()
        if not quiet:
            variants = result.table.num_rows - result.table.column(Col.VARIANT).null_count
            click.echo(f"wrote {variants} images (x{multiplier(level)} per original) and {printable(path)}")
            if result.unreadable:
                click.echo(printable(f"{describe_unreadable(result.unreadable, 'original')}; each is a row with "
                                     f"status error in the new manifest"))

    run(body)


def _train(name: str):
    """TrainConfig's default of a field: an option's default is read from its one home."""
    return default_of(TrainConfig, name)


_image_size = click.option("--image-size", type=click.IntRange(min=16), default=_train("image_size"),
                           help="Model input size (crop).")


def _run_options(f):
    """The options train and sweep share, every trial of a sweep taking the same value."""
    for decorator in reversed([
        click.option("--device", default=_train("device"), help=DEVICE_HELP),
        click.option("--precision", type=click.Choice(PRECISIONS), default=_train("precision"), help=PRECISION_HELP),
        click.option("-j", "--workers", type=click.IntRange(min=0), default=_train("workers"), help=_WORKERS_HELP),
        click.option("--seed", type=int, default=_train("seed"), help="Seed of initialisation, order and augmentation."),
    ]):
        f = decorator(f)
    return f


def _train_options(f):
    for decorator in reversed([
        click.option("--arch", default=_train("arch"), help="torchvision ResNet-family architecture."),
        click.option("--pretrained", type=MODEL_REF, default=_train("pretrained"),
                     help="imagenet, none, or a dinobatch model file."),
        click.option("--epochs", type=click.IntRange(min=0), default=_train("epochs"), help="Epochs at --lr."),
        click.option("--lr", type=FINITE, default=_train("lr"), help="Learning rate."),
        click.option("--final-epochs", type=click.IntRange(min=0), default=_train("final_epochs"),
                     help="Epochs at --final-lr after those."),
        click.option("--final-lr", type=FINITE, default=_train("final_lr"),
                     help="Learning rate of the final epochs [default: lr/2]."),
        click.option("-b", "--batch-size", type=click.IntRange(min=1), default=_train("batch_size"),
                     help="Images per training step."),
        click.option("--momentum", type=FINITE, default=_train("momentum"), help="SGD momentum, 0 <= M < 1."),
        click.option("--weight-decay", type=FINITE, default=_train("weight_decay"), help="SGD weight decay (L2), >= 0."),
        click.option("--augment-level", type=click.IntRange(0, 6), default=_train("augment_level"),
                     help="On-the-fly augmentation."),
        click.option("--freeze-backbone", is_flag=True, help="Train the classifier only."),
        _image_size,
        _run_options,
    ]):
        f = decorator(f)
    return f


@click.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@_train_options
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt, the checkpoint of an interrupted run.")
@click.option("--print-config", is_flag=True, help="Print the resolved configuration as JSON and exit.")
@_wait_option
@verbosity
def train(manifest_path, out, resume, print_config, wait, quiet, verbose, **options) -> None:
    """Fine-tune a ResNet on MANIFEST's train split; keep the best epoch; calibrate on val."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.training.train import train as run_train

        cfg = TrainConfig(manifest=manifest_path, out=out, **options)
        if print_config:
            click.echo(json.dumps(cfg.to_dict(), indent=2))
            return
        progress = Progress(enabled=not quiet)
        try:
            result = run_train(cfg, resume=resume, progress=progress, wait=wait)
        finally:
            progress.close()
        if not quiet:
            from dinobatch.schema import Col

            for m in result.metrics:
                click.echo(f"epoch {m['epoch']:>2}: lr {m['lr']:.4g}  train loss {m['train_loss']:.4f} "
                           f"acc {m['train_acc']:.3f}  val loss {_num(m[Col.VAL_LOSS])} "
                           f"top-1 {_num(m[Col.VAL_TOP1])} top-3 {_num(m[Col.VAL_TOP3])}")
            cal = result.calibration
            if "ece_before" in cal:
                click.echo(f"calibration: temperature {cal['temperature']:.3f}, ECE {cal['ece_before']:.4f} -> "
                           f"{cal['ece_after']:.4f}")
            if result.unreadable:
                from dinobatch.training.manifest import describe_unreadable

                click.echo(printable(f"{describe_unreadable(result.unreadable)}; left out of training "
                                     f"(counted per epoch in the metrics, named in the model's source)"))
            click.echo(f"best epoch {result.best_epoch}; wrote {printable(result.model)}")

    run(body)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@click.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", type=MODEL_REF, envvar=MODEL_ENV, required=True, help=f"Model file [env {MODEL_ENV}].")
@click.option("--split", default="test", help="Split to evaluate (train, val, test, or 'all').")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for the report.")
@click.option("--compare", type=MODEL_REF, default=None,
              help="A reference model (e.g. the fp32 one MODEL was quantized from): its accuracy and the agreement.")
@click.option("--device", default=default_of(ClassifyConfig, "device"), help=DEVICE_HELP)
@predict_options
@_wait_option
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json's content on stdout instead of the table.")
@verbosity
def evaluate(manifest_path, model, split, out, compare, device, precision, batch_size, workers, wait, as_json, quiet,
             verbose) -> None:
    """Loss, top-1/top-3, F1, per-class figures and confusion matrix of MODEL on a split."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.training.evaluate import evaluate as run_evaluate
        from dinobatch.training.evaluate import format_table

        progress = Progress(enabled=not quiet and not as_json)
        result = run_evaluate(manifest_path, model, out, split=None if split == "all" else split, device=device,
                              precision=precision, batch_size=batch_size, workers=workers, wait=wait,
                              progress=progress, compare=compare)
        progress.close()
        if as_json:
            click.echo(json.dumps(result.metrics, indent=2))
        elif not quiet:
            click.echo(printable(format_table(result.metrics), keep_newlines=True))
            click.echo(f"wrote {printable(result.out)}/metrics.json, predictions.parquet, confusion.png")

    run(body)


@click.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for trials.")
@click.option("--batch-size", "batch_sizes", default=str(_train("batch_size")), help="Comma-separated values.")
@click.option("--lr", "lrs", default=str(_train("lr")), help="Comma-separated values.")
@click.option("--augment-level", "levels", default=str(_train("augment_level")), help="Comma-separated values.")
@click.option("--epochs", "epoch_list", default=str(_train("epochs")), help="Comma-separated values.")
@click.option("--arch", default=_train("arch"), help="torchvision ResNet-family architecture, every trial.")
@click.option("--pretrained", type=MODEL_REF, default=_train("pretrained"),
              help="imagenet, none, or a dinobatch model file, every trial.")
@click.option("--final-epochs", type=click.IntRange(min=0), default=_train("final_epochs"),
              help="Epochs at lr/2 after --epochs.")
@_image_size
@click.option("--freeze-backbone", is_flag=True, help="Train the classifier only.")
@_run_options
@_wait_option
@verbosity
def sweep(manifest_path, out, batch_sizes, lrs, levels, epoch_list, wait, quiet, verbose, **options) -> None:
    """Train every combination of the comma-separated values; one row per trial in OUT/trials.parquet."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.schema import STATUS_OK, Col
        from dinobatch.training.sweep import best_trial
        from dinobatch.training.sweep import sweep as run_sweep

        try:
            grid = {"batch_size": _ints(batch_sizes), "lr": _floats(lrs), "augment_level": _ints(levels),
                    "epochs": _ints(epoch_list)}
        except ValueError as exc:
            raise ConfigError(f"grid values must be comma-separated numbers: {exc}") from exc
        base = TrainConfig(manifest=manifest_path, out=str(out), **options)
        progress = Progress(enabled=not quiet)
        rows = run_sweep(base, grid, out, progress=progress, wait=wait)
        progress.close()
        if not quiet:
            for r in rows:
                detail = (f"val loss {_num(r[Col.VAL_LOSS])} top-1 {_num(r[Col.VAL_TOP1])} "
                          f"macro F1 {_num(r[Col.VAL_MACRO_F1])}" if r[Col.STATUS] == STATUS_OK
                          else f"error: {r[Col.ERROR]}")
                if r.get(Col.UNREADABLE):
                    detail += f"; {r[Col.UNREADABLE]} image(s) could not be read (named in the trial's model)"
                click.echo(printable(f"{r[Col.TRIAL]}: {detail} ({r[Col.SECONDS]} s)"))
            best = best_trial(rows)
            click.echo(printable(f"best: {best[Col.TRIAL]} {best[Col.MODEL]}") if best else "no trial finished")

    run(body)
