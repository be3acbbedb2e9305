"""Runs over the real files in ../shared/data (third-party images read in place, never copied)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinobatch.jobs.classify import classify
from dinobatch.config import ClassifyConfig
from dinobatch.dedupe.groups import DedupeItem, group_duplicates
from dinobatch.imaging.decode import decode
from dinobatch.io.walk import read_bytes, sha256_file
from tests.helpers import SHARED_DATA, tree_digest

WEIRD = SHARED_DATA / "weird"
DINOS = SHARED_DATA / "dinos"
needs_weird = pytest.mark.skipif(not WEIRD.is_dir(), reason=f"real test files not present at {WEIRD}")
needs_dinos = pytest.mark.skipif(not DINOS.is_dir(), reason=f"real dinosaur images not present at {DINOS}")


@needs_weird
def test_every_awkward_file_gets_exactly_one_row_and_nothing_crashes(tmp_path, tiny_model):
    before = tree_digest(WEIRD)
    summary = classify(ClassifyConfig(folder=str(WEIRD), out=str(tmp_path / "out"), model=str(tiny_model),
                                      workers=1, batch_size=16))
    rows = pq.read_table(summary.rows_file).to_pylist()
    on_disk = sorted(p.name for p in WEIRD.iterdir() if not p.name.startswith("."))
    assert sorted(r["path"] for r in rows) == on_disk
    by_path = {r["path"]: r for r in rows}
    with open(WEIRD / "INDEX.tsv", newline="") as fh:
        index = list(csv.DictReader(fh, delimiter="\t"))
    for entry in index:
        row = by_path[entry["filename"]]
        if entry["open_and_load_ok"] == "no":
            assert row["status"] == "error" and row["error"], entry["filename"]
        if row["status"] == "error":
            assert row["label"] is None
        else:
            assert row["label"] is not None and row["width"] > 0
    for bomb in ("reallybig.bmp", "decompression_bomb.ico", "badwidth.bmp"):
        assert "decompression bomb" in by_path[bomb]["error"]
    assert tree_digest(WEIRD) == before


def _item(path: Path) -> DedupeItem:
    dec = decode(read_bytes(str(path)))
    return DedupeItem(str(path.relative_to(DINOS)), sha256_file(str(path)), int(dec.phash, 16),
                      int(dec.dhash, 16), dec.width * dec.height)


@needs_dinos
def test_lookalike_renders_of_two_species_are_not_grouped_but_real_copies_are():
    names = ["corythosaurus/Corythosaurus_146.jpg", "parasaurolophus/Parasaurolophus_53.jpg",
             "triceratops/Triceratops_2.jpg", "triceratops/Triceratops_5.jpg",
             "ankylosaurus/Ankylosaurus_141.jpg", "ankylosaurus/Ankylosaurus_148.jpg"]
    if not all((DINOS / n).is_file() for n in names):
        pytest.skip("the known pairs are not in this copy of the data")
    groups = {a.path: a for a in group_duplicates([_item(DINOS / n) for n in names])}
    assert "corythosaurus/Corythosaurus_146.jpg" not in groups
    assert "parasaurolophus/Parasaurolophus_53.jpg" not in groups
    assert {groups[n].group for n in names[2:4]} == {groups[names[2]].group}
    assert {groups[n].group for n in names[4:6]} == {groups[names[4]].group}


@needs_dinos
def test_real_manifest_keeps_every_duplicate_group_in_one_split_and_stratifies():
    from dinobatch.training.manifest import build_manifest

    rows = build_manifest(DINOS, seed=0).to_pylist()
    groups: dict[int, set[str]] = {}
    for r in rows:
        if r["group"] is not None:
            groups.setdefault(r["group"], set()).add(r["split"])
    assert groups and all(len(splits) == 1 for splits in groups.values())
    for label in {r["label"] for r in rows}:
        n = {s: sum(1 for r in rows if r["label"] == label and r["split"] == s) for s in ("train", "val", "test")}
        assert n["val"] >= 2 and n["test"] >= 2 and n["train"] >= n["val"] + n["test"]
