"""Stage infer as a pure function: pixels in, one prediction per row out, a reason where not finite."""

from __future__ import annotations

import math

import numpy as np
import torch

from dinobatch.models.file import load_model
from dinobatch.runtime.device import CPU_BATCH_SIZE, resolve_runtime
from dinobatch.schema import Col
from dinobatch.stages.infer import NON_FINITE, ContentResult, Predictor, content_results, postprocess, predictions_table
from tests.helpers import LABELS


def test_pixels_in_a_prediction_per_row_out(tiny_model):
    predictor = Predictor(load_model(tiny_model), resolve_runtime("cpu", "fp32"), batch_size=None, embeddings=True)
    assert predictor.batch_size == CPU_BATCH_SIZE  # the rule, where none is asked for
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    rows = predictor.table(pixels).to_pylist()
    assert len(rows) == 3 and all(r[Col.ERROR] is None for r in rows)
    for r in rows:
        assert r[Col.LABEL] in LABELS and math.isclose(sum(r[Col.PROBS]), 1, rel_tol=1e-5)
        assert r[Col.CONFIDENCE] == max(r[Col.PROBS]) and len(r[Col.EMBEDDING]) == 512
    again = predictor.table(pixels[1:2]).to_pylist()  # a row's prediction does not depend on its batch
    assert again[0][Col.LABEL] == rows[1][Col.LABEL]
    assert math.isclose(again[0][Col.CONFIDENCE], rows[1][Col.CONFIDENCE], rel_tol=1e-4)


def test_non_finite_outputs_are_that_row_s_error():
    logits = torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 0.0, 0.0]])
    preds = postprocess(logits, torch.zeros(2, 4), LABELS, 1.0, embeddings=False)
    assert preds[1] == NON_FINITE and preds[0][Col.LABEL] == "stegosaurus" and preds[0][Col.EMBEDDING] is None
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
