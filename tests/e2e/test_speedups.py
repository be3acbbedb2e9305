"""The speed-ups (burst decoding on every core, channels-last, the tuned allocator) change no prediction."""

from __future__ import annotations

import torch

from dinobatch.imaging.decode import decode
from dinobatch.imaging.preprocess import model_input
from dinobatch.models.file import load_model

from tests.e2e.test_classify import run


def _without_run_id(rows):
    return {p: {k: v for k, v in r.items() if k != "run_id"} for p, r in rows.items()}


def test_default_burst_decoding_writes_the_same_rows_as_decoding_in_process(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    _, serial = run(root, tmp_path / "serial", tiny_model, workers=0)
    summary, burst = run(root, tmp_path / "burst", tiny_model, workers=None)  # the CPU default
    assert _without_run_id(burst) == _without_run_id(serial)
    assert summary.process["threads"] >= 1 and summary.process["channels_last"]


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
