"""One writer per model-side output (train, sweep, augment, evaluate), and resume whatever the spelling of a path."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.training.augment import augment
from dinobatch.cli.main import cli
from dinobatch.config import TrainConfig
from dinobatch.errors import EXIT_LOCKED, ConfigError, LockedError
from dinobatch.io.lock import exclusive
from dinobatch.training.manifest import build_manifest, write_manifest
from dinobatch.training.sweep import sweep
from dinobatch.training.train import checkpoint_path, train
from tests.helpers import picture, save

LABELS = ("stegosaurus", "triceratops")


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Two labels of six small pictures each."""
    root = tmp_path / "data"
    for li, label in enumerate(LABELS):
        for i in range(6):
            img = picture(900 + 10 * li + i, (64, 48))
            if li:
                img.paste((255, 255, 0), (0, 0, 64, 8))
            save(img, root / label / f"{i}.png")
    return write_manifest(build_manifest(root, fractions=(0.5, 0.5, 0.0), seed=0), tmp_path / "manifest.parquet", root)


def _cfg(manifest, out, **kw) -> TrainConfig:
    base = dict(manifest=str(manifest), out=str(out), arch="resnet18", pretrained="none", epochs=1, final_epochs=1,
                batch_size=4, augment_level=0, image_size=32, workers=0, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_a_second_train_into_the_same_model_file_exits_9_and_writes_nothing(tmp_path, manifest):
    out = tmp_path / "models" / "m.pt"
    with exclusive(Path(str(out) + ".lock")):  # what a first train holds while it runs
        with pytest.raises(LockedError):
            train(_cfg(manifest, out))
        busy = CliRunner().invoke(cli, ["train", str(manifest), "-o", str(out), "--pretrained", "none",
                                        "--arch", "resnet18", "--wait", "0.2"], catch_exceptions=False)
    assert busy.exit_code == EXIT_LOCKED and f"model file {out} is in use by pid {os.getpid()}" in busy.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt.lock"]  # no checkpoint, metrics or model
    train(_cfg(manifest, out))  # free again: trains, and leaves no lock file behind
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt", "m.pt.metrics.jsonl"]


def test_a_second_sweep_into_the_same_folder_exits_9(tmp_path, manifest):
    out = tmp_path / "sweep"
    with exclusive(out / ".lock"):
        with pytest.raises(LockedError):
            sweep(_cfg(manifest, tmp_path / "unused.pt"), {"lr": [0.05]}, out)
        busy = CliRunner().invoke(cli, ["sweep", str(manifest), "-o", str(out), "--wait", "0.2"],
                                  catch_exceptions=False)
    assert busy.exit_code == EXIT_LOCKED
    assert not (out / "trials.parquet").exists() and not (out / "trials").exists()


def test_a_second_augment_or_evaluate_into_the_same_folder_exits_9(tmp_path, manifest, tiny_model):
    with exclusive(tmp_path / "aug" / ".lock"):
        with pytest.raises(LockedError):
            augment(manifest, 1, tmp_path / "aug")
        busy = CliRunner().invoke(cli, ["augment", str(manifest), "--level", "1", "-o", str(tmp_path / "aug")],
                                  catch_exceptions=False)
    assert busy.exit_code == EXIT_LOCKED and os.listdir(tmp_path / "aug") == [".lock"]
    with exclusive(tmp_path / "eval" / ".lock"):
        busy = CliRunner().invoke(cli, ["evaluate", str(manifest), "-m", str(tiny_model), "--split", "val", "-o",
                                        str(tmp_path / "eval"), "-j", "0", "--wait", "0.1"], catch_exceptions=False)
    assert busy.exit_code == EXIT_LOCKED and os.listdir(tmp_path / "eval") == [".lock"]


def test_resume_takes_the_same_manifest_and_output_spelt_relative_or_absolute(tmp_path, manifest, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = _cfg("manifest.parquet", "m.pt")
    assert train(relative, stop_after_epoch=1) is None and checkpoint_path("m.pt").exists()
    absolute = dataclasses.replace(relative, manifest=str(manifest), out=str(tmp_path / "m.pt"))
    resumed = train(absolute, resume=True)
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]
    train(_cfg("manifest.parquet", "n.pt"), stop_after_epoch=1)
    with pytest.raises(ConfigError, match="lr"):  # a real difference is still refused, and named
        train(dataclasses.replace(_cfg(str(manifest), "n.pt"), lr=0.01), resume=True)


def test_a_sweep_rerun_with_the_manifest_spelt_otherwise_keeps_its_finished_trials(tmp_path, manifest, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = _cfg("manifest.parquet", "unused.pt", final_epochs=0)
    first = sweep(base, {"lr": [0.05]}, "sweep")
    again = sweep(dataclasses.replace(base, manifest=str(manifest)), {"lr": [0.05]}, tmp_path / "sweep")
    assert first[0]["status"] == "ok" and again[0]["seconds"] == first[0]["seconds"]  # not trained again
    assert len(pq.read_table(tmp_path / "sweep" / "trials.parquet")) == 1
