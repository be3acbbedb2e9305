"""Command line: model import, model quantize and model info."""

from __future__ import annotations

import json

import click

from dinobatch.cli.common import run, setup_logging, verbosity
from dinobatch.cli.params import MODEL_REF
from dinobatch.io.terminal import printable
from dinobatch.models.file import MAX_CROP, MAX_RESIZE


@click.group()
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
@verbosity
def model_import(state_dict: str, arch: str, labels_path: str, out: str, resize: int, crop: int,
                 interpolation: str, quiet: bool, verbose: bool) -> None:
    """Wrap a PyTorch state_dict of a torchvision ResNet and its labels into a model file."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.models.file import Preprocessing, import_state_dict

        loaded = import_state_dict(state_dict, arch=arch, labels_path=labels_path, out=out,
                                   preprocessing=Preprocessing(resize=resize, crop=crop,
                                                               interpolation=interpolation))
        if not quiet:
            click.echo(f"wrote {printable(out)}: {arch}, {len(loaded.spec.labels)} classes, "
                       f"fingerprint {loaded.fingerprint[:16]}")

    run(body)


# models.quantize.CALIBRATION_IMAGES, spelled here so that --help does not import numpy and torch
# (tests/cli/test_quantize.py checks the two agree)
CALIBRATION_IMAGES = 256


@model.command("quantize")
@click.argument("model_ref", metavar="MODEL", type=MODEL_REF)
@click.option("--calibration", required=True, type=click.Path(exists=True),
              help="Manifest (its train split) or folder of images whose activation ranges set the int8 scales.")
@click.option("--calibration-images", type=click.IntRange(1), default=CALIBRATION_IMAGES,
              help="How many images calibrate (the lowest content sha256s first).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="int8 model file to write.")
@verbosity
def model_quantize(model_ref: str, calibration: str, calibration_images: int, out: str, quiet: bool,
                   verbose: bool) -> None:
    """Write an int8 copy of a model (static post-training quantization) for fast CPU inference."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.models.quantize import quantize_file

        loaded = quantize_file(model_ref, calibration, out, count=calibration_images)
        cal = loaded.spec.calibration or {}
        if not quiet:
            click.echo(f"wrote {printable(out)}: int8 {loaded.spec.arch}, {len(loaded.spec.labels)} classes, "
                       f"calibrated on {cal.get('images')} image(s), fingerprint {loaded.fingerprint[:16]}")

    run(body)


@model.command("info")
@click.argument("model_ref")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def model_info(model_ref: str, as_json: bool) -> None:
    """Show what a model file (or 'imagenet') holds: architecture, labels, preprocessing, source."""
    setup_logging(False, False)

    def body():
        from dataclasses import asdict

        from dinobatch.models.file import resolve_model

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
                   f"source:         {json.dumps(spec.source)}\nprecision:      {spec.precision}")
        if spec.calibration is not None:
            click.echo(f"calibration:    {json.dumps(spec.calibration)}")
        more = " ..." if len(spec.labels) > 20 else ""
        click.echo("labels:         " + ", ".join(printable(x) for x in spec.labels[:20]) + more)

    run(body)
