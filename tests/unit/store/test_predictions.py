"""check_predictions: curate refuses predictions whose columns are missing, mistyped or hold wrong
values, naming the column, the problem and the first rows, instead of a traceback or a quiet zero."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from dinobatch.store.predictions import check_predictions
from dinobatch.errors import EXIT_DATA, DataError
from dinobatch.schema import Col, row_schema

LABELS = ["stegosaurus", "triceratops", "velociraptor"]


def rows(n: int = 6, *, errors: int = 0) -> pa.Table:
    """n rows as classify writes them; the last `errors` of them unreadable (no prediction)."""
    out = []
    for i in range(n):
        p = np.full(3, 0.1, np.float32)
        p[i % 3] = 0.8
        failed = i >= n - errors
        out.append({"run_id": "r", "path": f"{i}.png", "sha256": f"{i:064x}", "status": "error" if failed else "ok",
                    "error": "truncated image" if failed else None, "width": 160, "height": 120,
                    "phash": "8f0f0f0f0f0f0f0f", "dhash": None if failed else "f0f0f0f0f0f0f0f0",
                    "label": None if failed else LABELS[i % 3], "confidence": None if failed else 0.8,
                    "probs": None if failed else p.tolist(),
                    "embedding": None if failed else [float(i), 1.0, 0.5]})
    return pa.Table.from_pylist(out, schema=row_schema())


def replaced(table: pa.Table, name: str, values, kind: pa.DataType | None = None) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))


def refused(table: pa.Table, labels=LABELS) -> str:
    with pytest.raises(DataError) as caught:
        check_predictions(table, labels, "results/r.parquet")
    assert caught.value.exit_code == EXIT_DATA
    message = str(caught.value)
    assert message.startswith("results/r.parquet") and "\n" not in message
    return message


def test_rows_as_classify_writes_them_pass_unchanged():
    table = rows(errors=2)
    assert check_predictions(table, LABELS, "x").equals(table)


def test_rows_in_error_need_no_prediction_and_are_not_checked_for_one():
    table = rows(4, errors=2)
    table = replaced(table, Col.PROBS, [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], None, [math.nan, 7.0]],
                     pa.list_(pa.float32()))
    assert check_predictions(table, LABELS, "x").num_rows == 4


def test_a_missing_column_is_named():
    message = refused(rows().drop_columns([Col.PROBS]))
    assert "column probs" in message and "missing" in message


def test_confidence_as_strings_is_a_wrong_type_not_a_crash():
    message = refused(replaced(rows(3), Col.CONFIDENCE, ["0.8", "0.8", "0.8"]))
    assert "column confidence" in message and "string" in message and "float" in message


def test_numbers_of_another_width_are_accepted_as_the_schema_type():
    table = replaced(rows(3), Col.CONFIDENCE, [0.8, 0.8, 0.8], pa.float64())
    table = replaced(table, Col.WIDTH, [160, 160, 160], pa.int64())
    checked = check_predictions(table, LABELS, "x")
    assert checked.schema.field(Col.CONFIDENCE).type == pa.float32()
    assert checked.schema.field(Col.WIDTH).type == pa.int32()


def test_ragged_probs_name_the_rows_of_the_wrong_length():
    table = replaced(rows(4), Col.PROBS, [[0.8, 0.1, 0.1], [0.5, 0.5], [0.1, 0.1, 0.8], [0.2, 0.2, 0.2, 0.4]],
                     pa.list_(pa.float32()))
    message = refused(table)
    assert "column probs" in message and "3 labels" in message
    assert "2 rows" in message and "row 1 '1.png'" in message and "row 3 '3.png'" in message
    assert "row 0 " not in message and "row 2 " not in message


def test_nan_probs_on_half_the_rows_are_refused_naming_the_first_few():
    n = 40
    probs = [[math.nan] * 3 if i % 2 else [0.8, 0.1, 0.1] for i in range(n)]
    message = refused(replaced(rows(n), Col.PROBS, probs, pa.list_(pa.float32())))
    assert "column probs" in message and "NaN" in message and "20 rows" in message
    assert "row 1 '1.png'" in message and "row 9 '9.png'" in message and "'11.png'" not in message  # 5 shown


def test_probabilities_outside_0_1_or_not_summing_to_1_are_refused():
    probs = [[0.8, 0.1, 0.1], [0.8, 0.8, 0.8], [1.5, -0.4, -0.1], [0.1, 0.8, 0.1]]
    message = refused(replaced(rows(4), Col.PROBS, probs, pa.list_(pa.float32())))
    assert "column probs" in message and "row 1 '1.png'" in message and "row 2 '2.png'" in message
    assert "row 0 " not in message and "row 3 " not in message


def test_a_prediction_is_required_where_the_status_says_there_is_one():
    message = refused(replaced(rows(3), Col.PROBS, [[0.8, 0.1, 0.1], None, [0.1, 0.1, 0.8]],
                               pa.list_(pa.float32())))
    assert "column probs" in message and "row 1 '1.png'" in message


def test_a_label_the_model_does_not_have_and_a_bad_status_are_named():
    table = replaced(rows(3), Col.LABEL, ["stegosaurus", "trex", "velociraptor"])
    table = replaced(table, Col.STATUS, ["ok", "ok", "maybe"])
    message = refused(table)
    assert "column label" in message and "row 1 '1.png'" in message
    assert "column status" in message and "row 2 '2.png'" in message


def test_nan_confidence_and_ragged_embeddings_and_bad_hashes_are_refused():
    table = replaced(rows(3), Col.CONFIDENCE, [0.8, math.nan, 0.8], pa.float32())
    table = replaced(table, Col.EMBEDDING, [[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32()))
    table = replaced(table, Col.DHASH, ["f0f0f0f0f0f0f0f0", "f0f0f0f0f0f0f0f0", "not hex"])
    message = refused(table)
    assert "column confidence" in message and "column embedding" in message and "column dhash" in message


def test_no_label_list_in_the_metadata_is_refused():
    assert "labels" in refused(rows(3), labels=[])


def test_a_path_with_control_characters_is_shown_escaped():
    table = replaced(rows(3), Col.PATH, ["0.png", "evil\n\x1b[2Jname.png", "2.png"])
    message = refused(replaced(table, Col.CONFIDENCE, [0.8, 2.0, 0.8], pa.float32()))
    assert "\x1b" not in message and "evil\\n\\x1b[2Jname.png" in message
