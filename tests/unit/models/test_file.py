"""Model files: round trip, clear refusals, import of plain state_dicts, torchvision's cache."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dinobatch.errors import ModelError
from dinobatch.models.file import ModelSpec, Preprocessing, build_module, import_state_dict, load_model, read_labels, resolve_model, save_model
from tests.helpers import LABELS


@pytest.fixture
def labels_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("\n".join(LABELS) + "\n")
    return p


@pytest.fixture
def state_dict_file(tmp_path):
    torch.manual_seed(1)
    p = tmp_path / "sd.pt"
    torch.save(build_module("resnet18", len(LABELS)).state_dict(), p)
    return p


def test_model_file_round_trip_keeps_spec_weights_and_fingerprint(tmp_path):
    module = build_module("resnet18", 3)
    spec = ModelSpec("resnet18", LABELS, Preprocessing(resize=40, crop=32, interpolation="bicubic"),
                     {"kind": "test"}, temperature=1.5)
    fp = save_model(tmp_path / "m.pt", spec, module.state_dict())
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.spec == spec
    assert loaded.fingerprint == fp and len(fp) == 64
    assert torch.equal(loaded.module.fc.weight, module.fc.weight)


def test_import_wraps_a_state_dict_and_strips_dataparallel_prefix(tmp_path, labels_file, state_dict_file):
    sd = torch.load(state_dict_file)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    loaded = import_state_dict(tmp_path / "wrapped.pt", arch="resnet18", labels_path=labels_file,
                               out=tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert again.spec.labels == LABELS and again.spec.source["kind"] == "import"
    assert torch.equal(again.module.conv1.weight, sd["conv1.weight"])
    assert loaded.fingerprint == again.fingerprint


def test_import_refuses_label_count_mismatch(tmp_path, state_dict_file):
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ModelError, match="3 outputs but 2 labels"):
        import_state_dict(state_dict_file, arch="resnet18", labels_path=tmp_path / "two.txt", out=tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_import_refuses_weights_of_another_architecture(tmp_path, labels_file, state_dict_file):
    with pytest.raises(ModelError, match="do not fit a torchvision resnet50"):
        import_state_dict(state_dict_file, arch="resnet50", labels_path=labels_file, out=tmp_path / "m.pt")


@pytest.mark.parametrize("content, message", [
    ("a\n\nb\n", "line 2: blank label"),
    ("a\nb\na\n", "repeats labels: a"),
    ("\n", "empty"),
])
def test_labels_file_errors_are_clear(tmp_path, content, message):
    (tmp_path / "l.txt").write_text(content)
    with pytest.raises(ModelError, match=message):
        read_labels(tmp_path / "l.txt")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_file_that_would_run_code_when_unpickled_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "dinobatch-model", "payload": _Boom()}, path)
    with pytest.raises(ModelError, match="refuses to unpickle"):
        load_model(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("just text"), "not a PyTorch file"),
    (lambda p: torch.save({"fc.weight": torch.zeros(3, 2)}, p), "not a dinobatch model file"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2])), "not a PyTorch file|refuses"),
])
def test_invalid_model_files_get_clear_errors(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope.pt"))


def test_imagenet_offline_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: the download fails at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ModelError) as info:
        resolve_model("imagenet")
    text = str(info.value)
    assert "resnet50-11ad3fa6.pth" in text and str(tmp_path / "torch") in text and "--model FILE" in text


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    weights = build_module("resnet50", 1000).state_dict()
    torch.save(weights, cache / "resnet50-11ad3fa6.pth")  # stands in for the downloaded file
    loaded = resolve_model("imagenet")
    assert loaded.name == "imagenet:IMAGENET1K_V2"
    assert len(loaded.spec.labels) == 1000 and loaded.spec.labels[0] == "tench"
    assert (loaded.spec.preprocessing.resize, loaded.spec.preprocessing.crop) == (232, 224)
    assert torch.equal(loaded.module.fc.bias, weights["fc.bias"])
    with pytest.raises(ModelError, match="unknown resnet50 weights"):
        resolve_model("imagenet:NOPE")
