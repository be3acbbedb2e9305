"""models.quantize: the int8 model file (weights only, its own fingerprint, calibration provenance),
its predictions beside the fp32 model's, deterministic calibration, and the refusals (CUDA, training)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dinobatch.errors import EXIT_DEVICE, DeviceError, InputError, ModelError
from dinobatch.models.file import FORMAT, INT8_FORMAT_VERSION, initial_module, load_model
from dinobatch.models.quantize import calibration_pixels, calibration_set, quantize_file
from dinobatch.runtime.device import Runtime, resolve_runtime
from dinobatch.stages.infer import Predictor
from tests.helpers import LABELS, picture, save


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Twenty distinct pictures in a folder."""
    root = tmp_path_factory.mktemp("calibration")
    for i in range(20):
        save(picture(i), root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def int8_path(tmp_path_factory, tiny_model, photos):
    """tiny_model quantized on 12 of the pictures: the int8 file."""
    path = tmp_path_factory.mktemp("int8") / "tiny-int8.pt"
    quantize_file(str(tiny_model), photos, path, count=12)
    return path


@pytest.fixture(scope="module")
def int8(int8_path):
    """The int8 file, loaded."""
    return load_model(int8_path)


def _pixels(photos, spec):
    """Every picture decoded as classify decodes it, as a uint8 NCHW batch."""
    pixels, _, _ = calibration_pixels(calibration_set(photos), spec, 100)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def test_the_int8_file_loads_with_weights_only_and_records_precision_and_calibration(int8_path, tiny_model, photos):
    path = int8_path
    payload = torch.load(path, weights_only=True)  # no code in the file
    assert payload["format"] == FORMAT and payload["format_version"] == INT8_FORMAT_VERSION
    loaded = load_model(path)
    assert loaded.spec.precision == "int8" and loaded.spec.labels == LABELS
    assert loaded.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.fingerprint != load_model(tiny_model).fingerprint  # rows and cache never mix
    cal = loaded.spec.calibration
    chosen = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.iterdir())[:12]
    assert cal["images"] == 12 and cal["kind"] == "folder" and cal["source"] == str(photos)
    assert cal["sha256_digest"] == hashlib.sha256("".join(s + "\n" for s in chosen).encode()).hexdigest()
    assert loaded.spec.source["model_sha256"] == load_model(tiny_model).fingerprint


