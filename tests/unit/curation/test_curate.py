"""curate's queue and its reasons: one table (curation.reasons.Reason) orders the queue and explains it."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone

import pyarrow as pa
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.curation.curate import CurateConfig, curate
from dinobatch.curation.reasons import Reason
from dinobatch.curation.review import write_outputs
from dinobatch.jobs.classify import new_run_id
from dinobatch.schema import STATUS_ERROR, STATUS_OK, Col, row_schema, schema_metadata
from dinobatch.store.results import ResultsDir

LABELS = ["stegosaurus", "triceratops"]


def _row(path: str, *, size=(160, 120), confidence=0.9, dhash="f0f0f0f0f0f0f0f0", error=None) -> dict:
    """A classify row; no image behind it (the queue needs only the row)."""
    ok = error is None
    return {Col.RUN_ID: "r", Col.PATH: path, Col.SHA256: f"{hash(path) & (2**64 - 1):064x}",
            Col.STATUS: STATUS_OK if ok else STATUS_ERROR, Col.ERROR: error, Col.FORMAT: "PNG",
            Col.WIDTH: size[0], Col.HEIGHT: size[1], Col.MODE: "RGB", Col.PHASH: "8f0f0f0f0f0f0f0f",
            Col.DHASH: dhash, Col.LABEL: LABELS[0] if ok else None, Col.CONFIDENCE: confidence if ok else None,
            Col.PROBS: [confidence, 1 - confidence] if ok else None}


def _predictions(tmp_path, rows) -> str:
    """A classify output folder holding one run of these rows."""
    out = ResultsDir(tmp_path / "results")
    out.ensure()
    meta = schema_metadata(version="t", model_name="m", model_fingerprint="f" * 64, labels=LABELS,
                           folder=str(tmp_path / "photos"))
    schema = row_schema(meta)
    run_id = new_run_id(datetime.now(timezone.utc))
    out.write_rows(run_id, pa.Table.from_pylist(rows, schema=schema).to_batches(), schema)
    out.write_summary(run_id, {"run_id": run_id, "config": {"folder": str(tmp_path / "photos")}})
    return str(tmp_path / "results")


def _one_reason_each(tmp_path):
    rows = [_row("aspect.png", size=(900, 100)), _row("blank.png", dhash="0000000000000000"),
            _row("broken.png", error="truncated image"), _row("tiny.png", size=(40, 50)),
            _row("unsure.png", confidence=0.3), _row("fine.png")]
    return curate(CurateConfig(predictions=_predictions(tmp_path, rows), out=str(tmp_path / "q")))


def test_the_queue_is_ordered_by_each_reasons_score(tmp_path):
    result = _one_reason_each(tmp_path)
    fixed = {"broken.png": Reason.UNREADABLE, "blank.png": Reason.NEARLY_BLANK, "tiny.png": Reason.TINY,
             "aspect.png": Reason.EXTREME_ASPECT}
    by_path = {q[Col.PATH]: q for q in result.queue}
    assert set(by_path) == {*fixed, "unsure.png"}
    for path, reason in fixed.items():
        assert by_path[path][Col.REASONS] == [reason.value]
        assert by_path[path][Col.SCORE] == round(reason.base, 4)
    # low confidence scales with doubt, within its range: 0.3 confident is 0.7 of the way to the top
    unsure = by_path["unsure.png"][Col.SCORE]
    assert unsure == round(Reason.LOW_CONFIDENCE.score(0.7), 4)
    assert Reason.LOW_CONFIDENCE.base <= unsure <= Reason.LOW_CONFIDENCE.top
    expected = sorted(by_path, key=lambda p: -by_path[p][Col.SCORE])
    assert [q[Col.PATH] for q in result.queue] == expected
    assert expected[0] == "broken.png" and expected[-1] == "aspect.png"


def test_an_images_reasons_are_listed_by_score(tmp_path):
    rows = [_row("small_strip.png", size=(300, 30)), _row("a.png")]  # tiny (0.25) and extreme_aspect (0.2)
    result = curate(CurateConfig(predictions=_predictions(tmp_path, rows), out=str(tmp_path / "q")))
    (entry,) = result.queue
    assert entry[Col.REASONS] == [Reason.TINY, Reason.EXTREME_ASPECT]
    assert entry[Col.SCORE] == Reason.TINY.base


def test_summary_counts_every_reason_by_name_in_the_tables_order(tmp_path):
    result = _one_reason_each(tmp_path)
    write_outputs(result, tmp_path / "q", html_page=False)
    counts = json.loads((tmp_path / "q" / "summary.json").read_text())["counts"]
    assert list(counts) == [r.value for r in Reason]
    assert counts[Reason.UNREADABLE] == 1 and counts[Reason.LABEL_ERROR] == 0


def test_the_review_page_says_what_each_reason_means(tmp_path):
    result = _one_reason_each(tmp_path)
    page = write_outputs(result, tmp_path / "q", html_page=True)["review.html"].read_text()
    data = json.loads(re.search(r'<script type="application/json" id="dinobatch-queue">(.*?)</script>', page, re.S)[1])
    for reason in Reason:
        assert data["reasons"][reason.value].startswith(reason.description)


def test_curate_help_lists_each_reason_with_its_score_and_meaning():
    out = CliRunner().invoke(cli, ["curate", "--help"], terminal_width=2000).output
    text = " ".join(out.split())
    for reason in Reason:
        assert f"{reason.value} {reason.scores()}: {reason.description}." in text, reason
    assert "0.5-1: the given label looks wrong" in text and "tiny 0.25:" in text


def test_embedding_scores_keep_their_last_bits():
    """The queue's scores are written rounded, and ties between reasons are broken by score: the
    reasons table must compute base + span * above / scale in the order curate always did, or about
    one score in sixteen changes in its last bit."""
    import random

    from dinobatch.curation.reasons import Reason

    rng = random.Random(0)
    for _ in range(20000):
        threshold = rng.uniform(0.5, 0.999)
        sim = rng.uniform(threshold, 1.0)
        scale = max(1 - threshold, 1e-9)
        assert Reason.EMBEDDING_NEAR_DUPLICATE.score(sim - threshold, scale) == 0.4 + 0.2 * (sim - threshold) / scale
