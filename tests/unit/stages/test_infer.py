"""Stage infer as a pure function: pixels in, one prediction per row out, a reason where not finite."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dinobatch.engines.local import LocalEngine
from dinobatch.models.file import load_model
from dinobatch.runtime.device import CPU_BATCH_SIZE, resolve_runtime
from dinobatch.schema import Col, cache_schema
from dinobatch.stages.decode import CHANGED, Contents, decode_batch
from dinobatch.stages.infer import (
    NON_FINITE,
    ContentResult,
    Predictor,
    cache_rows,
    content_results,
    postprocess,
    predict_decoded,
    predictions_table,
)
from tests.helpers import LABELS, jpeg_bytes, picture, save


def test_pixels_in_a_prediction_per_row_out(tiny_model):
    predictor = Predictor(load_model(tiny_model), resolve_runtime("cpu", "fp32"), batch_size=None, embeddings=True)
    assert predictor.batch_size == CPU_BATCH_SIZE  # the rule, where none is asked for
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    rows = predictor.table(pixels).to_pylist()
    assert len(rows) == 3 and all(r[Col.ERROR] is None for r in rows)
    for r in rows:
        assert r[Col.PRECISION] == "fp32"  # the runtime's: what the prediction was made at
        assert r[Col.LABEL] in LABELS and math.isclose(sum(r[Col.PROBS]), 1, rel_tol=1e-5)
        assert r[Col.CONFIDENCE] == max(r[Col.PROBS]) and len(r[Col.EMBEDDING]) == 512
    again = predictor.table(pixels[1:2]).to_pylist()  # a row's prediction does not depend on its batch
    assert again[0][Col.LABEL] == rows[1][Col.LABEL]
    assert math.isclose(again[0][Col.CONFIDENCE], rows[1][Col.CONFIDENCE], rel_tol=1e-4)


def test_non_finite_outputs_are_that_row_s_error():
    logits = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 0.0, 0.0]])
    preds = postprocess(logits, torch.zeros(2, 4), LABELS, 1.0, embeddings=False, precision="bf16")
    assert preds[1] == NON_FINITE and preds[0][Col.LABEL] == "stegosaurus" and preds[0][Col.EMBEDDING] is None
    assert preds[0][Col.PRECISION] == "bf16"
    table = predictions_table(preds).to_pylist()
    assert table[1] == {Col.ERROR: NON_FINITE, **{c: None for c in table[1] if c != Col.ERROR}}
    assert table[0][Col.ERROR] is None and table[0][Col.LABEL] == "stegosaurus"


def test_decode_records_meet_their_predictions_in_order():
    records = [{"sha256": "a", "error": None, "changed": (), "facts": {"f": 1}},
               {"sha256": "b", "error": "not an image", "changed": ()},
               {"sha256": "c", "error": None, "changed": ("/old",), "facts": {"f": 3}}]
    results = content_results(records, [{Col.LABEL: "x"}, NON_FINITE])
    assert results == [ContentResult("a", None, {"f": 1}, {Col.LABEL: "x"}, ()),
                       ContentResult("b", "not an image", None, None, ()),
                       ContentResult("c", NON_FINITE, None, None, ("/old",))]


def _awkward_contents(root) -> Contents:
    """Seven contents: RGB JPEG and PNG, grey, CMYK, palette, a corrupt JPEG, a file changed since hashed."""
    files = [save(picture(1, (120, 90)), root / "a.jpg", quality=90), save(picture(2), root / "b.png"),
             save(picture(3).convert("L"), root / "grey.png"),
             save(picture(4).convert("CMYK"), root / "cmyk.jpg", quality=90),
             save(picture(5).convert("P", palette=Image.ADAPTIVE), root / "palette.gif"),
             root / "corrupt.jpg", save(picture(6), root / "changed.png")]
    files[5].write_bytes(jpeg_bytes(picture(7))[:300])
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    shas[6] = "0" * 64  # what fingerprint saw before the file was rewritten
    return Contents(pa.chunked_array([[os.fsencode(f) for f in files]]), pa.chunked_array([shas]),
                    cached=pa.array([], pa.string()))


@pytest.mark.parametrize("workers", [0, None], ids=["in-process", "burst-pool"])
def test_the_batch_path_commits_what_the_local_engine_commits(tmp_path, tiny_model, workers):
    # decode_batch -> predict_decoded (Predictor.table) -> cache_rows is what a cluster engine runs;
    # the cache rows, failures and changed files must equal the local engine's, floats bit for bit
    contents = _awkward_contents(tmp_path)
    runtime = resolve_runtime("cpu", "fp32")
    predictor = Predictor(load_model(tiny_model), runtime, batch_size=3, embeddings=True)
    local = list(LocalEngine(runtime, workers=workers).infer(contents, predictor))
    batched = []
    table = contents.table()
    for lo in range(0, len(contents), predictor.batch_size):  # the same batches, in the same order
        decoded, pixels = decode_batch(table.slice(lo, predictor.batch_size), predictor.preprocessing)
        batched.append(cache_rows(decoded, predict_decoded(predictor, decoded, pixels)))
    assert [len(b) for b in batched] == [len(b) for b in local] == [3, 3, 1]
    rows = pa.concat_tables([b.rows for b in batched])
    assert rows.schema.equals(cache_schema()) and rows.num_rows == 5
    assert rows.equals(pa.concat_tables([b.rows for b in local]))
    assert rows.to_pylist() == pa.concat_tables([b.rows for b in local]).to_pylist()  # exact floats
    assert rows.column(Col.MODE).to_pylist() == ["RGB", "RGB", "L", "CMYK", "P"]
    failed = {k: v for b in batched for k, v in b.failed.items()}
    assert failed == {k: v for b in local for k, v in b.failed.items()}
    assert list(failed.values())[1] == CHANGED and "truncated" in list(failed.values())[0]
    assert [p for b in batched for p in b.changed] == [p for b in local for p in b.changed] == \
        [str(tmp_path / "changed.png")]


def test_cache_rows_refuses_predictions_that_do_not_match_the_decoded_rows(tmp_path, tiny_model):
    decoded, pixels = decode_batch(_awkward_contents(tmp_path).table(), load_model(tiny_model).spec.preprocessing)
    with pytest.raises(ValueError, match="predictions for 5 decoded rows"):
        cache_rows(decoded, predictions_table([NON_FINITE] * len(pixels)))  # every row, not the 5 decoded