def test_int8_predictions_and_embeddings_follow_the_fp32_model(int8, tiny_model, photos):
    fp32 = load_model(tiny_model)
    x = _pixels(photos, fp32.spec)
    runtime = resolve_runtime("cpu")
    ours = Predictor(int8, runtime, batch_size=32, embeddings=True)(x)
    theirs = Predictor(fp32, runtime, batch_size=32, embeddings=True)(x)
    assert all(abs(sum(p["probs"]) - 1) < 1e-4 for p in ours)
    assert np.mean([a["label"] == b["label"] for a, b in zip(ours, theirs)]) >= 0.9
    a, b = (np.array([p["embedding"] for p in preds]) for preds in (ours, theirs))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98  # a wrong scale or unloaded weight breaks this

    def nearest(e):
        d = ((e[:, None] - e[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return d.argmin(1)

    assert np.mean(nearest(a) == nearest(b)) >= 0.8  # similar's neighbours mostly the same


def test_the_same_inputs_give_the_same_int8_weights(int8, tiny_model, photos, tmp_path):
    for i, p in enumerate(sorted(photos.iterdir())):  # other names, other order: the choice is by content
        save(picture(int(p.stem)), tmp_path / "renamed" / f"z{19 - i}.png")
    again = quantize_file(str(tiny_model), tmp_path / "renamed", tmp_path / "again.pt", count=12)
    assert again.spec.calibration["sha256_digest"] == int8.spec.calibration["sha256_digest"]
    first, second = int8.module.state_dict(), again.module.state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        other = second[key]
        if isinstance(value, tuple):  # a linear layer's packed (weight, bias)
            assert all(torch.equal(u.int_repr() if u.is_quantized else u, v.int_repr() if v.is_quantized else v)
                       for u, v in zip(value, other)), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value.int_repr(), other.int_repr()) if value.is_quantized else torch.equal(value, other)
            if value.is_quantized and value.qscheme() == torch.per_channel_affine:
                assert torch.equal(value.q_per_channel_scales(), other.q_per_channel_scales()), key


def test_a_manifest_calibrates_on_its_train_split_only(tiny_model, photos, tmp_path):
    lines = ["path,label,split"] + [f"{p.name},{LABELS[i % 3]},{'train' if i < 8 else 'test'}"
                                    for i, p in enumerate(sorted(photos.iterdir()))]
    (photos / "m.csv").write_text("\n".join(lines) + "\n")
    try:
        loaded = quantize_file(str(tiny_model), photos / "m.csv", tmp_path / "m8.pt", count=100)
    finally:
        (photos / "m.csv").unlink()
    train = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(photos.iterdir())[:8])
    cal = loaded.spec.calibration
    assert (cal["kind"], cal["split"], cal["images"], cal["requested"]) == ("manifest", "train", 8, 100)
    assert cal["sha256_digest"] == hashlib.sha256("".join(s + "\n" for s in train).encode()).hexdigest()


def test_unreadable_calibration_files_are_passed_over_and_counted(tiny_model, tmp_path):
    save(picture(1), tmp_path / "in" / "ok.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    loaded = quantize_file(str(tiny_model), tmp_path / "in", tmp_path / "q.pt", count=5)
    assert loaded.spec.calibration["images"] == 1 and loaded.spec.calibration["unreadable_skipped"] == 1
    (tmp_path / "in" / "ok.png").unlink()
    with pytest.raises(InputError, match="no calibration images"):
        quantize_file(str(tiny_model), tmp_path / "in", tmp_path / "q2.pt", count=5)


def test_an_int8_model_survives_pickling_as_a_ray_actor_receives_it(int8, photos):
    import pickle

    again = pickle.loads(pickle.dumps(int8))
    assert (again.spec, again.fingerprint, again.name) == (int8.spec, int8.fingerprint, int8.name)
    x = _pixels(photos, int8.spec)[:4].float()
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(int8.module(x), again.module(x)))


def test_an_int8_model_is_refused_on_cuda_and_with_another_precision_asked_for(int8):
    cuda = Runtime(torch.device("cuda", 0), "bf16")
    with pytest.raises(DeviceError, match="int8 model file: it runs on the CPU only") as err:
        Predictor(int8, cuda, batch_size=4, embeddings=False)  # before anything is moved to the device
    assert err.value.exit_code == EXIT_DEVICE
    cpu = resolve_runtime("cpu")
    with pytest.raises(DeviceError, match="runs in int8, not bf16"):
        cpu.for_model("int8", "bf16")
    assert cpu.for_model("int8", "auto").precision == "int8"
    with pytest.raises(DeviceError, match="needs an int8 model file"):
        resolve_runtime("cpu", "int8").for_model("fp32")


def test_int8_models_cannot_be_quantized_again_or_trained(int8_path, photos, tmp_path):
    path = int8_path
    with pytest.raises(ModelError, match="already an int8 model"):
        quantize_file(str(path), photos, tmp_path / "twice.pt", count=2)
    with pytest.raises(ModelError, match="cannot be trained"):
        initial_module("resnet18", LABELS, str(path))


@pytest.mark.parametrize("arch", ["resnet50"])
def test_bottleneck_architectures_quantize_too(arch, photos, tmp_path):
    from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model

    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, labels=LABELS, preprocessing=Preprocessing(resize=36, crop=32))
    save_model(tmp_path / "m.pt", spec, build_module(arch, len(LABELS)).state_dict())
    quantize_file(str(tmp_path / "m.pt"), photos, tmp_path / "q.pt", count=2)
    loaded = load_model(tmp_path / "q.pt")  # rebuilt from the file, as classify loads it
    preds = Predictor(loaded, resolve_runtime("cpu"), batch_size=4, embeddings=False)(_pixels(photos, spec)[:4])
    assert len(preds) == 4 and all(p["label"] in LABELS for p in preds)
