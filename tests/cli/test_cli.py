"""The command line as a user or cron meets it: messages, exit codes, config and environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_CONFIG, EXIT_DEVICE, EXIT_INPUT, EXIT_MODEL
from dinobatch.models.file import build_module
from tests.helpers import LABELS, picture, save


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        save(picture(i), tmp_path / "in" / f"{i}.png")
    return tmp_path / "in"


def invoke(runner, *args, env=None):
    return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom dinobatch.cli import main\nsys.argv = ['dinobatch', 'classify', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage: dinobatch classify" in out and out.strip().endswith("NO-TORCH")


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "dinobatch", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dinobatch, version")


def test_classify_prints_a_summary_and_exits_zero(runner, folder, tiny_model, tmp_path):
    result = invoke(runner, "classify", folder, "--model", tiny_model, "--out", tmp_path / "out", "-j", "0")
    assert result.exit_code == 0
    assert "3 files: 3 ok, 0 duplicate, 0 error" in result.output
    assert "inferred 3 new, reused 0" in result.output


def test_quiet_run_prints_nothing_and_json_is_machine_readable(runner, folder, tiny_model, tmp_path):
    quiet = invoke(runner, "classify", folder, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""
    js = invoke(runner, "classify", folder, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "-q", "--json")
    summary = json.loads(js.output)
    assert summary["inferred"] == 0 and summary["reused"] == 3 and summary["counts"]["ok"] == 3


def test_summary_json_is_the_same_file_as_the_output_folders_summary(runner, folder, tiny_model, tmp_path):
    result = invoke(runner, "classify", folder, "-m", tiny_model, "-o", tmp_path / "out", "-j", "0", "-q",
                    "--summary-json", tmp_path / "status" / "last.json")
    assert result.exit_code == 0
    assert (tmp_path / "status" / "last.json").read_bytes() == (tmp_path / "out" / "_summary.json").read_bytes()


def test_model_from_environment_variable(runner, folder, tiny_model, tmp_path):
    result = invoke(runner, "classify", folder, "-o", tmp_path / "out", "-j", "0", "--json", "-q",
                    env={"DINOBATCH_MODEL": str(tiny_model)})
    assert json.loads(result.output)["model"]["name"] == "tiny.pt"


def test_config_file_fills_defaults_and_flags_win(runner, folder, tiny_model, tmp_path):
    conf = tmp_path / "dinobatch.toml"
    conf.write_text(f'[classify]\nmodel = "{tiny_model}"\nbatch-size = 2\ntop-k = 2\nworkers = 0\n')
    result = invoke(runner, "classify", folder, "--config", conf, "-o", tmp_path / "out", "-k", "1",
                    "--json", "-q")
    cfg = json.loads(result.output)["config"]
    assert (cfg["batch_size"], cfg["top_k"], cfg["model"]) == (2, 1, str(tiny_model))


def test_unknown_config_key_is_a_config_error(runner, folder, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[classify]\nbatch = 2\n")
    result = runner.invoke(cli, ["classify", str(folder), "--config", str(conf)])
    assert result.exit_code == EXIT_CONFIG and "unknown key 'batch'" in result.output


def test_missing_model_and_missing_folder_and_missing_cuda_exit_codes(runner, folder, tiny_model, tmp_path):
    r = invoke(runner, "classify", folder, "-m", tmp_path / "none.pt", "-o", tmp_path / "o")
    assert r.exit_code == EXIT_MODEL and "model file not found" in r.output
    r = invoke(runner, "classify", tmp_path / "nope", "-m", tiny_model, "-o", tmp_path / "o")
    assert r.exit_code == EXIT_INPUT and "not found" in r.output
    if not torch.cuda.is_available():
        r = invoke(runner, "classify", folder, "-m", tiny_model, "--device", "cuda", "-o", tmp_path / "o")
        assert r.exit_code == EXIT_DEVICE and "CUDA is not available" in r.output


def test_model_import_and_info(runner, tmp_path):
    torch.save(build_module("resnet18", 3).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    r = invoke(runner, "model", "import", tmp_path / "sd.pt", "--arch", "resnet18", "--labels",
               tmp_path / "labels.txt", "--out", tmp_path / "m.pt", "--crop", "192", "--resize", "220")
    assert r.exit_code == 0 and "3 classes" in r.output
    info = json.loads(invoke(runner, "model", "info", tmp_path / "m.pt", "--json").output)
    assert info["arch"] == "resnet18" and info["labels"] == list(LABELS)
    assert info["preprocessing"]["crop"] == 192 and info["preprocessing"]["resize"] == 220
    text = invoke(runner, "model", "info", tmp_path / "m.pt").output
    assert "architecture:   resnet18" in text and "triceratops" in text


def test_model_import_with_wrong_labels_fails_clearly(runner, tmp_path):
    torch.save(build_module("resnet18", 3).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "labels.txt").write_text("one\ntwo\n")
    r = invoke(runner, "model", "import", tmp_path / "sd.pt", "--arch", "resnet18", "--labels",
               tmp_path / "labels.txt", "--out", tmp_path / "m.pt")
    assert r.exit_code == EXIT_MODEL and "3 outputs but 2 labels" in r.output
    assert not (tmp_path / "m.pt").exists()
