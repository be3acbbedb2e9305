"""The review document (one item per duplicate group, with every member), the page that shows it, and
curate's cap on what a reviewer is shown."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from dinobatch.curation.curate import CurateConfig, CurateResult, curate, mark_review
from dinobatch.curation.reasons import Reason
from dinobatch.curation.review import render_review_page, review_document, write_outputs
from dinobatch.schema import Col
from tests.unit.curation.test_curate import _predictions, _row

LABELS = ["stegosaurus", "triceratops"]


def _entry(path: str, score: float, reasons: list[str], group: int | None = None, **extra) -> dict:
    return {Col.PATH: path, Col.SHA256: hashlib.sha256(path.encode()).hexdigest(), Col.STATUS: "ok",
            Col.GIVEN_LABEL: extra.get("given", "stegosaurus"), Col.SPLIT: "train",
            Col.PREDICTED_LABEL: "triceratops", Col.SUGGESTED_LABEL: "triceratops", Col.CONFIDENCE: 0.9,
            Col.SCORE: score, Col.REASONS: reasons, Col.DETAILS: f"{path} is odd", Col.DUPLICATE_GROUP: group}


def _member(path: str, label: str, group: int, kept: bool) -> dict:
    return {Col.PATH: path, Col.SHA256: hashlib.sha256(path.encode()).hexdigest(), Col.LABEL: label,
            Col.SPLIT: "train", "kept": kept, Col.PREDICTED_LABEL: "stegosaurus", Col.CONFIDENCE: 0.8,
            Col.DUPLICATE_GROUP: group}


def _written(tmp_path, queue, groups=(), max_review=500) -> Path:
    mark_review(queue, max_review)
    result = CurateResult(queue, {r.value: 0 for r in Reason}, 40, [], {}, list(groups), str(tmp_path / "photos"),
                          LABELS, str(tmp_path / "labels.csv"), max_review)
    write_outputs(result, tmp_path / "q", html_page=False)
    return tmp_path / "q"


def _urls(seen: list[Path]):
    def urls(path: Path):
        seen.append(path)
        return f"/thumb/{path.name}", f"/full/{path.name}"
    return urls


def test_a_duplicate_group_is_one_item_with_every_member_side_by_side(tmp_path):
    queue = [_entry("copy_a.png", 0.95, [Reason.LABEL_ERROR, Reason.DUPLICATE_LABEL_CONFLICT], group=7),
             _entry("alone.png", 0.9, [Reason.DUPLICATE_SPLIT_LEAK]),
             _entry("copy_b.png", 0.85, [Reason.DUPLICATE_LABEL_CONFLICT], group=7, given="triceratops")]
    groups = [[_member("copy_a.png", "stegosaurus", 7, True), _member("copy_b.png", "triceratops", 7, False),
               _member("copy_c.png", "stegosaurus", 7, False)]]  # copy_c is not flagged, but is a member
    seen: list[Path] = []
    doc = review_document(_written(tmp_path, queue, groups), _urls(seen))
    assert [it["key"] for it in doc["items"]] == ["group-7", "file-alone.png"]  # score order, the group once
    group = doc["items"][0]
    assert [m["path"] for m in group["members"]] == ["copy_a.png", "copy_b.png", "copy_c.png"]
    assert [m["label"] for m in group["members"]] == ["stegosaurus", "triceratops", "stegosaurus"]
    assert group["reasons"] == ["label_error", "duplicate_label_conflict"]
    assert group["path"] == "copy_a.png" and group["score"] == 0.95
    assert group["members"][2]["thumb"] == "/thumb/copy_c.png" and group["members"][2]["full"] == "/full/copy_c.png"
    assert [m["path"] for m in doc["items"][1]["members"]] == ["alone.png"]
    # urls gets each file's absolute path (the server registers it; the static page makes its thumbnail)
    assert seen == [tmp_path / "photos" / n for n in ("copy_a.png", "copy_b.png", "copy_c.png", "alone.png")]
    assert doc["labels"] == LABELS
    assert doc["reasons"]["label_error"].startswith(Reason.LABEL_ERROR.description)


def test_the_identity_is_the_queue_files_sha256_and_changes_with_the_queue(tmp_path):
    out = _written(tmp_path, [_entry("a.png", 0.5, [Reason.TINY])])
    first = review_document(out, _urls([]))["identity"]
    assert first == hashlib.sha256((out / "queue.parquet").read_bytes()).hexdigest()
    _written(tmp_path, [_entry("a.png", 0.5, [Reason.TINY]), _entry("b.png", 0.4, [Reason.TINY])])
    assert review_document(out, _urls([]))["identity"] != first  # another queue: other decisions in the browser


def test_the_cap_keeps_the_highest_scores_and_each_reasons_best(tmp_path):
    queue = [_entry(f"unsure_{i:03}.png", 0.5 - i / 1000, [Reason.LOW_CONFIDENCE]) for i in range(300)]
    queue += [_entry(f"tiny_{i}.png", 0.25, [Reason.TINY]) for i in range(5)]  # below every low_confidence score
    mark_review(queue, 100)
    shown = [q[Col.PATH] for q in queue if q[Col.IN_REVIEW]]
    assert len(queue) == 305 and len(shown) == 100  # the rest stay in the queue, marked
    assert {"tiny_0.png", "tiny_1.png"} <= set(shown) and "tiny_2.png" not in shown  # 100 // 50 of each reason
    assert shown[:98] == [f"unsure_{i:03}.png" for i in range(98)]  # then the highest scores


def test_a_duplicate_group_counts_once_against_the_cap_and_keeps_all_its_entries(tmp_path):
    queue = [_entry("g1.png", 0.9, [Reason.DUPLICATE_SPLIT_LEAK], group=1),
             _entry("g2.png", 0.9, [Reason.DUPLICATE_SPLIT_LEAK], group=1),
             _entry("a.png", 0.8, [Reason.UNREADABLE]), _entry("b.png", 0.3, [Reason.UNREADABLE])]
    mark_review(queue, 2)
    assert [q[Col.IN_REVIEW] for q in queue] == [True, True, True, False]
    mark_review(queue, 0)  # 0: no cap
    assert all(q[Col.IN_REVIEW] for q in queue)


def test_curate_caps_the_review_and_writes_and_counts_the_rest(tmp_path):
    rows = [_row(f"unsure_{i}.png", confidence=0.2 + i / 100) for i in range(8)] + [_row("fine.png")]
    result = curate(CurateConfig(predictions=_predictions(tmp_path, rows), out=str(tmp_path / "q"), max_review=3))
    write_outputs(result, tmp_path / "q", html_page=False)
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["flagged"] == 8
    assert summary["review"] == {"max_items": 3, "items": 3, "files": 3, "left_out": 5}
    assert summary["labels"] == LABELS and summary["manifest"] is None
    with open(tmp_path / "q" / "queue.csv", newline="") as fh:
        rows_csv = list(csv.DictReader(fh))
    assert [r["in_review"] for r in rows_csv] == ["True"] * 3 + ["False"] * 5
    assert rows_csv[0]["path"] == "unsure_0.png"  # the least confident first
    doc = review_document(tmp_path / "q", _urls([]))
    assert [it["path"] for it in doc["items"]] == ["unsure_0.png", "unsure_1.png", "unsure_2.png"]


def test_summary_names_the_manifest_by_its_absolute_path(tmp_path, monkeypatch):
    rows = [_row("unsure.png", confidence=0.3)]
    predictions = _predictions(tmp_path, rows)
    (tmp_path / "labels.csv").write_text("path,label\nunsure.png,stegosaurus\n")
    monkeypatch.chdir(tmp_path)
    result = curate(CurateConfig(predictions=predictions, out="q", manifest="labels.csv"))
    write_outputs(result, tmp_path / "q", html_page=False)
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["manifest"] == str(tmp_path / "labels.csv")


def test_the_static_page_embeds_the_document_and_no_path_can_end_its_script(tmp_path):
    hostile = "</script><script>alert(1)</script><!--.png"
    doc = {"items": [{"path": hostile}], "labels": LABELS, "reasons": {}, "identity": "x"}
    page = render_review_page(doc, mode="static", title=f"review of {hostile} __DATA__")
    assert page.count("</script>") == 2  # the page's own two scripts
    data = re.search(r'<script type="application/json" id="dinobatch-queue">(.*?)</script>', page, re.S)[1]
    assert json.loads(data) == doc
    assert '<html lang="en" data-mode="static">' in page and 'content=""' in page  # no token in a file


def test_the_server_page_carries_the_token_and_loads_the_queue_itself():
    page = render_review_page(None, mode="server", token='t"ok<')
    assert '<meta name="dinobatch-token" content="t&quot;ok&lt;">' in page
    assert 'id="dinobatch-queue">null</script>' in page and "/api/queue" in page
    with pytest.raises(ValueError):
        render_review_page(None, mode="server")
    with pytest.raises(ValueError):
        render_review_page(None, mode="gallery")
