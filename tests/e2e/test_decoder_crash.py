"""A decoder that crashes the process decoding a file costs that file's row, not the run.

DINOBATCH_CRASH_AT=decode:1:poison makes whichever process is about to decode a file whose path
contains 'poison' die by SIGKILL, as a segfaulting libjpeg or libtiff, or the OOM killer, would.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from dinobatch import faults
from dinobatch.classify import classify
from dinobatch.config import ClassifyConfig
from dinobatch.device import usable_cores
from dinobatch.inventory import ScanConfig, scan_folder
from tests.conftest import REPO, picture, save


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
