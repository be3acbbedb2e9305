"""A decoder that crashes the process decoding a file costs that file's row, not the run.

DINOBATCH_CRASH_AT=decode:1:poison makes whichever process is about to decode a file whose path
contains 'poison' die by SIGKILL, as a segfaulting libjpeg or libtiff, or the OOM killer, would.
"""

from __future__ import annotations

import hashlib
import signal
import time

import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from dinobatch.runtime import faults
from dinobatch.jobs.classify import classify
from dinobatch.config import ClassifyConfig
from dinobatch.runtime.device import usable_cores
from dinobatch.engines.local import ImageDataset
from dinobatch.stages.decode import WorkItem
from dinobatch.runtime.loader import loader_batches
from dinobatch.models.file import Preprocessing
from dinobatch.jobs.scan import ScanConfig, scan_folder
from tests.helpers import REPO, picture, save


@pytest.fixture
def poisoned(tmp_path, monkeypatch):
    root = tmp_path / "inbox"
    for i in range(9):
        save(picture(i), root / f"photo{i}.jpg", quality=90)
    save(picture(20), root / "poison.png")
    monkeypatch.setenv(faults.ENV, "decode:1:poison")
    return root


def test_scan_survives_a_crashing_decoder(poisoned, tmp_path):
    summary = scan_folder(ScanConfig(folder=str(poisoned), output=str(tmp_path / "scan.parquet"), workers=2))
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "scan.parquet").to_pylist()}
    assert len(rows) == 10 and summary.counts["error"] == 1
    assert rows["poison.png"]["status"] == "error"
    assert "decoder crashed" in rows["poison.png"]["error"] and "SIGKILL" in rows["poison.png"]["error"]
    assert rows["poison.png"]["bytes"] == (poisoned / "poison.png").stat().st_size  # still known
    assert all(rows[f"photo{i}.jpg"]["status"] == "ok" and rows[f"photo{i}.jpg"]["phash"] for i in range(9))


@pytest.mark.skipif(usable_cores() < 2, reason="burst decoding (the CPU default) needs two usable cores")
def test_classify_survives_a_crashing_decoder_and_keeps_every_other_prediction(poisoned, tmp_path, tiny_model):
    cfg = ClassifyConfig(folder=str(poisoned), out=str(tmp_path / "out"), model=str(tiny_model), batch_size=4,
                         species=str(REPO / "manifests" / "species.csv"))  # workers: the default (burst)
    summary = classify(cfg)
    rows = {r["path"]: r for r in pq.read_table(summary.rows_file).to_pylist()}
    assert len(rows) == 10 and summary.counts["error"] == 1
    assert "decoder crashed" in rows["poison.png"]["error"] and rows["poison.png"]["label"] is None
    assert all(rows[f"photo{i}.jpg"]["status"] == "ok" and rows[f"photo{i}.jpg"]["label"] for i in range(9))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crash_in_a_dataloader_worker_costs_only_its_file(poisoned, tmp_path, tiny_model, workers, caplog):
    """-j N (and CUDA, by default) decodes in DataLoader workers: a worker dying on a file is
    noticed by the loader itself, the batches it had in flight are decoded again in isolation, and
    a fresh loader takes the rest. Batches of 2 put the poison in the middle of the folder's work."""
    cfg = ClassifyConfig(folder=str(poisoned), out=str(tmp_path / "out"), model=str(tiny_model), batch_size=2,
                         workers=workers, species=str(REPO / "manifests" / "species.csv"))
    summary = classify(cfg)
    rows = {r["path"]: r for r in pq.read_table(summary.rows_file).to_pylist()}
    assert len(rows) == 10 and summary.counts["error"] == 1
    assert "decoder crashed" in rows["poison.png"]["error"] and "SIGKILL" in rows["poison.png"]["error"]
    assert all(rows[f"photo{i}.jpg"]["status"] == "ok" and rows[f"photo{i}.jpg"]["label"] for i in range(9))
    assert "decoding worker died" in caplog.text


@pytest.mark.parametrize("jpeg_to_device, loader_before", [(True, False), (False, True)])
def test_loader_recovery_with_jpeg_bytes_and_after_another_loader(tmp_path, monkeypatch, request, jpeg_to_device,
                                                                   loader_before):
    """What CUDA adds: JPEG bytes travel as tensors to be decoded on the device (they must survive
    the one-process-per-file isolation), and a loader with workers used earlier in the process
    (training, say) has left torch's SIGCHLD handler installed, which would raise the death in the
    middle of the model. The crash still costs only its file, and torch's handler is back after."""
    root = tmp_path / "in"
    for i in range(30):  # the poison late in the folder: the worker dies while the model runs
        save(picture(i), root / f"p{i:02d}.jpg", quality=90)
    save(picture(50), root / "p25poison.jpg", quality=90)
    monkeypatch.setenv(faults.ENV, "decode:1:poison")
    if loader_before:  # as in a fresh process where training ran first: torch installs its handler
        from torch.utils.data._utils import signal_handling

        monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
        original = signal.getsignal(signal.SIGCHLD)
        request.addfinalizer(lambda: signal.signal(signal.SIGCHLD, original))
        assert sum(len(b) for b in DataLoader(list(range(4)), batch_size=2, num_workers=1)) == 4
        assert "_set_SIGCHLD_handler" in signal.getsignal(signal.SIGCHLD).__qualname__
    before = signal.getsignal(signal.SIGCHLD)
    files = sorted(root.iterdir())
    items = [WorkItem((str(f),), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]
    dataset = ImageDataset(items, Preprocessing(resize=64, crop=56), jpeg_to_device=jpeg_to_device)
    records = []
    for batch_records, _ in loader_batches(dataset, 2, 2, False):
        records += batch_records
        time.sleep(0.3)  # the model's forward pass, where torch's handler would strike
    assert [r["sha256"] for r in records] == [item.sha256 for item in items]
    failed = {f.name: r["error"] for f, r in zip(files, records) if r["error"]}
    assert list(failed) == ["p25poison.jpg"] and "decoder crashed" in failed["p25poison.jpg"]
    if jpeg_to_device:
        assert all("jpeg" in r for r in records if not r["error"])
    assert signal.getsignal(signal.SIGCHLD) is before
