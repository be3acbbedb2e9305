"""audit: which leftovers a relabel may delete, what a spreadsheet sees, and records it cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dinobatch.curation.audit import RECORD_KEY, Family, record_of
from dinobatch.io.terminal import spreadsheet_safe


def test_leftovers_of_one_family_only_are_removed(tmp_path):
    ours = [".m.v2.parquet.ab12cd34.tmp", "..m.v3.parquet.ab12cd34.tmp.x_9yz123.tmp", ".m.audit.csv.k2j4h5g6.tmp"]
    theirs = [".m.x.v2.parquet.ab12cd34.tmp", ".mm.v2.parquet.ab12cd34.tmp", ".m.v2.parquet.lock",
              "m.v2.parquet", ".lock", ".n.audit.csv.k2j4h5g6.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    Family.of(tmp_path / "m.v2.parquet").remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_a_named_output_elsewhere_has_its_leftovers_removed_too(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".final.parquet.ab12cd34.tmp").write_text("x")
    (tmp_path / "out" / ".other.parquet.ab12cd34.tmp").write_text("x")
    Family.of(tmp_path / "m.parquet").remove_leftovers(tmp_path / "out" / "final.parquet")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".other.parquet.ab12cd34.tmp"]


def test_family_versions_and_the_next_one(tmp_path):
    family = Family.of(tmp_path / "m.v12.parquet")
    assert (family.stem, family.lock.name, family.log.name) == ("m", ".m.lock", "m.audit.csv")
    assert Family.of(Path("/x/labels.csv")).stem == "labels"
    for name in ("m.v3.parquet", "m.v10.parquet", "m.v2.parquet", "m.vx.parquet", "mm.v4.parquet"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in family.versions()] == ["m.v2.parquet", "m.v3.parquet", "m.v10.parquet"]
    assert family.next_version(tmp_path / "m.parquet").name == "m.v4.parquet"
    assert family.next_version(tmp_path / "m.v10.parquet").name == "m.v11.parquet"


def test_formula_cells_get_a_quote_and_text_does_not():
    assert [spreadsheet_safe(v) for v in ("=1+1", "+1", "-x", "@SUM(A1)", "\tx", "a=b", "tri-ceratops", "")] == [
        "'=1+1", "'+1", "'-x", "'@SUM(A1)", "'\tx", "a=b", "tri-ceratops", ""]


def test_a_record_that_cannot_be_read_is_ignored_not_a_crash(tmp_path):
    table = pa.table({"path": ["a.png"]})
    for n, raw in enumerate([b"{not json", json.dumps({"format": 1, "changes": [["a"]]}).encode(),
                             json.dumps({"format": 99}).encode(), json.dumps([1, 2]).encode()]):
        pq.write_table(table.replace_schema_metadata({RECORD_KEY: raw}), tmp_path / f"{n}.parquet")
        assert record_of(tmp_path / f"{n}.parquet") is None
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    assert record_of(tmp_path / "garbage.parquet") is None
