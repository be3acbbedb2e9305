"""similar and evaluate predict as classify does: the same -b/-j/--precision options, passed through to
the same predict path, whose defaults (None) let it pick the CPU burst pool or the CUDA batch that fits."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.training.manifest import build_manifest, write_manifest
from tests.helpers import REPO, picture, save


@pytest.fixture
def reference(tmp_path):
    """ref.parquet over six pictures of two labels; every split, so evaluate --split all sees them all."""
    ref = tmp_path / "ref"
    for i, label in enumerate(("triceratops", "stegosaurus")):
        for j in range(3):
            save(picture(40 + 10 * i + j), ref / label / f"{j}.png")
    write_manifest(build_manifest(ref, seed=0), tmp_path / "ref.parquet", ref)
    return tmp_path / "ref.parquet"


@pytest.fixture
def predict_calls(monkeypatch):
    """The batch_size and workers of every predict call, and the sizes of the batches it yielded."""
    import dinobatch.curation.similar as similar
    import dinobatch.training.evaluate as evaluate

    calls, real = [], evaluate.predict

    def spy(model, runtime, items, **kwargs):
        call = {"batch_size": kwargs["batch_size"], "workers": kwargs["workers"], "batches": []}
        calls.append(call)
        for batch in real(model, runtime, items, **kwargs):
            call["batches"].append(len(batch))
            yield batch

    monkeypatch.setattr(similar, "predict", spy)
    monkeypatch.setattr(evaluate, "predict", spy)
    return calls


def _similar(tmp_path, reference, tiny_model, *extra):
    args = ["similar", str(reference.parent / "ref" / "triceratops" / "0.png"), "-m", str(tiny_model),
            "--reference", str(reference), "--cache", str(tmp_path / "cache"), "--json",
            "--species", str(REPO / "manifests" / "species.csv"), *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_similar_takes_batch_size_and_workers_and_uses_them(tmp_path, reference, tiny_model, predict_calls):
    out = _similar(tmp_path, reference, tiny_model, "-b", "4", "-j", "0", "--precision", "fp32")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["nearest"][0]["path"] == "triceratops/0.png"
    assert [(c["batch_size"], c["workers"]) for c in predict_calls] == [(4, 0), (4, 0)]  # reference, then query
    assert predict_calls[0]["batches"] == [4, 2]  # six reference images in batches of four


def test_similar_and_evaluate_leave_the_defaults_to_predict(tmp_path, reference, tiny_model, predict_calls):
    assert _similar(tmp_path, reference, tiny_model).exit_code == 0
    out = CliRunner().invoke(cli, ["evaluate", str(reference), "-m", str(tiny_model), "--split", "all",
                                   "-o", str(tmp_path / "eval")], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert [(c["batch_size"], c["workers"]) for c in predict_calls] == [(None, None)] * 3


def test_evaluate_takes_batch_size_and_workers_and_uses_them(tmp_path, reference, tiny_model, predict_calls):
    out = CliRunner().invoke(cli, ["evaluate", str(reference), "-m", str(tiny_model), "--split", "all",
                                   "-o", str(tmp_path / "eval"), "-b", "4", "-j", "0"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert [(c["batch_size"], c["workers"], c["batches"]) for c in predict_calls] == [(4, 0, [4, 2])]


@pytest.mark.parametrize("option", ["--precision", "--batch-size", "--workers"])
def test_similar_and_evaluate_explain_and_limit_the_option_as_classify_does(option):
    def record(name):
        command = cli.commands[name]
        param = next(p for p in command.params if option in p.opts)
        help_text = param.get_help_record(click.Context(command, info_name=name))
        return param.opts, help_text, param.type.to_info_dict()

    assert record("similar") == record("classify") == record("evaluate")
