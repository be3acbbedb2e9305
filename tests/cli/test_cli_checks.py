"""Values are checked before any work: config file types, NaN and infinity in float options, the
batch size's ceiling, and a model's resize/crop limits (issue 16's smaller gaps)."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.config import MAX_BATCH_SIZE, ClassifyConfig
from dinobatch.errors import EXIT_CONFIG, EXIT_MODEL, EXIT_USAGE, ConfigError, ModelError
from dinobatch.models.file import FORMAT, FORMAT_VERSION, MAX_CROP, MAX_RESIZE, ModelSpec, Preprocessing, build_module
from tests.helpers import LABELS, picture, save


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def refused(result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


@pytest.fixture
def folder(tmp_path):
    save(picture(0), tmp_path / "in" / "0.png")
    return tmp_path / "in"


# --- config file ---------------------------------------------------------------------------------

def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path, folder):
    conf = tmp_path / "c.toml"
    conf.write_bytes(b"[classify]\nout = \"r\xe9sultats\"\n")
    result = invoke("classify", folder, "--config", conf)
    refused(result, EXIT_CONFIG)
    assert "not UTF-8" in result.output


@pytest.mark.parametrize("line, says", [
    ('out = ["a", "b"]', "out = ['a', 'b']: expected a string, got an array"),
    ("batch-size = true", "batch_size = True: expected an integer, got a boolean"),
    ('batch-size = "64"', "expected an integer, got a string"),
    ("top-k = 2.0", "expected an integer, got a float"),
    ('embeddings = "yes"', "expected a boolean (true or false), got a string"),
    ("wait = nan", "not a finite number"),
    ("wait = inf", "not a finite number"),
    ("wait = true", "expected a number, got a boolean"),
    (f"batch-size = {MAX_BATCH_SIZE + 1}", f"1<=x<={MAX_BATCH_SIZE}"),
])
def test_config_values_must_have_the_options_type(tmp_path, folder, monkeypatch, line, says):
    conf = tmp_path / "c.toml"
    conf.write_text(f"[classify]\n{line}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = invoke("classify", folder, "--config", conf)
    refused(result, EXIT_CONFIG)
    assert says in result.output
    assert list(cwd.iterdir()) == []  # no folder named "['a', 'b']", no results


def test_a_key_given_twice_in_two_spellings_is_refused(tmp_path, folder):
    conf = tmp_path / "c.toml"
    conf.write_text("[classify]\nbatch-size = 8\nbatch_size = 16\n")
    result = invoke("classify", folder, "--config", conf)
    refused(result, EXIT_CONFIG)
    assert "'batch-size' and 'batch_size'" in result.output


def test_wait_as_an_integer_is_a_number(tmp_path, folder, tiny_model):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[classify]\nwait = 2\nmodel = "{tiny_model}"\nworkers = 0\n')
    result = invoke("classify", folder, "--config", conf, "-o", tmp_path / "o", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["wait"] == 2


# --- batch size ----------------------------------------------------------------------------------

def test_a_huge_batch_size_is_refused_before_anything_is_allocated(tmp_path, folder, tiny_model):
    result = invoke("classify", folder, "-m", tiny_model, "-o", tmp_path / "o", "-b", "1000000000")
    refused(result, EXIT_USAGE)
    assert f"1<=x<={MAX_BATCH_SIZE}" in result.output
    with pytest.raises(ConfigError, match="batch_size"):
        ClassifyConfig(folder=str(folder), batch_size=MAX_BATCH_SIZE + 1)


# --- NaN and infinity ----------------------------------------------------------------------------

def _commands(group, prefix=""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


FLOAT_OPTIONS = [(name, param) for name, command in _commands(cli) for param in command.params
                 if isinstance(param.type, click.types.FloatParamType)]


def test_every_command_has_its_float_options_checked():
    assert {f"{name} {param.name}" for name, param in FLOAT_OPTIONS} >= {
        "classify wait", "curate low_confidence", "curate embedding_duplicate", "curate outlier_z",
        "export min_confidence", "train lr", "train final_lr", "train momentum", "train weight_decay"}


@pytest.mark.parametrize("name, param", FLOAT_OPTIONS, ids=[f"{n}-{p.name}" for n, p in FLOAT_OPTIONS])
def test_float_options_show_a_readable_range_in_help(name, param):
    """An unbounded number shows no range; Click's own text for it was 'x<=None'."""
    shown = param.get_help_record(click.Context(dict(_commands(cli))[name]))[1]
    assert "None" not in shown


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("name, param", FLOAT_OPTIONS, ids=[f"{n}-{p.name}" for n, p in FLOAT_OPTIONS])
def test_float_options_refuse_nan_and_infinity(name, param, value):
    ctx = click.Context(dict(_commands(cli))[name])
    with pytest.raises(click.BadParameter, match="finite"):
        param.type_cast_value(ctx, value)


