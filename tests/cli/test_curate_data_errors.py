"""dinobatch curate on predictions whose values are wrong: exit 10 naming the column and the rows,
and nothing written, instead of a traceback (exit 1) or a queue quietly missing its label errors; and
what curate prints when the values are sound but nothing is flagged."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pyarrow as pa
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.errors import EXIT_DATA
from dinobatch.io.walk import sha256_file
from dinobatch.jobs.classify import new_run_id
from dinobatch.schema import Col, row_schema, schema_metadata
from dinobatch.store.results import ResultsDir
from tests.helpers import picture, save

LABELS = ["stegosaurus", "triceratops", "velociraptor"]
N = 30


@pytest.fixture
def photos(tmp_path):
    """N small pictures and a manifest that labels every sixth one otherwise than the model sees it."""
    root = tmp_path / "photos"
    lines = ["path,label,split"]
    for i in range(N):
        save(picture(i, (48, 36)), root / f"{i}.png")
        lines.append(f"{i}.png,{LABELS[(i + (i % 6 == 0)) % 3]},train")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def predictions(tmp_path, root, change=None):
    """A classify output folder for root: the model says LABELS[i % 3] with 0.8; change(rows) may
    spoil the rows (a list of dicts) or return a table to write instead."""
    rows = []
    for i in range(N):
        probs = [0.1, 0.1, 0.1]
        probs[i % 3] = 0.8
        rows.append({"run_id": "r", "path": f"{i}.png", "sha256": sha256_file(str(root / f"{i}.png")),
                     "status": "ok", "width": 48, "height": 36, "dhash": "f0f0f0f0f0f0f0f0",
                     "model_fingerprint": "f" * 64, "label": LABELS[i % 3], "confidence": 0.8, "probs": probs})
    meta = schema_metadata(version="t", model_name="m", model_fingerprint="f" * 64, labels=LABELS, folder=str(root))
    table = pa.Table.from_pylist(rows, schema=row_schema(meta))
    table = change(table) if change else table
    out = ResultsDir(tmp_path / "results")
    out.ensure()
    run_id = new_run_id(datetime.now(timezone.utc))
    out.write_rows(run_id, table.to_batches(), table.schema)
    out.write_summary(run_id, {"run_id": run_id, "config": {"folder": str(root)}})
    return tmp_path / "results"


def curate(tmp_path, results, root):
    args = ["curate", str(results), "--manifest", str(root / "labels.csv"), "-o", str(tmp_path / "queue")]
    return CliRunner().invoke(cli, args)


def column(table: pa.Table, name: str, values, kind=None) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name).with_type(
        kind or pa.array(values).type), pa.array(values, kind))


def test_sound_predictions_find_the_planted_label_errors(tmp_path, photos):
    done = curate(tmp_path, predictions(tmp_path, photos), photos)
    assert done.exit_code == 0, done.output
    assert "label_error 5" in done.output  # every sixth image is labelled otherwise than it looks


@pytest.mark.parametrize("spoil, named", [
    (lambda t: t.drop_columns([Col.PROBS]), "column probs: missing"),
    (lambda t: column(t, Col.CONFIDENCE, ["0.8"] * N), "column confidence: holds string values"),
    (lambda t: column(t, Col.PROBS, [[0.8, 0.2] if i % 7 == 0 else t[Col.PROBS][i].as_py() for i in range(N)],
                      pa.list_(pa.float32())), "column probs: not 3 values"),
    (lambda t: column(t, Col.PROBS, [[math.nan] * 3 if i % 2 else t[Col.PROBS][i].as_py() for i in range(N)],
                      pa.list_(pa.float32())), "column probs: NaN"),
], ids=["missing probs", "confidence as strings", "ragged probs", "NaN probs on half the rows"])
def test_wrong_predictions_are_exit_10_naming_column_and_rows_and_nothing_is_written(tmp_path, photos, spoil,
                                                                                     named):
    done = curate(tmp_path, predictions(tmp_path, photos, spoil), photos)
    assert done.exit_code == EXIT_DATA, done.output
    assert named in done.stderr and "Traceback" not in done.output
    if "missing" not in named and "string" not in named:
        assert "row 1 '1.png'" in done.stderr or "row 0 '0.png'" in done.stderr
    assert not (tmp_path / "queue").exists()


def test_nothing_flagged_prints_no_dangling_reason_list(tmp_path, photos):
    def large(table):  # photos of a size that is not flagged as tiny, all predicted with 0.8
        for col in ("width", "height"):
            at = table.schema.get_field_index(col)
            table = table.set_column(at, table.schema.field(at), pa.array([640] * N, table.schema.field(at).type))
        return table

    result = CliRunner().invoke(cli, ["curate", str(predictions(tmp_path, photos, large)), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"{N} images, 0 to review"
