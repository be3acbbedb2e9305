"""classify's precision column: each row says the precision its prediction was made at, a prediction reused
from the cache the precision it was made at (until --force); a cache and rows files written before the column
existed still read (the cache reused, not inferred again; the rows in results, curate and export)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.schema import Col
from tests.helpers import run_classify as run


def _precisions(rows: dict) -> dict[str, str | None]:
    """The precision of each row with a prediction (ok or duplicate), by path."""
    return {path: row[Col.PRECISION] for path, row in rows.items() if row[Col.STATUS] != "error"}


def test_bf16_rows_say_bf16_and_a_fp32_rerun_reuses_them_until_force(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    first, rows = run(root, out, tiny_model, precision="bf16")
    assert first.config["precision"] == "bf16" and first.inferred == 11
    assert set(_precisions(rows).values()) == {"bf16"} and len(_precisions(rows)) == 12
    assert all(row[Col.PRECISION] is None for row in rows.values() if row[Col.STATUS] == "error")
    second, rows = run(root, out, tiny_model, precision="fp32")
    assert (second.inferred, second.reused, second.config["precision"]) == (0, 11, "fp32")
    assert set(_precisions(rows).values()) == {"bf16"}  # the cache key is the model file: made at bf16, reused
    forced, rows = run(root, out, tiny_model, precision="fp32", force=True)
    assert forced.inferred == 11 and set(_precisions(rows).values()) == {"fp32"}


def _strip_precision(paths) -> int:
    """Rewrite Parquet files as a dinobatch before the precision column wrote them (schema version 2)."""
    count = 0
    for path in paths:
        table = pq.read_table(path)
        meta = {**table.schema.metadata, b"dinobatch.schema_version": b"2"}
        pq.write_table(table.drop_columns([Col.PRECISION]).replace_schema_metadata(meta), path)
        count += 1
    return count


def test_a_cache_written_before_the_precision_column_is_reused_with_the_precision_unknown(tmp_path, inbox,
                                                                                          tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    run(root, out, tiny_model)
    assert _strip_precision((out / "_cache").glob("*/part-*.parquet")) >= 1
    summary, rows = run(root, out, tiny_model)
    assert (summary.inferred, summary.reused) == (0, 11)  # an upgrade infers nothing again
    assert len(_precisions(rows)) == 12 and set(_precisions(rows).values()) == {None}
    assert rows["b.png"][Col.LABEL] is not None


def test_a_rows_file_written_before_the_precision_column_still_reads(tmp_path, inbox, tiny_model):
    root, out = inbox["a.jpg"].parent, tmp_path / "out"
    summary, _ = run(root, out, tiny_model)
    _strip_precision([summary.rows_file])
    runner = CliRunner()
    shown = runner.invoke(cli, ["results", str(out)], catch_exceptions=False)
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == 1 + summary.files
    assert runner.invoke(cli, ["results", str(out), "-o", str(tmp_path / "current.parquet")],
                         catch_exceptions=False).exit_code == 0
    current = pq.read_table(tmp_path / "current.parquet")
    assert current.num_rows == summary.files and set(current[Col.PRECISION].to_pylist()) == {None}
    curated = runner.invoke(cli, ["curate", str(out), "-o", str(tmp_path / "queue")], catch_exceptions=False)
    assert curated.exit_code == 0, curated.output
    assert json.loads((tmp_path / "queue" / "summary.json").read_text())["images"] == summary.files
    exported = runner.invoke(cli, ["export", str(out), "--to", str(tmp_path / "sorted"), "--min-confidence", "0.5"],
                             catch_exceptions=False)
    assert exported.exit_code == 0, exported.output
    assert sum(1 for p in Path(tmp_path / "sorted").rglob("*") if p.is_file()) == summary.files
