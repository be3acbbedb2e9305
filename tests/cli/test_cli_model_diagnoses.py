"""Issue 13: the CLI names what a bad --model file is (exit 4) and which --arch a state_dict needs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_MODEL
from dinobatch.models.file import build_module
from tests.helpers import LABELS, picture, save
from tests.weights_server import publish_weights, serving


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_classify_with_a_png_as_model_says_it_is_an_image(tmp_path):
    save(picture(0), tmp_path / "in" / "0.png")
    save(picture(1), tmp_path / "cat.png")
    result = invoke("classify", tmp_path / "in", "--model", tmp_path / "cat.png", "--out", tmp_path / "out")
    assert result.exit_code == EXIT_MODEL, result.output
    assert "not a PyTorch file: it starts like a PNG image" in result.output
    assert "run code" not in result.output and "Traceback" not in result.output


def test_model_import_with_the_wrong_arch_names_the_right_one(tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    torch.save(build_module("resnet18", len(LABELS)).state_dict(), tmp_path / "sd.pt")
    result = invoke("model", "import", tmp_path / "sd.pt", "--arch", "resnet50", "--labels",
                    tmp_path / "labels.txt", "--out", tmp_path / "m.pt")
    assert result.exit_code == EXIT_MODEL, result.output
    assert "use --arch resnet18" in result.output
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("quiet", [False, True])
def test_classify_json_stdout_stays_json_while_the_default_weights_download(tmp_path, monkeypatch, quiet):
    from torchvision.models import ResNet50_Weights

    save(picture(0), tmp_path / "in" / "0.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    full = build_module("resnet50", 1000).state_dict()
    state = {k: v.half() if v.is_floating_point() else v for k, v in full.items()}  # half the bytes to serve
    (tmp_path / "served").mkdir()
    with serving(tmp_path / "served") as base:
        publish_weights(monkeypatch, ResNet50_Weights.IMAGENET1K_V2, state, tmp_path / "served", base, "resnet50")
        result = invoke("classify", tmp_path / "in", "--out", tmp_path / "out", "--json", *(["-q"] if quiet else []))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout is the JSON summary, nothing before it
    assert summary["files"] == 1 and summary["model"]["name"] == "imagenet:IMAGENET1K_V2"
    assert ("downloading" in result.stderr) is not quiet  # announced on stderr, silenced by -q
