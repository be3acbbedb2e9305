"""Metrics equal the ones computed by hand; calibration lowers the error it should."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinobatch.training.metrics import expected_calibration_error, fit_temperature, report, softmax


def test_report_matches_hand_computation():
    labels = ["a", "b", "c"]
    probs = np.array([[0.7, 0.2, 0.1],   # a -> a
                      [0.2, 0.5, 0.3],   # a -> b (a is 2nd)
                      [0.1, 0.6, 0.3],   # b -> b
                      [0.5, 0.1, 0.4]])  # c -> a (c is 2nd)
    y = [0, 0, 1, 2]
    r = report(y, probs, labels)
    assert r["top1"] == 0.5 and r["top3"] == 1.0 and r["micro_f1"] == 0.5
    assert r["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.2) + math.log(0.6) + math.log(0.4)) / 4)
    a, b, c = r["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 2)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert r["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert r["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    probs = np.array([[0.8, 0.2]] * 10)
    assert expected_calibration_error(probs, [0] * 8 + [1] * 2) == pytest.approx(0.0)
    assert expected_calibration_error(probs, [0] * 5 + [1] * 5) == pytest.approx(0.3)


def test_temperature_softens_overconfident_logits_and_lowers_ece():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), y] += 1.0
    logits *= 4  # overconfident
    t = fit_temperature(logits, y)
    assert t > 2
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(softmax(logits), y) / 2
