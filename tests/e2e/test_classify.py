"""Whole classify runs with a tiny random model on generated folders."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from dinobatch.jobs.classify import classify
from dinobatch.config import ClassifyConfig
from dinobatch.models.file import file_sha256
from dinobatch.schema import read_metadata
from PIL import Image

from tests.helpers import LABELS, picture, save, tree_digest
from tests.helpers import run_classify as run


def test_one_row_per_file_with_errors_and_duplicates_where_they_belong(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    summary, rows = run(root, tmp_path / "out", tiny_model)
    assert set(rows) == {"a.jpg", "b.png", "sub/c.webp", "sub/d.gif", "e.bmp", "f.tiff", "big.png",
                         "small_copy.jpg", "copy_of_a.jpg", "truncated.jpg", "notes.txt", "empty.png",
                         "cmyk.jpg", "transparent.png", "rotated.jpg"}
    assert rows["truncated.jpg"]["status"] == "error" and "truncated" in rows["truncated.jpg"]["error"]
    assert rows["notes.txt"]["status"] == "error" and "not an image" in rows["notes.txt"]["error"]
    assert rows["empty.png"]["status"] == "error" and "empty" in rows["empty.png"]["error"]
    exact = rows["copy_of_a.jpg"]
    assert (exact["status"], exact["duplicate_of"], exact["duplicate_kind"]) == ("duplicate", "a.jpg", "exact")
    near = rows["small_copy.jpg"]
    assert (near["status"], near["duplicate_of"], near["duplicate_kind"]) == ("duplicate", "big.png", "near")
    assert near["probs"] == rows["big.png"]["probs"] and near["label"] == rows["big.png"]["label"]
    assert near["width"] == 160 and rows["big.png"]["width"] == 320  # facts stay the file's own
    for path in ("b.png", "sub/c.webp", "sub/d.gif", "e.bmp", "f.tiff", "cmyk.jpg", "transparent.png"):
        assert rows[path]["status"] == "ok" and rows[path]["duplicate_of"] is None
    assert (rows["cmyk.jpg"]["mode"], rows["transparent.png"]["mode"]) == ("CMYK", "RGBA")
    rotated = rows["rotated.jpg"]
    assert (rotated["status"], rotated["width"], rotated["height"]) == ("ok", 100, 200)
    assert summary.counts == {"ok": 10, "duplicate": 2, "error": 3}
    assert summary.duplicate_groups == 2


def test_prediction_columns_are_consistent(tmp_path, inbox, tiny_model):
    _, rows = run(inbox["a.jpg"].parent, tmp_path / "out", tiny_model, top_k=2)
    for row in rows.values():
        if row["status"] == "error":
            assert row["label"] is None and row["probs"] is None
            continue
        probs = row["probs"]
        assert len(probs) == len(LABELS) and math.isclose(sum(probs), 1.0, rel_tol=1e-5)
        best = max(range(len(probs)), key=probs.__getitem__)
        assert row["label"] == LABELS[best] == row["topk_labels"][0]
        assert row["confidence"] == pytest.approx(probs[best])
        assert len(row["topk_labels"]) == 2 and row["topk_probs"] == sorted(row["topk_probs"], reverse=True)
        assert row["margin"] == pytest.approx(row["topk_probs"][0] - row["topk_probs"][1], abs=1e-6)
        assert row["entropy"] == pytest.approx(-sum(p * math.log(p) for p in probs if p > 0), rel=1e-4)
        assert row["species_common_name"] is not None and row["species_period"] is not None
        assert len(row["sha256"]) == 64 and len(row["phash"]) == 16 and len(row["dhash"]) == 16


def test_metadata_names_model_and_labels_and_dataset_reads_as_one(tmp_path, inbox, tiny_model):
    out = tmp_path / "out"
    summary, _ = run(inbox["a.jpg"].parent, out, tiny_model)
    meta = read_metadata(pq.read_schema(summary.rows_file))
    assert meta["model_fingerprint"] == file_sha256(tiny_model)
    assert meta["labels"] == list(LABELS) and meta["schema_version"] == "3" and meta["version"]
    run(inbox["a.jpg"].parent, out, tiny_model)
    table = pq.read_table(out)  # every run's rows; _summary.json and _cache/ are not in the way
    assert table.num_rows == 30 and len(set(table["run_id"].to_pylist())) == 2
    latest = json.loads((out / "_summary.json").read_text())
    assert latest["counts"]["error"] == 3 and latest["config"]["batch_size"] == 4


def test_second_run_infers_nothing_and_new_files_only_themselves(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    first, rows1 = run(root, out, tiny_model)
    assert first.inferred == 12 - 1  # twelve readable files, one an exact copy
    second, rows2 = run(root, out, tiny_model)
    assert (second.inferred, second.reused) == (0, 11)
    assert {p: r["probs"] for p, r in rows1.items()} == {p: r["probs"] for p, r in rows2.items()}
    save(picture(20), root / "new1.png")
    save(picture(21), root / "new2.png")
    third, _ = run(root, out, tiny_model)
    assert third.inferred == 2
    forced, _ = run(root, out, tiny_model, force=True)
    assert forced.inferred == 13


def test_changed_bytes_are_inferred_again(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    run(root, out, tiny_model)
    save(picture(30), root / "b.png")
    summary, rows = run(root, out, tiny_model)
    assert summary.inferred == 1 and rows["b.png"]["status"] == "ok"


def test_interrupted_run_keeps_finished_batches(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    cfg = ClassifyConfig(folder=str(root), out=str(out), model=str(tiny_model), workers=0, batch_size=2)

    def stop_after_two_batches(stage, done, total):
        if stage == "infer" and done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        classify(cfg, stop_after_two_batches)
    assert not list(out.glob("*.parquet"))  # no half-written rows file
    summary = classify(cfg)
    assert summary.inferred == 11 - 4 and summary.reused == 4


def test_input_folder_is_left_byte_identical(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    before = tree_digest(root)
    run(root, tmp_path / "out", tiny_model, embeddings=True)
    assert tree_digest(root) == before


def test_worker_processes_give_the_same_predictions(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    _, serial = run(root, tmp_path / "o1", tiny_model, workers=0)
    _, parallel = run(root, tmp_path / "o2", tiny_model, workers=2)
    assert {p: r["label"] for p, r in serial.items()} == {p: r["label"] for p, r in parallel.items()}
    for p, r in serial.items():
        if r["probs"]:
            assert parallel[p]["probs"] == pytest.approx(r["probs"], abs=1e-5)


def test_embeddings_on_request_and_backfilled_for_cached_files(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    _, rows = run(root, out, tiny_model)
    assert all(r["embedding"] is None for r in rows.values())
    summary, rows = run(root, out, tiny_model, embeddings=True)
    assert summary.inferred == 11  # cached predictions had no embeddings
    assert len(rows["b.png"]["embedding"]) == 512  # resnet18's penultimate width
    assert rows["notes.txt"]["embedding"] is None


def test_a_folder_with_no_images_still_writes_rows_and_summary(tmp_path, tiny_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")
    summary, rows = run(tmp_path / "in", tmp_path / "out", tiny_model)
    assert summary.counts == {"ok": 0, "duplicate": 0, "error": 1} and list(rows) == ["readme.txt"]
    (tmp_path / "empty").mkdir()
    summary, rows = run(tmp_path / "empty", tmp_path / "out2", tiny_model)
    assert summary.files == 0 and rows == {}


def test_top_k_applies_to_cached_predictions_too(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    run(root, out, tiny_model, top_k=1)
    summary, rows = run(root, out, tiny_model, top_k=3)
    assert summary.inferred == 0 and len(rows["b.png"]["topk_labels"]) == 3


def test_embeddings_are_null_unless_asked_and_never_lost_by_a_forced_run(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    run(root, out, tiny_model, embeddings=True)
    _, rows = run(root, out, tiny_model)
    assert rows["b.png"]["embedding"] is None  # not asked for this time
    run(root, out, tiny_model, force=True)  # newer predictions, without embeddings
    summary, rows = run(root, out, tiny_model, embeddings=True)
    assert summary.inferred == 0 and len(rows["b.png"]["embedding"]) == 512


def test_names_that_only_look_alike_stay_two_rows(tmp_path, tiny_model):
    import os

    root = tmp_path / "in"
    root.mkdir()
    with open(os.fsencode(str(root)) + b"/caf\xe9.png", "wb") as fh:
        picture(1).save(fh, "PNG")
    save(picture(2), root / "caf\\xe9.png")  # a real backslash in the name
    _, rows = run(root, tmp_path / "out", tiny_model)
    assert sorted(rows) == ["caf\\\\xe9.png", "caf\\xe9.png"]
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_a_copy_changed_during_the_run_does_not_fail_its_untouched_twin(tmp_path, tiny_model):
    root = tmp_path / "in"
    save(picture(1), root / "a.png")
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    cfg = ClassifyConfig(folder=str(root), out=str(tmp_path / "out"), model=str(tiny_model), workers=0)

    def rewrite_a_after_hashing(stage, done, total):
        if stage == "fingerprint" and done == total:
            save(picture(2), root / "a.png")

    summary = classify(cfg, rewrite_a_after_hashing)
    rows = {r["path"]: r for r in pq.read_table(summary.rows_file).to_pylist()}
    assert rows["b.png"]["status"] == "ok" and rows["b.png"]["label"] is not None
    assert rows["a.png"]["status"] == "error" and "changed" in rows["a.png"]["error"]
    again = classify(cfg)
    assert again.counts == {"ok": 2, "duplicate": 0, "error": 0}


def test_special_and_hostile_files_are_rows_with_reasons(tmp_path, tiny_model):
    import os

    root = tmp_path / "in"
    save(picture(1), root / "good.png")
    os.mkfifo(root / "pipe.jpg")
    os.symlink(root / "missing.png", root / "dangling.png")
    save(Image.new("RGB", (200_000, 1), (0, 0, 255)), root / "strip.png")
    _, rows = run(root, tmp_path / "out", tiny_model)
    assert rows["good.png"]["status"] == "ok" and rows["strip.png"]["status"] == "ok"
    assert "FIFO" in rows["pipe.jpg"]["error"] and "broken symbolic link" in rows["dangling.png"]["error"]


def test_the_saved_config_records_the_batch_size_the_rule_chose(tmp_path, inbox, tiny_model):
    from dinobatch.runtime.device import CPU_BATCH_SIZE

    out = tmp_path / "out"
    summary, _ = run(inbox["a.jpg"].parent, out, tiny_model, batch_size=None, device="cpu")
    saved = json.loads((out / "_summary.json").read_text())["config"]
    # the size that ran, so that the saved config reruns the same batches; workers as asked (0)
    assert saved["batch_size"] == summary.config["batch_size"] == CPU_BATCH_SIZE
    assert saved["workers"] == 0
    run(inbox["a.jpg"].parent, out, tiny_model, batch_size=None, device="cpu")  # nothing new to infer
    assert json.loads((out / "_summary.json").read_text())["config"]["batch_size"] == CPU_BATCH_SIZE


def test_the_saved_config_records_the_device_and_precision_that_ran_and_reruns_the_same(tmp_path, inbox, tiny_model):
    root = inbox["a.jpg"].parent
    first, rows = run(root, tmp_path / "out", tiny_model)  # device and precision left to "auto"
    saved = json.loads((tmp_path / "out" / "_summary.json").read_text())["config"]
    assert (saved["device"], saved["precision"]) == ("cpu", "fp32")  # this machine has no GPU
    # the saved configuration is valid input, and it reruns the same run
    given = {k: v for k, v in saved.items() if k not in ("folder", "out", "model", "species")}
    again, rerun = run(root, tmp_path / "out", tiny_model, **{**given, "force": True})
    assert again.inferred == first.inferred and again.config == {**first.config, "force": True}
    assert {p: r["probs"] for p, r in rerun.items()} == {p: r["probs"] for p, r in rows.items()}
