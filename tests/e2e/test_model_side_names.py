"""Manifests carry the exact bytes of every name, and no command drops a manifest row without a word.

The pictures are named with bytes that are not UTF-8 and with a backslash: names that `path` can
only show escaped (\\xNN, a doubled backslash), so a reader that opens `path` finds nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dinobatch.training.augment import materialize
from dinobatch.cli.main import cli
from dinobatch.config import TrainConfig
from dinobatch.training.evaluate import evaluate
from dinobatch.training.manifest import build_manifest, load_manifest, write_manifest
from dinobatch.io.walk import display_path
from dinobatch.training.train import train
from tests.helpers import picture, save

LABELS = ("stegosaurus", "triceratops")  # both known to the tiny_model fixture
ODD = (b"caf\xe9.png", b"back\\slash.png")  # not UTF-8; a backslash, which the shown path doubles
# every label: 00-02 and the undecodable name train, 03 and the backslash name val, 04-05 test
_SPLIT = {b"00.png": "train", b"01.png": "train", b"02.png": "train", ODD[0]: "train",
          b"03.png": "val", ODD[1]: "val", b"04.png": "test", b"05.png": "test"}


def _exact(root: Path, rel: bytes) -> bytes:
    return os.path.join(os.fsencode(root), rel)


@pytest.fixture
def odd_dataset(tmp_path) -> Path:
    """Two labels, eight pictures each, two of every eight with names that must be escaped to be shown."""
    root = tmp_path / "data"
    for li, label in enumerate(LABELS):
        os.makedirs(root / label)
        for i, name in enumerate(_SPLIT):
            img = picture(700 + 10 * li + i, (64, 48))
            if li:  # learnable classes: a bright bar on every triceratops
                img.paste((255, 255, 0), (0, 0, 64, 8))
            with open(_exact(root, label.encode() + b"/" + name), "wb") as fh:
                img.save(fh, "PNG")
    return root


@pytest.fixture
def odd_manifest(tmp_path, odd_dataset) -> Path:
    """The dataset's manifest with the splits of _SPLIT, so odd names sit in every split."""
    table = build_manifest(odd_dataset, seed=1)
    rows = table.to_pylist()
    by_shown = {display_path(os.fsdecode(name)): split for name, split in _SPLIT.items()}
    for r in rows:
        r["split"], r["group"] = by_shown[r["path"].rsplit("/", 1)[1]], None
    return write_manifest(pa.Table.from_pylist(rows, schema=table.schema), odd_dataset.parent / "manifest.parquet",
                          odd_dataset)


