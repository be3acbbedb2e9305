"""The local engine: the GPU-side model input (device JPEG decode, orientation, resize) checked on the CPU, and the
speed-ups that must not change a prediction."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dinobatch.engines.local import ImageDataset, device_batch, predict
from dinobatch.imaging.preprocess import orient_tensor
from dinobatch.models.file import Preprocessing, load_model
from dinobatch.runtime.burst import balanced_shares
from dinobatch.runtime.device import resolve_runtime
from dinobatch.runtime.loader import collate
from dinobatch.stages.decode import WorkItem
from tests.helpers import picture, save


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_tensor_matches_pil_exif_transpose(orientation):
    img = picture(orientation, (40, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert np.array_equal(orient_tensor(tensor, orientation).permute(1, 2, 0).numpy(), expected)


def _items(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [save(picture(1, (400, 300)), tmp_path / "a.jpg", quality=95),
             save(picture(2, (300, 400)), tmp_path / "rot.jpg", quality=95, exif=exif.tobytes()),
             save(picture(3), tmp_path / "c.png"),
             save(picture(4).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)]
    import hashlib

    return [WorkItem((str(f),), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]


def test_jpegs_decoded_by_torchvision_give_the_model_the_same_picture(tmp_path):
    prep = Preprocessing(resize=64, crop=56)
    items = _items(tmp_path)
    cpu = resolve_runtime("cpu", "fp32")
    plain_records, plain = collate([ImageDataset(items, prep)[i] for i in range(len(items))])
    records, batch = collate([ImageDataset(items, prep, jpeg_to_device=True)[i] for i in range(len(items))])
    assert ["jpeg" in r for r in records] == [True, True, False, False]  # PNG and CMYK: the CPU path
    x = device_batch(records, batch, cpu, prep)
    assert x.shape == plain.shape == (4, 3, 56, 56)
    diff = (x.float() - plain.float()).abs().mean(dim=(1, 2, 3))
    assert diff[2] == diff[3] == 0  # untouched rows are the CPU path's own
    assert (diff[:2] < 6).all(), diff  # full-resolution decode + antialiased resize vs draft + box: close
    assert [r["facts"] for r in records] == [r["facts"] for r in plain_records]  # hashes do not depend on it


def test_compiled_model_predicts_the_same_top1(tmp_path, tiny_model):
    items = _items(tmp_path)[:3]
    model = load_model(tiny_model)
    cpu = resolve_runtime("cpu", "fp32")
    plain = [r.prediction["label"] for b in predict(model, cpu, items, batch_size=2, workers=0,
                                                    embeddings=False) for r in b]
    compiled = [r.prediction for b in predict(model, cpu, items, batch_size=2, workers=0, embeddings=False,
                                              compile=True) for r in b]
    assert [p["label"] for p in compiled] == plain  # the last batch of one is padded, not recompiled


@pytest.mark.parametrize("n", [1, 2, 3])
def test_burst_shares_cover_the_batch_once_and_balance_the_bytes(n):
    rng = np.random.default_rng(n)
    costs = [int(c) for c in rng.integers(10_000, 2_000_000, 32)]
    indices = list(range(100, 132))
    shares = balanced_shares(indices, costs, n)
    assert sorted(i for share in shares for i in share) == indices
    assert all(share == sorted(share) for share in shares)
    totals = [sum(costs[i - 100] for i in share) for share in shares]
    # greedy largest-first: the heaviest share exceeds the lightest by at most one file's cost
    assert max(totals) - min(totals) <= max(costs)
