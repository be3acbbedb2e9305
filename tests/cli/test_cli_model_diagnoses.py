"""Issue 13: the CLI names what a bad --model file is (exit 4) and which --arch a state_dict needs."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from dinobatch.cli import cli
from dinobatch.errors import EXIT_MODEL
from dinobatch.model import build_module
from tests.conftest import LABELS, picture, save


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