def _cfg(manifest, out, **kw) -> TrainConfig:
    base = dict(manifest=str(manifest), out=str(out), arch="resnet18", pretrained="none", epochs=1, final_epochs=0,
                batch_size=8, augment_level=1, image_size=32, workers=0, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_the_manifest_records_the_exact_bytes_of_every_name(odd_dataset, odd_manifest):
    rows = pq.read_table(odd_manifest).to_pylist()
    assert len(rows) == 16 and {r["status"] for r in rows} == {"ok"}
    assert {r["path_bytes"] for r in rows if r["path_bytes"]} == {f"{lab}/".encode() + n for lab in LABELS for n in ODD}
    assert len({r["path"] for r in rows}) == 16  # the shown names stay one-to-one
    m = load_manifest(odd_manifest)
    assert all(os.path.isfile(m.abspath(r)) for r in m.rows())


def test_a_csv_manifest_naming_a_file_with_a_backslash_opens_that_file(odd_dataset):
    (odd_dataset / "list.csv").write_text("path,label,split\nstegosaurus/back\\slash.png,stegosaurus,train\n"
                                          "triceratops/00.png,triceratops,train\n", encoding="utf-8")
    m = load_manifest(odd_dataset / "list.csv")
    assert len(m.rows()) == 2 and [r["path_bytes"] for r in m.rows()] == [b"stegosaurus/back\\slash.png", None]
    assert open(m.abspath(m.rows()[0]), "rb").read() == (odd_dataset / "stegosaurus" / "back\\slash.png").read_bytes()


def test_evaluate_scores_every_row_whatever_its_name(tmp_path, odd_manifest, tiny_model):
    result = evaluate(str(odd_manifest), str(tiny_model), str(tmp_path / "eval"), split=None, workers=0)
    assert result.metrics["count"] == 16 and result.metrics["failed"] == 0
    written = pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()
    assert len(written) == 16 and all(r["predicted"] and r["error"] is None for r in written)
    assert {r["path_bytes"] for r in written if r["path_bytes"]} == {f"{lab}/".encode() + n for lab in LABELS
                                                                     for n in ODD}
    shown = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(shown) == 16


def test_augment_makes_variants_of_every_row_and_passes_odd_names_through(tmp_path, odd_manifest):
    m = load_manifest(odd_manifest)
    result = materialize(m, 1, tmp_path / "aug", splits=("train",))
    assert result.unreadable == {}
    table = result.table
    write_manifest(table, tmp_path / "aug" / "manifest.parquet", tmp_path / "aug")
    rows = table.to_pylist()
    variants = [r for r in rows if r["source"]]
    assert len(variants) == 2 * len(m.rows("train")) == 16
    assert {r["source"] for r in variants} >= {f"{lab}/caf\\xe9.png" for lab in LABELS}
    augmented = load_manifest(tmp_path / "aug" / "manifest.parquet")
    passed = [r for r in augmented.rows() if r["split"] != "train"]
    assert len(passed) == 8 and sum(1 for r in passed if r["path_bytes"]) == 2  # the backslash names, in val
    for r in augmented.rows():
        assert os.path.isfile(augmented.abspath(r)), r["path"]


def test_training_reads_every_row_whatever_its_name(tmp_path, odd_manifest):
    result = train(_cfg(odd_manifest, tmp_path / "m.pt"))
    epoch = result.metrics[0]
    assert (epoch["train_samples"], epoch["val_images"], epoch["unreadable"]) == (2 * 8, 4, 0)
    assert result.unreadable == {}


def test_an_old_manifest_without_path_bytes_still_finds_its_files(tmp_path, odd_dataset, odd_manifest, tiny_model):
    table = pq.read_table(odd_manifest)
    old = table.drop_columns(["path_bytes"])  # written before the column: names shown escaped
    write_manifest(old, tmp_path / "old.parquet", odd_dataset)
    m = load_manifest(tmp_path / "old.parquet")
    assert len(m.rows()) == 16 and all(os.path.isfile(m.abspath(r)) for r in m.rows())
    result = evaluate(str(tmp_path / "old.parquet"), str(tiny_model), str(tmp_path / "eval"), split=None, workers=0)
    assert result.metrics["count"] == 16 and result.metrics["failed"] == 0
    # the first manifests wrote a backslash as it is (and other bytes as \\xNN): those still open too
    rows = old.to_pylist()
    for r in rows:
        r["path"] = r["path"].replace("\\\\", "\\")
    write_manifest(pa.Table.from_pylist(rows, schema=old.schema), tmp_path / "older.parquet", odd_dataset)
    m = load_manifest(tmp_path / "older.parquet")
    assert len(m.rows()) == 16 and all(os.path.isfile(m.abspath(r)) for r in m.rows())


def _remove_one(dataset: Path) -> bytes:
    gone = b"stegosaurus/" + ODD[1]
    os.remove(_exact(dataset, gone))
    return gone


def test_evaluate_counts_and_names_a_file_that_is_gone(tmp_path, odd_dataset, odd_manifest, tiny_model):
    _remove_one(odd_dataset)
    out = CliRunner().invoke(cli, ["evaluate", str(odd_manifest), "-m", str(tiny_model), "--split", "all", "-o",
                                   str(tmp_path / "eval"), "-j", "0"], catch_exceptions=False)
    assert out.exit_code == 0
    assert "1 image could not be read" in out.output and "stegosaurus/back\\\\slash.png" in out.output
    written = {r["path"]: r for r in pq.read_table(tmp_path / "eval" / "predictions.parquet").to_pylist()}
    assert len(written) == 16 and "cannot read file" in written["stegosaurus/back\\\\slash.png"]["error"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["count"] == 15


def test_augment_counts_and_names_a_file_that_is_gone(tmp_path, odd_dataset, odd_manifest):
    os.remove(_exact(odd_dataset, b"triceratops/" + ODD[0]))
    out = CliRunner().invoke(cli, ["augment", str(odd_manifest), "--level", "1", "-o", str(tmp_path / "aug")],
                             catch_exceptions=False)
    assert out.exit_code == 0
    assert "1 original could not be read" in out.output and "triceratops/caf\\xe9.png" in out.output
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "aug" / "manifest.parquet").to_pylist()}
    gone = [r for r in rows.values() if r["status"] == "error"]
    assert len(gone) == 1 and gone[0]["split"] is None and "cannot read file" in gone[0]["error"]
    assert sum(1 for r in rows.values() if r["source"]) == 2 * 7  # the other train originals, x2


