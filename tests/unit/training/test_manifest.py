"""Manifests: labels from folder names, splits without leaks, unreadable files described, CSV and Parquet loaded back."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
from PIL import Image

from dinobatch.errors import ConfigError, InputError
from dinobatch.schema import Col
from dinobatch.training.manifest import (
    assign_splits,
    build_manifest,
    describe_unreadable,
    label_folder,
    load_manifest,
    write_manifest,
)
from tests.helpers import jpeg_bytes, picture, save


@pytest.fixture
def dataset(tmp_path):
    """data/<label>/...: distinct pictures, a resized copy and an exact copy of one, an unreadable file."""
    root = tmp_path / "data"
    for i in range(8):
        save(picture(100 + i), root / "stego" / f"s{i}.png")
        save(picture(200 + i), root / "trike" / "deep" / f"t{i}.jpg", quality=90)
    big = save(picture(7, (320, 240)), root / "stego" / "big.png")
    save(picture(7, (320, 240)).resize((160, 120), Image.LANCZOS), root / "stego" / "small_copy.jpg", quality=90)
    (root / "stego" / "copy_of_big.png").write_bytes(big.read_bytes())
    (root / "trike" / "truncated.jpg").write_bytes(jpeg_bytes(picture(8))[:700])
    save(picture(9), root / "loose.png")  # directly in the folder: no label
    return root


def _by_path(table) -> dict[str, dict]:
    return {r[Col.PATH]: r for r in table.to_pylist()}


def test_labels_are_the_first_folder_and_unreadable_files_are_rows_with_a_reason(dataset):
    rows = _by_path(build_manifest(dataset))
    assert "loose.png" not in rows and len(rows) == 20
    assert {r[Col.LABEL] for r in rows.values()} == {"stego", "trike"}
    assert rows["trike/deep/t0.jpg"][Col.LABEL] == "trike"
    bad = rows["trike/truncated.jpg"]
    assert bad[Col.STATUS] == "error" and "truncated" in bad[Col.ERROR] and bad[Col.SPLIT] is None
    assert all(r[Col.STATUS] == "ok" and r[Col.SPLIT] in ("train", "val", "test")
               for p, r in rows.items() if p != "trike/truncated.jpg")


@pytest.mark.parametrize("seed", range(4))
def test_near_and_exact_duplicates_land_in_the_same_split(dataset, seed):
    rows = _by_path(build_manifest(dataset, seed=seed, fractions=(0.4, 0.3, 0.3)))
    copies = [rows[p] for p in ("stego/big.png", "stego/small_copy.jpg", "stego/copy_of_big.png")]
    assert len({r[Col.SPLIT] for r in copies}) == 1
    assert copies[0][Col.GROUP] is not None and len({r[Col.GROUP] for r in copies}) == 1
    assert [p for p, r in rows.items() if r[Col.GROUP] is not None] == [
        "stego/big.png", "stego/copy_of_big.png", "stego/small_copy.jpg"]


@pytest.mark.parametrize("seed", range(5))
def test_splits_follow_the_fractions_per_label_and_keep_groups_whole(seed):
    groups = [(i, "a", 1) for i in range(20)] + [(20, "a", 5)] + [(100 + i, "b", 1) for i in range(10)]
    groups += [(200, "c", 8), (201, "c", 1), (202, "c", 1)]  # a big group is placed first, so c still gets 8/1/1
    splits = assign_splits(groups, (0.8, 0.1, 0.1), seed=seed)
    files = Counter()
    for gid, label, size in groups:
        files[label, splits[gid]] += size
    assert [files["a", s] for s in ("train", "val", "test")] in ([20, 3, 2], [20, 2, 3])
    assert [files["b", s] for s in ("train", "val", "test")] == [8, 1, 1]
    assert [files["c", s] for s in ("train", "val", "test")] == [8, 1, 1]
    assert assign_splits(groups, (0.8, 0.1, 0.1), seed=seed) == splits  # the same seed, the same splits


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.9, 0.2, -0.1), (0.5, 0.3, 0.3)])
def test_split_fractions_must_be_three_shares_of_the_whole(tmp_path, fractions):
    with pytest.raises(ConfigError, match="three non-negative numbers summing to 1"):
        build_manifest(tmp_path, fractions=fractions)


def test_unreadable_files_are_described_by_name_a_few_at_a_time():
    failed = {f"{c}.jpg": "truncated" for c in "edcba"}
    assert describe_unreadable(failed) == ("5 images could not be read: a.jpg (truncated); b.jpg (truncated); "
                                           "c.jpg (truncated); and 2 more")
    assert describe_unreadable({"x.png": "empty file"}, noun="file") == "1 file could not be read: x.png (empty file)"


@pytest.mark.parametrize("label, folder", [("stego", "stego"), ("..", "label_.."), ("a/b", "a_b"), ("", "label_")])
def test_a_label_becomes_one_folder_that_stays_inside(label, folder):
    assert label_folder(label) == folder


def test_a_written_manifest_loads_back_even_after_it_moves_with_its_data(dataset, tmp_path):
    table = build_manifest(dataset)
    write_manifest(table, dataset / "manifest.parquet", dataset)
    moved = tmp_path / "elsewhere"
    shutil.move(dataset, moved)
    loaded = load_manifest(moved / "manifest.parquet")
    assert loaded.root == moved and loaded.labels() == ("stego", "trike")
    assert len(loaded.rows()) == 19 and all(r[Col.STATUS] == "ok" for r in loaded.rows())
    first = loaded.rows("train")[0]
    assert (moved / first[Col.PATH]).is_file() and loaded.abspath(first) == str(moved / first[Col.PATH])


def test_a_csv_manifest_keeps_given_splits_and_names_its_bad_lines(dataset):
    csv = dataset / "m.csv"
    csv.write_text("path,label,split\nstego/s0.png,stego,test\nstego/s1.png,stego,\ntrike/truncated.jpg,trike,\n")
    rows = _by_path(load_manifest(csv).table)
    assert rows["stego/s0.png"][Col.SPLIT] == "test" and rows["stego/s1.png"][Col.SPLIT] in ("train", "val", "test")
    assert rows["trike/truncated.jpg"][Col.STATUS] == "error" and rows["trike/truncated.jpg"][Col.SPLIT] is None
    csv.write_text("path,label,split\nstego/s0.png,stego,holdout\n")
    with pytest.raises(InputError, match="line 2: split must be one of train, val, test"):
        load_manifest(csv)
    csv.write_text("file,label\nstego/s0.png,stego\n")
    with pytest.raises(InputError, match="needs columns path,label"):
        load_manifest(csv)
