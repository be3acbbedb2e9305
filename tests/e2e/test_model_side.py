"""Manifest, augment, train, evaluate and sweep on generated labelled images with a tiny network."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dinobatch.cli.main import cli
from dinobatch.config import TrainConfig
from dinobatch.models.file import load_model
from dinobatch.training.augment import LEVELS, materialize, multiplier
from dinobatch.training.evaluate import evaluate
from dinobatch.training.manifest import assign_splits, build_manifest, load_manifest, write_manifest
from dinobatch.training.sweep import sweep
from dinobatch.training.train import checkpoint_path, metrics_path, train
from tests.helpers import picture, save, tree_digest

LABELS = ("stegosaurus", "triceratops")


@pytest.fixture
def dataset(tmp_path):
    """Two labels, 12 distinct pictures each, plus a copy and a resized copy that must stay together."""
    root = tmp_path / "data"
    for li, label in enumerate(LABELS):
        for i in range(12):
            img = picture(100 * li + i, (96, 72))
            if li:  # make the classes learnable: a bright bar on every triceratops
                img.paste((255, 255, 0), (0, 0, 96, 12))
            save(img, root / label / f"{i:02d}.png")
    (root / "stegosaurus" / "copy.png").write_bytes((root / "stegosaurus" / "00.png").read_bytes())
    save(picture(1, (96, 72)).resize((192, 144)), root / "stegosaurus" / "big_copy.png")
    (root / "triceratops" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def manifest(tmp_path, dataset):
    table = build_manifest(dataset, fractions=(0.5, 0.25, 0.25), seed=3, kind="photo")
    return write_manifest(table, tmp_path / "manifest.parquet", dataset)


def tiny_cfg(manifest, out, **kw) -> TrainConfig:
    base = dict(manifest=str(manifest), out=str(out), arch="resnet18", pretrained="none", epochs=1, final_epochs=1,
                batch_size=8, augment_level=1, image_size=32, workers=0, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_manifest_keeps_duplicates_together_and_stratifies(manifest):
    rows = pq.read_table(manifest).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert by_path["triceratops/notes.txt"]["status"] == "error" and by_path["triceratops/notes.txt"]["split"] is None
    group = by_path["stegosaurus/00.png"]["group"]
    members = [r for r in rows if r["group"] == group]
    assert {r["path"] for r in members} >= {"stegosaurus/00.png", "stegosaurus/copy.png"}
    assert len({r["split"] for r in members}) == 1
    for g in {r["group"] for r in rows if r["group"] is not None}:
        assert len({r["split"] for r in rows if r["group"] == g}) == 1
    for label in LABELS:
        counts = {s: sum(1 for r in rows if r["label"] == label and r["split"] == s) for s in ("train", "val", "test")}
        assert counts["val"] >= 2 and counts["test"] >= 2 and counts["train"] >= 5
    assert {r["kind"] for r in rows} == {"photo"}


def test_split_assignment_never_breaks_a_group_and_follows_fractions():
    groups = [(i, "a" if i % 2 else "b", 1 + (i % 5 == 0) * 3) for i in range(200)]
    splits = assign_splits(groups, (0.8, 0.1, 0.1), seed=1)
    assert set(splits) == set(range(200))
    for label in "ab":
        sizes = {s: sum(size for gid, lab, size in groups if lab == label and splits[gid] == s)
                 for s in ("train", "val", "test")}
        total = sum(sizes.values())
        assert abs(sizes["val"] - 0.1 * total) <= 4 and abs(sizes["test"] - 0.1 * total) <= 4


def test_csv_manifest_is_accepted(tmp_path, dataset):
    csv_path = dataset / "list.csv"
    csv_path.write_text("path,label,split\nstegosaurus/01.png,stegosaurus,train\ntriceratops/01.png,triceratops,val\n"
                        "missing.png,stegosaurus,train\n")
    m = load_manifest(csv_path)
    assert [r["path"] for r in m.rows()] == ["stegosaurus/01.png", "triceratops/01.png"]
    assert m.table.num_rows == 3 and m.rows("val")[0]["label"] == "triceratops"


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_augmentation_levels_give_the_promised_counts(level):
    assert multiplier(level) == {0: 1, 1: 2, 2: 4, 3: 8, 4: 12, 5: 16, 6: 20}[level]


def test_augment_keeps_a_hostile_label_inside_its_output_folder(tmp_path):
    """A CSV manifest can carry any label: '..' or 'a/b' must not write variants outside OUT or nest them."""
    for i in range(2):
        save(picture(i), tmp_path / "data" / f"{i}.png")
    (tmp_path / "data" / "m.csv").write_text("path,label,split\n0.png,..,train\n1.png,a/b,train\n")
    table = materialize(load_manifest(tmp_path / "data" / "m.csv"), 0, tmp_path / "out" / "aug").table
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jpg"))
    assert [p.parts[:3] for p in written] == [("out", "aug", "a_b"), ("out", "aug", "label_..")]
    assert sorted(table.column("label").to_pylist()) == ["..", "a/b"]  # the labels themselves are kept


def test_augment_writes_variants_that_stay_in_their_originals_split(tmp_path, manifest, dataset):
    before = tree_digest(dataset)
    m = load_manifest(manifest)
    table = materialize(m, 2, tmp_path / "aug", splits=("train",), seed=0).table
    write_manifest(table, tmp_path / "aug" / "manifest.parquet", tmp_path / "aug")
    variants = [r for r in table.to_pylist() if r["source"]]
    assert len(variants) == 4 * len(m.rows("train"))
    originals = {r["path"]: r for r in m.rows()}
    for r in variants:
        assert r["split"] == originals[r["source"]]["split"] == "train"
        assert r["label"] == originals[r["source"]]["label"]
        assert Image.open(tmp_path / "aug" / r["path"]).size == (r["width"], r["height"])
    by_source: dict[str, set] = {}
    for r in variants:
        by_source.setdefault(r["source"], set()).add(r["group"])
    assert all(len(g) == 1 and None not in g for g in by_source.values())  # one group per original
    augmented = load_manifest(tmp_path / "aug" / "manifest.parquet")
    assert len(augmented.rows("val")) == len(m.rows("val")) > 0  # val passes through, pointing at originals
    assert all(Path(augmented.abspath(r)).is_file() for r in augmented.rows("val"))
    again = materialize(m, 2, tmp_path / "aug2", splits=("train",), seed=0).table.to_pylist()
    assert [r["sha256"] for r in again] == [r["sha256"] for r in table.to_pylist()]  # seeded: the same pixels
    assert tree_digest(dataset) == before


def test_same_named_originals_of_two_formats_do_not_overwrite_each_other(tmp_path):
    root = tmp_path / "d"
    save(picture(1), root / "a" / "x.png")
    save(picture(2), root / "a" / "x.jpg")
    (root / "list.csv").write_text("path,label,split\na/x.png,a,train\na/x.jpg,a,train\n")
    table = materialize(load_manifest(root / "list.csv"), 1, tmp_path / "out", splits=("train",)).table
    assert len({r["path"] for r in table.to_pylist()}) == 4


def test_moved_manifest_still_finds_its_images(tmp_path, dataset, manifest):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    shutil.rmtree(dataset)
    m = load_manifest(moved / "manifest.parquet")
    assert Path(m.abspath(m.rows()[0])).is_file() and str(moved) in str(m.root)


def test_training_writes_a_model_classify_takes_with_metrics_and_calibration(tmp_path, manifest):
    cfg = tiny_cfg(manifest, tmp_path / "m.pt")
    result = train(cfg)
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert [m["lr"] for m in result.metrics] == [0.05, 0.025]
    for m in result.metrics:
        assert m["train_loss"] > 0 and 0 <= m["val_top1"] <= m["val_top3"] <= 1
    lines = [json.loads(x) for x in metrics_path(cfg.out).read_text().splitlines()]
    assert lines == result.metrics
    public = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top3", "val_macro_f1",
              "train_samples", "val_images", "unreadable", "seconds"]  # nothing of validation's internals
    assert all(list(m) == public for m in lines)
    model = load_model(cfg.out)
    assert model.spec.labels == LABELS and model.spec.preprocessing.crop == 32
    src = model.spec.source
    assert src["manifest_sha256"] == load_manifest(manifest).sha256 and src["config"]["epochs"] == 1
    assert src["best_epoch"] == min(result.metrics, key=lambda m: m["val_loss"])["epoch"]
    cal = result.calibration
    assert model.spec.temperature == pytest.approx(cal["temperature"]) and cal["temperature"] > 0
    assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1
    assert not checkpoint_path(cfg.out).exists()


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(tmp_path, manifest):
    whole = train(tiny_cfg(manifest, tmp_path / "whole.pt", augment_level=2))  # random camera effects too
    cfg = tiny_cfg(manifest, tmp_path / "parts.pt", augment_level=2)
    assert train(cfg, stop_after_epoch=1) is None
    assert checkpoint_path(cfg.out).exists() and not (tmp_path / "parts.pt").exists()
    resumed = train(cfg, resume=True)
    assert resumed.metrics == whole.metrics or all(
        a[k] == pytest.approx(b[k], rel=1e-5) for a, b in zip(resumed.metrics, whole.metrics) for k in a if k != "seconds")
    a, b = load_model(tmp_path / "whole.pt").module, load_model(tmp_path / "parts.pt").module
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_evaluate_metrics_equal_those_computed_by_hand_from_an_independent_forward_pass(tmp_path, manifest):
    from dinobatch.imaging.decode import decode
    from dinobatch.imaging.preprocess import model_input

    model_path = tmp_path / "m.pt"
    train(tiny_cfg(manifest, model_path))
    result = evaluate(str(manifest), str(model_path), str(tmp_path / "eval"), split="test", workers=0)
    model, m = load_model(model_path), load_manifest(manifest)
    prep = model.spec.preprocessing
    rows = m.rows("test")
    x = torch.stack([model_input(decode(open(m.abspath(r), "rb").read()).image, prep) for r in rows]).float()
    x = (x - torch.tensor(prep.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(prep.std).view(1, 3, 1, 1) * 255)
    with torch.no_grad():
        probs = torch.softmax(model.module.eval()(x) / model.spec.temperature, dim=1).numpy()
    y = [LABELS.index(r["label"]) for r in rows]
    pred = probs.argmax(1)
    assert result.metrics["top1"] == pytest.approx(float(np.mean(pred == np.array(y))))
    losses = [-np.log(max(probs[i, t], 1e-12)) for i, t in enumerate(y)]  # probabilities clipped at 1e-12
    assert result.metrics["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-3)
    confusion = [[int(sum(1 for t, p in zip(y, pred) if t == a and p == b)) for b in range(2)] for a in range(2)]
    assert result.metrics["confusion"] == confusion
    written = {p["path"]: p for p in pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()}
    for i, (r, p) in enumerate(zip(rows, pred)):
        w = written[r["path"]]
        assert w["predicted"] == LABELS[p] and w["correct"] == (p == y[i])
        assert w["confidence"] == pytest.approx(probs[i].max(), rel=1e-4)
        assert w["loss"] == pytest.approx(losses[i], rel=1e-3, abs=1e-6)
    per_image = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(per_image) == len(rows) == result.metrics["count"]
    assert Image.open(tmp_path / "eval" / "confusion.png").size[0] > 60


def test_freeze_backbone_trains_the_classifier_only(tmp_path, manifest):
    from dinobatch.models.file import build_module

    torch.manual_seed(0)
    initial = build_module("resnet18", 2).state_dict()
    train(tiny_cfg(manifest, tmp_path / "m.pt", freeze_backbone=True, final_epochs=0))
    after = load_model(tmp_path / "m.pt").module.state_dict()
    assert torch.equal(after["conv1.weight"], initial["conv1.weight"])
    assert torch.equal(after["layer1.0.bn1.running_mean"], initial["layer1.0.bn1.running_mean"])
    assert not torch.equal(after["fc.weight"], initial["fc.weight"])


def test_no_val_split_and_a_last_batch_of_one_still_train(tmp_path, dataset):
    (dataset / "three.csv").write_text("path,label,split\nstegosaurus/01.png,stegosaurus,train\n"
                                       "stegosaurus/02.png,stegosaurus,train\ntriceratops/01.png,triceratops,train\n")
    result = train(tiny_cfg(dataset / "three.csv", tmp_path / "m.pt", batch_size=2, augment_level=0, final_epochs=0))
    assert result.metrics[0]["val_loss"] is None and result.calibration == {"temperature": 1.0}


def test_a_manifest_whose_images_are_gone_is_an_input_error(tmp_path, dataset):
    from dinobatch.errors import InputError

    (dataset / "gone.csv").write_text("path,label,split\nnope/1.png,a,train\nnope/2.png,b,train\n")
    with pytest.raises(InputError):
        train(tiny_cfg(dataset / "gone.csv", tmp_path / "m.pt"))


def test_near_duplicate_chains_stay_in_one_split():
    from dinobatch.training.manifest import _group_and_split

    rows, hashes = [], []
    for i in range(30):  # A~B and B~C, but A is not near C: all three must share a split
        base = (i * 0x9E3779B97F4A7C15) & (2**64 - 1)
        for name, ph in (("a", base), ("b", base ^ 0b1111), ("c", base ^ 0xFF0)):
            rows.append({"path": f"{i}/{name}", "label": "x", "sha256": f"{i}{name}", "status": "ok",
                         "width": 10, "height": 10})
            hashes.append((f"{ph:016x}", f"{0:016x}"))
    _group_and_split(rows, hashes, (0.6, 0.2, 0.2), 0, 8, 3)
    for i in range(30):
        assert len({r["split"] for r in rows if r["path"].startswith(f"{i}/")}) == 1


def test_evaluate_reports_photos_and_drawings_separately(tmp_path, dataset):
    csv_path = dataset / "mixed.csv"
    lines = ["path,label,split,kind"] + [f"{lab}/{i:02d}.png,{lab},test,{'drawing' if i % 2 else 'photo'}"
                                         for lab in LABELS for i in range(6)]
    csv_path.write_text("\n".join(lines) + "\n")
    model = tmp_path / "m.pt"
    table = build_manifest(dataset, fractions=(0.5, 0.25, 0.25), seed=3)
    train(tiny_cfg(write_manifest(table, tmp_path / "man.parquet", dataset), model, final_epochs=0))
    result = evaluate(str(csv_path), str(model), str(tmp_path / "eval"), split="test", workers=0)
    assert set(result.metrics["by_kind"]) == {"drawing", "photo"}
    assert result.metrics["by_kind"]["photo"]["count"] == 6


def test_sweep_records_every_trial_failures_included_and_resumes(tmp_path, manifest):
    base = tiny_cfg(manifest, tmp_path / "unused.pt", epochs=1, final_epochs=0)
    grid = {"lr": [0.05], "augment_level": [0, 1], "image_size": [32, 8]}  # image size 8: invalid
    rows = sweep(base, grid, tmp_path / "sweep")
    assert len(rows) == 4
    assert {r["status"] for r in rows if r["image_size"] == "8"} == {"error"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 and all(r["val_top1"] is not None and r["model"] for r in ok)
    assert pq.read_table(tmp_path / "sweep" / "trials.parquet").column_names == [
        "trial", "status", "error", "config", "model", "best_epoch", "val_loss", "val_top1", "val_top3",
        "val_macro_f1", "unreadable", "seconds", "augment_level", "image_size", "lr"]
    table = pq.read_table(tmp_path / "sweep" / "trials.parquet").to_pylist()
    assert [r["trial"] for r in table] == [r["trial"] for r in rows]
    again = sweep(base, grid, tmp_path / "sweep")
    assert [r["seconds"] for r in again if r["status"] == "ok"] == [r["seconds"] for r in ok]  # not rerun
    other_seed = sweep(dataclasses.replace(base, seed=7), {"lr": [0.05], "augment_level": [0], "image_size": [32]},
                       tmp_path / "sweep")
    assert other_seed[0]["trial"] not in {r["trial"] for r in rows}  # another configuration: another trial


def test_cli_manifest_train_print_config_and_evaluate(tmp_path, dataset):
    runner = CliRunner()
    out = runner.invoke(cli, ["manifest", str(dataset), "-o", str(tmp_path / "m.parquet"), "--split", "0.5,0.25,0.25"],
                        catch_exceptions=False)
    assert out.exit_code == 0 and "duplicate groups kept within one split" in out.output
    cfg = runner.invoke(cli, ["train", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "model.pt"), "--print-config"])
    resolved = json.loads(cfg.output)
    assert (resolved["batch_size"], resolved["lr"], resolved["epochs"], resolved["final_epochs"],
            resolved["augment_level"], resolved["arch"]) == (128, 0.01, 10, 1, 2, "resnet50")
    args = ["train", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "model.pt"), "--arch", "resnet18",
            "--pretrained", "none", "--epochs", "1", "--final-epochs", "0", "--image-size", "32", "-b", "8", "-j", "0",
            "--augment-level", "0"]
    trained = runner.invoke(cli, args, catch_exceptions=False)
    assert trained.exit_code == 0 and "epoch  1" in trained.output and "wrote" in trained.output
    ev = runner.invoke(cli, ["evaluate", str(tmp_path / "m.parquet"), "-m", str(tmp_path / "model.pt"), "-o",
                             str(tmp_path / "ev"), "-j", "0"], catch_exceptions=False)
    assert ev.exit_code == 0 and "top-1" in ev.output and "stegosaurus" in ev.output