@pytest.mark.parametrize("args", [
    ["export", "{preds}", "--to", "{tmp}/to", "--min-confidence", "nan"],
    ["curate", "{preds}", "-o", "{tmp}/q", "--low-confidence", "nan"],
    ["curate", "{preds}", "-o", "{tmp}/q", "--outlier-z", "inf"],
    ["train", "{manifest}", "-o", "{tmp}/m.pt", "--lr", "nan", "--print-config"],
])
def test_nan_on_the_command_line_is_a_usage_error(tmp_path, args):
    (tmp_path / "preds").mkdir()
    (tmp_path / "m.parquet").write_bytes(b"")
    values = {"preds": tmp_path / "preds", "tmp": tmp_path, "manifest": tmp_path / "m.parquet"}
    result = invoke(*[a.format(**values) for a in args])
    refused(result, EXIT_USAGE)
    assert "finite" in result.output
    assert not (tmp_path / "to").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, says", [
    (["manifest", "{data}", "-o", "{tmp}/m.parquet", "--split", "nan,0.5,0.5"], "--split"),
    (["manifest", "{data}", "-o", "{tmp}/m.parquet", "--split", "0.8,inf,0.1"], "--split"),
    (["sweep", "{manifest}", "-o", "{tmp}/s", "--lr", "0.01,nan"], "grid values"),
])
def test_numbers_inside_text_options_must_be_finite_too(tmp_path, args, says):
    save(picture(0), tmp_path / "data" / "a" / "0.png")
    (tmp_path / "preds").mkdir()
    (tmp_path / "m.parquet").write_bytes(b"")
    values = {"data": tmp_path / "data", "preds": tmp_path / "preds", "tmp": tmp_path,
              "manifest": tmp_path / "m.parquet"}
    result = invoke(*[a.format(**values) for a in args])
    refused(result, EXIT_CONFIG)
    assert says in result.output
    assert not (tmp_path / "m.parquet").stat().st_size and not (tmp_path / "q").exists()


# --- model preprocessing limits ------------------------------------------------------------------

def test_model_import_refuses_resize_and_crop_past_the_limits(tmp_path):
    torch.save(build_module("resnet18", 3).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    result = invoke("model", "import", tmp_path / "sd.pt", "--arch", "resnet18", "--labels", tmp_path / "labels.txt",
                    "--out", tmp_path / "m.pt", "--resize", "12000", "--crop", "12000")
    refused(result, EXIT_USAGE)
    assert f"1<=x<={MAX_RESIZE}" in result.output
    assert not (tmp_path / "m.pt").exists()


def _model_file(path, **preprocessing):
    """A model file whose stored spec says what a hand-edited or foreign file might say."""
    prep = Preprocessing(resize=36, crop=32)
    spec = json.loads(ModelSpec(arch="resnet18", labels=LABELS, preprocessing=prep).to_json())
    spec["preprocessing"].update(preprocessing)
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "spec": json.dumps(spec),
                "state_dict": build_module("resnet18", 3).state_dict()}, path)
    return path


@pytest.mark.parametrize("stored", [
    {"resize": 12000, "crop": 12000}, {"resize": MAX_RESIZE + 1}, {"crop": MAX_CROP + 1, "resize": MAX_CROP + 1},
    {"crop": 32.5}, {"crop": True}, {"resize": "256"}, {"std": [0.2, 0.0, 0.2]}, {"mean": [0.5, float("nan"), 0.5]},
])
def test_a_model_file_with_out_of_range_preprocessing_is_a_model_error(tmp_path, folder, stored):
    path = _model_file(tmp_path / "bad.pt", **stored)
    info = invoke("model", "info", path)
    refused(info, EXIT_MODEL)
    assert "preprocessing" in info.output
    result = invoke("classify", folder, "-m", path, "-o", tmp_path / "o", "-j", "0")
    refused(result, EXIT_MODEL)


def test_preprocessing_limits_are_checked_where_a_spec_is_built():
    with pytest.raises(ModelError, match=str(MAX_CROP)):
        Preprocessing(resize=MAX_RESIZE, crop=MAX_CROP + 1)
    assert Preprocessing(resize=MAX_RESIZE, crop=MAX_CROP).crop == MAX_CROP
