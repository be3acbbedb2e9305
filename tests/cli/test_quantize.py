"""`dinobatch model quantize`, `model info` of an int8 file, classify and evaluate --compare with it, and
its refusal on CUDA, through the command line."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_DEVICE
from tests.helpers import LABELS, REPO, picture, save


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Twelve pictures with labels, as a CSV manifest (all in split test)."""
    root = tmp_path_factory.mktemp("labelled")
    lines = ["path,label,split"]
    for i in range(12):
        save(picture(100 + i), root / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{LABELS[i % 3]},test")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory, tiny_model, labelled):
    out = tmp_path_factory.mktemp("q") / "tiny-int8.pt"
    r = invoke("model", "quantize", tiny_model, "--calibration", labelled, "--calibration-images", 6, "-o", out)
    assert r.exit_code == 0, r.output
    assert "int8 resnet18, 3 classes, calibrated on 6 image(s)" in r.output
    return out


def test_the_documented_calibration_count_is_the_one_quantize_uses():
    from dinobatch.cli.model import CALIBRATION_IMAGES as shown
    from dinobatch.models.quantize import CALIBRATION_IMAGES

    assert shown == CALIBRATION_IMAGES


def test_model_info_shows_precision_and_calibration(int8_file, tiny_model, labelled):
    text = invoke("model", "info", int8_file).output
    assert "precision:      int8" in text and '"images": 6' in text and str(labelled) in text
    info = json.loads(invoke("model", "info", int8_file, "--json").output)
    assert info["precision"] == "int8" and info["calibration"]["kind"] == "folder"
    assert "precision:      fp32" in invoke("model", "info", tiny_model).output


def test_classify_runs_an_int8_model_says_so_and_keeps_its_rows_apart(int8_file, tiny_model, labelled, tmp_path):
    out = tmp_path / "out"
    for model in (tiny_model, int8_file):
        r = invoke("classify", labelled, "-m", model, "-o", out, "-j", "0", "-b", "4", "--species",
                   REPO / "manifests" / "species.csv", "--json")
        assert r.exit_code == 0, r.output
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["config"]["precision"] == "int8" and summary["runtime"] == "cpu, int8"
    assert summary["inferred"] == 12 and summary["reused"] == 0  # nothing reused from the fp32 model's cache
    rows = [r for r in pq.read_table(summary["rows_file"]).to_pylist() if r["status"] == "ok"]  # m.csv: an error
    assert len(rows) == 12 and {r["precision"] for r in rows} == {"int8"}  # each row says what it was made at


def test_an_int8_model_on_cuda_exits_with_the_device_code(int8_file, labelled, tmp_path, monkeypatch):
    import torch

    from dinobatch.runtime import device

    real = device._resolve_device
    monkeypatch.setattr(device, "_resolve_device", lambda name, t: torch.device("cuda", 0) if name == "cuda"
                        else real(name, t))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    r = invoke("evaluate", labelled / "m.csv", "-m", int8_file, "--device", "cuda", "-o", tmp_path / "ev")
    assert r.exit_code == EXIT_DEVICE and "runs on the CPU only" in r.output


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch says this machine has one CUDA device (Ampere-class); nothing may touch it in these tests."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))


def test_device_auto_runs_an_int8_model_on_the_cpu_where_there_is_a_gpu(int8_file, labelled, tmp_path, fake_gpu):
    r = invoke("classify", labelled, "-m", int8_file, "-o", tmp_path / "out", "-j", "0", "-b", "4", "--species",
               REPO / "manifests" / "species.csv", "--json", "-v")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["config"]["device"], summary["config"]["precision"], summary["runtime"]) == ("cpu", "int8",
                                                                                               "cpu, int8")
    assert "--device auto chose the CPU" in r.stderr
    assert summary["process"]["allocator"] != "system"  # the CPU's process settings, not CUDA's
    r = invoke("evaluate", labelled / "m.csv", "-m", int8_file, "-o", tmp_path / "ev", "-j", "0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["precision"] == "int8"
    r = invoke("evaluate", labelled / "m.csv", "-m", int8_file, "--device", "cuda", "-o", tmp_path / "ev2")
    assert r.exit_code == EXIT_DEVICE and "runs on the CPU only" in r.output


def test_evaluate_compare_reports_both_accuracies_and_their_agreement(int8_file, tiny_model, labelled, tmp_path):
    r = invoke("evaluate", labelled / "m.csv", "-m", tiny_model, "--compare", tiny_model, "-o", tmp_path / "same",
               "--json", "-j", "0")
    same = json.loads(r.stdout)["compare"]
    assert (same["agreement"], same["mean_abs_confidence_difference"], same["count"]) == (1.0, 0.0, 12)
    r = invoke("evaluate", labelled / "m.csv", "-m", int8_file, "--compare", tiny_model, "-o", tmp_path / "ev",
               "-j", "0")
    assert r.exit_code == 0, r.output
    assert "compared with tiny.pt (fp32) on 12 images" in r.output and "top-1 agreement" in r.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    c = metrics["compare"]
    assert metrics["precision"] == "int8" and c["precision"] == "fp32"
    written = pq.read_table(tmp_path / "ev" / "predictions.parquet").to_pylist()
    assert len(written) == 12 and {r["precision"] for r in written} == {"int8"}
    assert 0 <= c["agreement"] <= 1 and 0 <= c["mean_abs_confidence_difference"] <= 1
    assert c["top1_drop"] == pytest.approx(c["top1"] - metrics["top1"])
    assert c["confident_count"] <= c["count"] == 12


def test_similar_says_the_precision_each_image_was_embedded_at(int8_file, tiny_model, labelled, tmp_path):
    def asked(model, *extra):
        r = invoke("similar", labelled / "00.png", labelled / "01.png", "-m", model, "--reference", labelled / "m.csv",
                   "--cache", tmp_path / "cache", "--json", "-j", "0", *extra)
        assert r.exit_code == 0, r.output
        return [answer["precision"] for answer in json.loads(r.stdout)]

    assert asked(int8_file) == ["int8", "int8"]
    assert asked(tiny_model, "--precision", "bf16") == ["bf16", "bf16"]
