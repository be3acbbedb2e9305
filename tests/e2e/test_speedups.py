"""The speed-ups (burst decoding on every core, channels-last, the tuned allocator) change no prediction."""

from __future__ import annotations

import torch

from dinobatch.imaging.decode import decode
from dinobatch.imaging.preprocess import model_input
from dinobatch.models.file import build_module, load_model
from dinobatch.runtime.device import resolve_runtime, usable_cores
from tests.helpers import run_classify as run


def _without_run_id(rows):
    return {p: {k: v for k, v in r.items() if k != "run_id"} for p, r in rows.items()}


def test_default_burst_decoding_writes_the_same_rows_as_decoding_in_process(tmp_path, inbox, tiny_model, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the operator did not choose: every usable core
    root = inbox["a.jpg"].parent
    _, serial = run(root, tmp_path / "serial", tiny_model, workers=0)
    summary, burst = run(root, tmp_path / "burst", tiny_model, workers=None)  # the CPU default
    assert _without_run_id(burst) == _without_run_id(serial)
    assert summary.process["threads"] == usable_cores()


def test_the_model_and_its_batches_run_channels_last_as_the_summary_says():
    runtime = resolve_runtime("cpu", "fp32")
    module = runtime.prepare(build_module("resnet18", 3))
    assert module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not module.training
    batch = runtime.to_device(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_bursts_of_several_batches_cut_into_the_same_rows(tmp_path, inbox, tiny_model, monkeypatch):
    import dinobatch.runtime.burst

    monkeypatch.setattr(dinobatch.runtime.burst, "BURST_IMAGES", 6)  # bursts of 6: two batches of 3, then a short one
    root = inbox["a.jpg"].parent
    _, serial = run(root, tmp_path / "serial", tiny_model, workers=0, batch_size=3)
    _, burst = run(root, tmp_path / "burst", tiny_model, workers=None, batch_size=3)
    assert len(burst) == 15 and _without_run_id(burst) == _without_run_id(serial)


def test_top1_equals_a_plain_fp32_forward_pass(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    _, rows = run(root, tmp_path / "out", tiny_model, workers=None, batch_size=5)
    loaded = load_model(tiny_model)
    module = loaded.module.eval()  # contiguous NCHW, no channels-last, one image at a time
    prep = loaded.spec.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep.std).view(1, 3, 1, 1) * 255
    checked = 0
    for path, row in rows.items():
        if row["status"] != "ok":
            continue
        x = model_input(decode((root / path).read_bytes(), min_side=prep.resize).image, prep)
        with torch.no_grad():
            logits = module((x[None].float() - mean) / std)
        assert row["label"] == loaded.spec.labels[int(logits.argmax())], path
        checked += 1
    assert checked >= 10