def test_train_counts_and_names_a_file_that_is_gone(tmp_path, odd_dataset, odd_manifest):
    _remove_one(odd_dataset)
    args = ["train", str(odd_manifest), "-o", str(tmp_path / "m.pt"), "--arch", "resnet18", "--pretrained", "none",
            "--epochs", "1", "--final-epochs", "0", "--image-size", "32", "-b", "8", "-j", "0", "--augment-level", "0"]
    out = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert out.exit_code == 0
    assert "1 image could not be read" in out.output and "stegosaurus/back\\\\slash.png" in out.output
    line = json.loads((tmp_path / "m.pt.metrics.jsonl").read_text().splitlines()[0])
    assert (line["train_samples"], line["val_images"], line["unreadable"]) == (8, 3, 1)
    from dinobatch.models.file import load_model

    assert load_model(tmp_path / "m.pt").spec.source["unreadable"] == {"count": 1,
                                                                       "first": ["stegosaurus/back\\\\slash.png"]}


def test_a_dataset_folder_whose_own_name_is_not_utf8_makes_a_manifest_that_loads(tmp_path):
    root = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"donn\xe9es"))
    for li, label in enumerate(LABELS):
        for i in range(2):
            save(picture(800 + 10 * li + i, (64, 48)), Path(root) / label / f"{i}.png")
    path = write_manifest(build_manifest(root, seed=0), tmp_path / "manifest.parquet", root)
    m = load_manifest(path)
    assert len(m.rows()) == 4 and all(os.path.isfile(m.abspath(r)) for r in m.rows())


def test_similar_embeds_every_reference_image_and_caches_only_a_complete_set(tmp_path, odd_dataset, odd_manifest,
                                                                             tiny_model, caplog):
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.models.file import resolve_model
    from dinobatch.curation.similar import reference_embeddings

    model, runtime = resolve_model(str(tiny_model)), resolve_runtime("cpu", "auto")
    _, _, paths = reference_embeddings(str(odd_manifest), model, runtime, cache_dir=tmp_path / "cache")
    assert len(paths) == 16 and len(list((tmp_path / "cache").iterdir())) == 1
    _remove_one(odd_dataset)
    _, _, paths = reference_embeddings(str(odd_manifest), model, runtime, cache_dir=tmp_path / "fresh")
    assert len(paths) == 15 and "1 reference image could not be read" in caplog.text
    assert not (tmp_path / "fresh").exists()  # an incomplete set is not cached: the next run tries again


def test_curate_gives_an_odd_named_file_its_own_manifest_label_not_its_copys(tmp_path, odd_dataset, tiny_model):
    import shutil

    from dinobatch.jobs.classify import ClassifyConfig, classify
    from dinobatch.curation.curate import CurateConfig, curate

    # the same bytes as triceratops/caf\xe9.png, listed first and labelled stegosaurus
    shutil.copyfile(_exact(odd_dataset, b"triceratops/" + ODD[0]), _exact(odd_dataset, b"stegosaurus/copy.png"))
    manifest = write_manifest(build_manifest(odd_dataset, seed=1), tmp_path / "m.parquet", odd_dataset)
    classify(ClassifyConfig(folder=str(odd_dataset), out=str(tmp_path / "res"), model=str(tiny_model), workers=0))
    result = curate(CurateConfig(predictions=str(tmp_path / "res"), out=str(tmp_path / "q"), manifest=str(manifest)))
    (group,) = [g for g in result.groups if any(m["path"] == "stegosaurus/copy.png" for m in g)]
    assert {m["path"]: m["label"] for m in group} == {"stegosaurus/copy.png": "stegosaurus",
                                                      "triceratops/caf\\xe9.png": "triceratops"}
