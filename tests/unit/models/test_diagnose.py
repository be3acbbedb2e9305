"""Issue 13: a bad --model file is described as what it is, a plain state_dict is told the
architecture its keys match, and fetching torchvision's weights prints nothing on stdout."""

from __future__ import annotations

import io
import logging
import pickle

import pytest
import torch

from dinobatch.errors import EXIT_MODEL, ModelError
from dinobatch.models.file import build_module, import_state_dict, initial_module, load_model
from tests.helpers import LABELS
from tests.weights_server import publish_weights, serving


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("content, described", [
    (b"just text\nsecond line\n", r"not a PyTorch file: it is a text file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), r"not a PyTorch file: it starts like a PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(40), r"not a PyTorch file: it starts like a JPEG image"),
    (b"", r"not a PyTorch file: it is empty \(0 bytes\)"),
    (_torch_bytes({"fc.weight": torch.zeros(3, 2)})[:300], r"truncated or damaged"),
    (pickle.dumps([1, 2]), r"not a PyTorch file: it is a Python pickle"),
])
def test_a_file_that_is_not_a_torch_checkpoint_is_described_as_what_it_is(tmp_path, content, described):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=described) as info:
        load_model(path)
    assert "run code" not in str(info.value) and "unpickle" not in str(info.value)
    assert info.value.exit_code == EXIT_MODEL


class _Boom:
    # len, not print: Ray Data replaces builtins.print in a process that has run a Ray dataset (the
    # suite's Ray tests run first), and the message names the callable the pickle holds
    def __reduce__(self):
        return (len, ("pwned",))


def test_only_a_real_pickle_with_objects_gets_the_could_run_code_refusal(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_bytes({"state_dict": _Boom()}))
    with pytest.raises(ModelError, match=r"other than tensors \(len\).*could run code"):
        load_model(path)


def test_a_plain_state_dict_is_told_the_architecture_its_keys_match(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(build_module("resnet18", 5).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_model(path)
    text = str(info.value)
    assert "resnet50" not in text
    assert f"dinobatch model import {path} --arch resnet18 --labels LABELS.txt --out MODEL" in text
    assert "5 classes" in text


def test_a_state_dict_of_no_supported_architecture_says_so(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ModelError, match="match none of the supported architectures") as info:
        load_model(path)
    assert "--arch resnet50" not in str(info.value)


def test_import_with_the_wrong_arch_names_the_one_that_fits(tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    torch.save(build_module("resnet18", len(LABELS)).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelError, match=r"do not fit a torchvision resnet50.*match resnet18: use --arch resnet18"):
        import_state_dict(tmp_path / "sd.pt", arch="resnet50", labels_path=tmp_path / "labels.txt",
                          out=tmp_path / "m.pt")


def test_downloading_torchvision_weights_writes_nothing_on_stdout(tmp_path, monkeypatch, capfd, caplog):
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(0)
    full = build_module("resnet18", 1000).state_dict()
    state = {k: v.half() if v.is_floating_point() else v for k, v in full.items()}  # half the bytes to serve
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "served").mkdir()
    with serving(tmp_path / "served") as base:
        name = publish_weights(monkeypatch, ResNet18_Weights.IMAGENET1K_V1, state, tmp_path / "served", base,
                               "resnet18")
        capfd.readouterr()
        with caplog.at_level(logging.INFO, logger="dinobatch"):
            module, start = initial_module("resnet18", LABELS, "imagenet")
    out, _ = capfd.readouterr()
    assert out == ""  # stdout stays clean for --json consumers
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).read_bytes() == (tmp_path / "served" / name).read_bytes()
    assert any("downloading" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    assert torch.equal(module.conv1.weight, state["conv1.weight"].float())
    assert start["pretrained"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
