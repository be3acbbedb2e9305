"""The output folder (ResultsDir): rows per run, the content cache and its compaction, leftovers of killed runs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinobatch.errors import InputError
from dinobatch.schema import Col, cache_schema, file_index_schema, row_schema, schema_metadata
from dinobatch.store.results import COMPACT_PARTS, ResultsDir
from dinobatch.store.runs import current_rows, latest_run

LABELS = ["a", "b"]


def _meta(fingerprint: str) -> dict[bytes, bytes]:
    return schema_metadata(version="test", model_name=f"model-{fingerprint}", model_fingerprint=fingerprint,
                           labels=LABELS, folder="/photos")


def _run_id(second: int) -> str:
    return f"20261204T0300{second:02d}.000000Z-{second:04x}"


def _rows(run_id: str, paths: list[str], label: str) -> pa.RecordBatch:
    rows = [{Col.RUN_ID: run_id, Col.PATH: p, Col.STATUS: "ok", Col.LABEL: label} for p in paths]
    return pa.RecordBatch.from_pylist(rows, schema=row_schema())


def _write_run(out: ResultsDir, second: int, fingerprint: str, paths: list[str], label: str) -> str:
    run_id = _run_id(second)
    schema = row_schema(_meta(fingerprint))
    out.write_rows(run_id, [_rows(run_id, paths, label).replace_schema_metadata(schema.metadata)], schema)
    return run_id


def _cached(sha: str, label: str, *, embedding: bool = False) -> dict:
    return {Col.SHA256: sha, Col.WIDTH: 8, Col.HEIGHT: 8, Col.LABEL: label, Col.CONFIDENCE: 0.9,
            Col.PROBS: [0.9, 0.1], Col.EMBEDDING: [1.0, 2.0] if embedding else None}


def _labels(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column(Col.SHA256).to_pylist(), table.column(Col.LABEL).to_pylist()))


@pytest.fixture
def out(tmp_path) -> ResultsDir:
    folder = ResultsDir(tmp_path / "results")
    folder.ensure()
    return folder


def test_current_rows_are_each_models_newest_run(out):
    _write_run(out, 1, "f1", ["x.jpg", "y.jpg"], "a")
    newest = _write_run(out, 2, "f1", ["x.jpg"], "b")  # y.jpg was deleted since
    _write_run(out, 3, "f2", ["x.jpg"], "a")  # another model's run does not replace f1's
    rows = current_rows(out.path).to_pylist()
    assert sorted((r[Col.RUN_ID], r[Col.PATH], r[Col.LABEL]) for r in rows) == [
        (newest, "x.jpg", "b"), (_run_id(3), "x.jpg", "a")]
    assert current_rows(out.path, model="f1").column(Col.RUN_ID).to_pylist() == [newest]


def test_files_that_are_not_complete_runs_are_not_rows(out):
    _write_run(out, 1, "f1", ["x.jpg"], "a")
    pq.write_table(pa.table({"path": ["mine.jpg"]}), out.path / "export.parquet")  # the user's own file
    (out.path / f".{_run_id(2)}.parquet.1234.tmp").write_bytes(b"PAR1 half a file")  # a killed run
    assert current_rows(out.path).column(Col.PATH).to_pylist() == ["x.jpg"]
    rows, summary = latest_run(out.path)
    assert rows.num_rows == 1 and summary["run_id"] == _run_id(1)  # no summary written: made from the rows


def test_an_empty_output_folder_says_there_is_nothing_to_read(out):
    with pytest.raises(InputError, match="no classify"):
        current_rows(out.path)
    with pytest.raises(InputError, match="run dinobatch classify first"):
        latest_run(out.path)


def test_the_summary_is_kept_per_run_and_as_the_latest(out):
    run_id = _write_run(out, 1, "f1", ["x.jpg"], "a")
    latest = out.write_summary(run_id, {"run_id": run_id, "files": 1})
    assert json.loads(latest.read_text()) == json.loads((out.path / "_runs" / f"{run_id}.json").read_text())
    assert latest_run(out.path)[1] == {"run_id": run_id, "files": 1}
    assert out.newest_run_time().isoformat() == "2026-12-04T03:00:01+00:00"


def test_later_cache_parts_win_and_embeddings_are_read_only_where_there_are_some(out):
    writer = out.cache_writer("f" * 64, _run_id(1), _meta("f1"))
    writer.write([_cached("s1", "a", embedding=True), _cached("s2", "a")])
    writer.write([_cached("s1", "b")])  # newer, without an embedding
    assert writer.parts == 2
    assert _labels(out.read_cache("f" * 64, pa.array(["s1", "s2", "s3"]), with_embeddings=False)) == {
        "s1": "b", "s2": "a"}
    with_emb = out.read_cache("f" * 64, pa.array(["s1", "s2"]), with_embeddings=True)
    assert _labels(with_emb) == {"s1": "a"} and with_emb.column(Col.EMBEDDING).to_pylist() == [[1.0, 2.0]]
    assert sorted(out.cached_shas("f" * 64, with_embeddings=False).to_pylist()) == ["s1", "s2"]
    assert out.cached_shas("f" * 64, with_embeddings=True).to_pylist() == ["s1"]
    assert out.read_cache("e" * 64, pa.array(["s1"]), with_embeddings=False).num_rows == 0  # another model


def test_compaction_merges_many_parts_and_reads_the_same(out):
    fingerprint = "c" * 64
    writer = out.cache_writer(fingerprint, _run_id(1), _meta("f1"))
    writer.write([_cached("s0", "a", embedding=True)])
    for i in range(COMPACT_PARTS + 3):
        writer.write([_cached(f"s{i % 4}", "ab"[i % 2]), _cached(f"t{i}", "a")])
    wanted = pa.array([f"s{i}" for i in range(4)] + [f"t{i}" for i in range(COMPACT_PARTS + 3)])
    before = {w: _labels(out.read_cache(fingerprint, wanted, with_embeddings=w)) for w in (False, True)}
    assert out.compact_cache(fingerprint, _run_id(2), _meta("f1")) == COMPACT_PARTS + 4
    parts = sorted((out.path / "_cache").glob("*/part-*.parquet"))
    assert len(parts) == 1
    merged = pq.read_table(parts[0]).column(Col.SHA256).to_pylist()
    assert merged.count("s0") == 2  # its newest row, and its newest with an embedding (what --embeddings reads)
    assert len(merged) == len(set(merged)) + 1  # every other content once
    assert {w: _labels(out.read_cache(fingerprint, wanted, with_embeddings=w)) for w in (False, True)} == before


def _old_part(out: ResultsDir, fingerprint: str, name: str, rows: list[dict]) -> None:
    """A cache part as a dinobatch before the precision column wrote it."""
    schema = cache_schema(_meta("f1"))
    schema = schema.remove(schema.get_field_index(Col.PRECISION))
    folder = out.path / "_cache" / fingerprint[:16]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"part-{name}.parquet")


def test_cache_parts_written_before_the_precision_column_are_read_and_compacted_with_it_null(out):
    fingerprint = "b" * 64
    _old_part(out, fingerprint, _run_id(1), [_cached("old", "a", embedding=True), _cached("both", "a")])
    writer = out.cache_writer(fingerprint, _run_id(2), _meta("f1"))
    writer.write([{**_cached("new", "b"), Col.PRECISION: "bf16"}, {**_cached("both", "b"), Col.PRECISION: "int8"}])
    for i in range(COMPACT_PARTS):  # enough parts to be merged
        writer.write([{**_cached(f"t{i}", "a"), Col.PRECISION: "fp32"}])

    def precisions(with_embeddings: bool) -> dict[str, str | None]:
        table = out.read_cache(fingerprint, pa.array(["old", "new", "both"]), with_embeddings=with_embeddings)
        return dict(zip(table[Col.SHA256].to_pylist(), table[Col.PRECISION].to_pylist()))

    assert precisions(False) == {"old": None, "new": "bf16", "both": "int8"}  # reused, not inferred again
    assert precisions(True) == {"old": None}
    assert out.compact_cache(fingerprint, _run_id(3), _meta("f1")) == COMPACT_PARTS + 2
    assert precisions(False) == {"old": None, "new": "bf16", "both": "int8"}
    assert precisions(True) == {"old": None}


def test_a_few_cache_parts_are_left_as_they_are(out):
    writer = out.cache_writer("d" * 64, _run_id(1), _meta("f1"))
    for i in range(COMPACT_PARTS):
        writer.write([_cached(f"s{i}", "a")])
    assert out.compact_cache("d" * 64, _run_id(2), _meta("f1")) == 0
    assert len(list((out.path / "_cache").glob("*/part-*.parquet"))) == COMPACT_PARTS


def test_temporary_files_of_a_killed_run_are_removed_and_nothing_else(out):
    writer = out.cache_writer("f" * 64, _run_id(1), _meta("f1"))
    writer.write([_cached("s1", "a")])
    left = [out.path / f".{_run_id(1)}.parquet.99.tmp", out.path / "_runs" / ".x.json.99.tmp",
            out.path / "_cache" / ".files.parquet.99.tmp", writer.folder / ".part-x.parquet.99.tmp"]
    for path in left:
        path.write_bytes(b"half")
    kept = [out.path / "notes.tmp", *writer.folder.glob("part-*.parquet")]
    (out.path / "notes.tmp").write_text("a user's file, not hidden")
    out.remove_leftovers()
    assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)


def test_the_file_index_leaves_out_files_changed_just_before_they_were_hashed(out):
    now = 10_000_000_000_000
    index = pa.table({Col.ABSPATH: [b"/p/old.jpg", b"/p/racy.jpg"], Col.BYTES: [1, 2],
                      Col.MTIME_NS: [now - 60_000_000_000, now - 1_000_000], Col.CTIME_NS: [now - 60_000_000_000] * 2,
                      Col.INODE: [1, 2], Col.SHA256: ["s1", "s2"]}, schema=file_index_schema())
    assert out.read_file_index().num_rows == 0
    out.write_file_index(index, hashed_at_ns=now)
    assert out.read_file_index().column(Col.ABSPATH).to_pylist() == [b"/p/old.jpg"]  # racy.jpg is hashed again

