"""Review on a real `dinobatch serve --queue` process: ten items decided by keyboard in headless Chromium, one
undone, the page reloaded (it resumes), decisions.csv checked byte for byte, applied from the page (its dry-run
summary, Confirm, the new manifest version's path) and the version's labels checked;
and a server SIGKILLed during a burst of decisions keeps every one it acknowledged."""

from __future__ import annotations

import csv
import getpass
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from dinobatch.curation.decisions import DECISIONS_CSV, JOURNAL, read_journal, replay
from dinobatch.curation.relabel import relabel
from dinobatch.training.manifest import load_manifest
from tests.helpers import LABELS, tree_digest
from tests.review_server import ServeProcess, curated_queue

TOKEN = "X-Dinobatch-Token"


@pytest.fixture(scope="module")
def curated(tiny_model, tmp_path_factory):
    """One curated queue for the module; each test reviews its own copy of the queue folder."""
    return curated_queue(tmp_path_factory.mktemp("review"), tiny_model)


@pytest.fixture(scope="module")
def server(curated, tiny_model, tmp_path_factory):
    """The module's server, on its own copy of the queue; stopped by the finaliser."""
    queue = tmp_path_factory.mktemp("served") / "queue"
    shutil.copytree(curated.queue, queue)
    proc = ServeProcess(tiny_model, queue, queue.parent / "serve.log")
    try:
        yield proc.start()
    finally:
        proc.stop()


def _token(server: ServeProcess) -> str:
    """The token the served page holds (what a page of another site cannot read)."""
    with urllib.request.urlopen(server.url + "/review") as res:
        return re.search(r'<meta name="dinobatch-token" content="([^"]+)"', res.read().decode())[1]


def _artefacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DINOBATCH_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _browser(playwright):
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("DINOBATCH_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium is required here (DINOBATCH_REQUIRE_BROWSER) but not installed")
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    return playwright.chromium.launch(executable_path=chromium, headless=True)


def _plan(items: list[dict], count: int) -> list[tuple[int, int, str, str, str]]:
    """(item, member, key, label, note) for every file of the first `count` items: keep, remove, relabel in
    turn (relabel to the label after the given one), one with a note."""
    plan = []
    for i, item in enumerate(items[:count]):
        for j, m in enumerate(item["members"]):
            action = ("keep", "remove", "relabel")[len(plan) % 3]
            label = LABELS[(LABELS.index(m["label"]) + 1) % len(LABELS)] if action == "relabel" else ""
            plan.append((i, j, action, label, "horns, see the frill" if len(plan) == 4 else ""))
    return plan


def _settled(page, item: int, member: int) -> None:
    """Wait until the page shows item (0-based) with member selected: the last key's decision is answered."""
    page.wait_for_function("([i, m]) => document.querySelector('.meta b')?.textContent === String(i) && "
                           "document.querySelector('.member.current')?.dataset.index === String(m)",
                           arg=[item + 1, member], timeout=15000)


def _decide(page, action: str, label: str, note: str) -> None:
    if note:
        page.keyboard.press("n")
        page.keyboard.type(note)
        page.keyboard.press("Enter")
    if action == "relabel":
        page.keyboard.press("r")
        page.keyboard.type(label[:4])
        page.keyboard.press("Enter")
    else:
        page.keyboard.press({"keep": "k", "remove": "x"}[action])


def test_ten_items_by_keyboard_undo_reload_resume_exact_csv_and_apply_from_the_page(server, curated, tmp_path):
    from playwright.sync_api import sync_playwright

    items = server.get("/api/queue")[1]["items"]
    assert len(items) >= 11
    assert any(len(item["members"]) > 1 for item in items[:10]), "a duplicate group among the ten: decided per copy"
    plan = _plan(items, 10)
    images_before = tree_digest(curated.images)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/review")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#progress").text_content() == f"0 of {len(items)} reviewed"
        for n, (i, j, action, label, note) in enumerate(plan):
            _decide(page, action, label, note)
            nxt = plan[n + 1] if n + 1 < len(plan) else (10, 0)
            _settled(page, nxt[0], nxt[1])
        assert page.locator("#progress").text_content() == f"10 of {len(items)} reviewed"
        page.keyboard.press("u")  # takes back the last decision: item 10 is undecided again, and shown
        _settled(page, plan[-1][0], plan[-1][1])
        page.wait_for_function("() => document.querySelector('#progress').textContent.startsWith('9 of')")
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        # resumed: the same count, at the first undecided item (the one undone)
        assert page.locator("#progress").text_content() == f"9 of {len(items)} reviewed"
        assert server.get("/api/queue")[1]["progress"] == {"reviewed": 9, "total": len(items)}  # the page's count
        _settled(page, plan[-1][0], plan[-1][1])
        page.screenshot(path=str(_artefacts(tmp_path) / "review-served.png"), full_page=True)

        kept = plan[:-1]
        assert server.request("POST", "/api/apply")[0] == 403  # without the token: refused, nothing written
        page.keyboard.press("A")  # Apply: relabel's dry run first, shown in a dialog
        page.wait_for_selector("#apply-dialog[open]")
        wanted = {a: sum(1 for p in kept if p[2] == a) for a in ("keep", "relabel", "remove")}
        summary = page.text_content("#apply-body")
        assert page.text_content("#apply-counts") == " · ".join(f"{n} {a}" for a, n in wanted.items())
        assert f"{len(kept)} decisions" in summary and str(curated.manifest) in summary
        first = items[kept[0][0]]["members"][kept[0][1]]["path"]
        assert page.locator("#apply-changes li").count() == min(len(kept), 10) and first in summary
        assert not list(curated.manifest.parent.glob("m.v*.parquet"))  # a dry run writes nothing
        page.screenshot(path=str(_artefacts(tmp_path) / "review-served-apply.png"), full_page=True)
        page.keyboard.press("Enter")  # Confirm has the focus
        page.wait_for_selector("#applied:not([hidden])", timeout=30000)
        assert page.locator("#apply-dialog[open]").count() == 0 and page.locator("#banner").is_hidden()
        new_manifest = page.text_content("#new-manifest")
        assert [str(v) for v in curated.manifest.parent.glob("m.v*.parquet")] == [new_manifest]
        page.screenshot(path=str(_artefacts(tmp_path) / "review-served-applied.png"), full_page=True)
        browser.close()

    text = (server.queue / DECISIONS_CSV).read_bytes().decode("utf-8")
    with open(server.queue / DECISIONS_CSV, newline="", encoding="utf-8") as fh:
        stamps = {r["path"]: (r["reviewer"], r["decided_at"]) for r in csv.DictReader(fh)}
    expected = "path,action,label,note,reviewer,decided_at\r\n"
    for i, j, action, label, note in kept:
        path = items[i]["members"][j]["path"]
        cell = f'"{note}"' if "," in note else note
        expected += f"{path},{action},{label},{cell},{stamps[path][0]},{stamps[path][1]}\r\n"
    assert text == expected
    for reviewer, when in stamps.values():
        assert reviewer == getpass.getuser()
        assert started <= datetime.fromisoformat(when) <= datetime.now(timezone.utc) + timedelta(seconds=1)

    rows = {r["path"]: r for r in load_manifest(new_manifest).table.to_pylist()}
    old = {r["path"]: r for r in load_manifest(curated.manifest).table.to_pylist()}
    for i, j, action, label, _ in kept:
        path = items[i]["members"][j]["path"]
        assert rows[path]["label"] == (label if action == "relabel" else old[path]["label"])
        assert (rows[path]["status"] == "removed") == (action == "remove")
    undecided = set(old) - {items[i]["members"][j]["path"] for i, j, *_ in kept}
    assert all(rows[p] == old[p] for p in undecided)
    assert tree_digest(curated.images) == images_before  # the image folder is never touched
    token = {TOKEN: _token(server)}
    again = server.request("POST", "/api/apply", headers=token)[1]  # the same decisions: nothing new written
    assert again["outcome"] == "already applied" and again["new_manifest"] == new_manifest


def test_decisions_are_refused_without_the_token_or_outside_the_queue(server):
    items = server.get("/api/queue")[1]["items"]
    path = items[-1]["path"]
    before = (server.queue / JOURNAL).read_bytes() if (server.queue / JOURNAL).exists() else b""
    token = {TOKEN: _token(server)}
    assert server.request("POST", "/api/decisions", {"path": path, "action": "keep"})[0] == 403
    assert server.request("POST", "/api/decisions", {"path": path, "action": "keep"}, {TOKEN: "x" * 43})[0] == 403
    for body, reason in [({"path": "../../etc/passwd", "action": "keep"}, "not a file of this review queue"),
                         ({"path": path, "action": "relabel", "label": "dodo"}, "not one of the labels"),
                         ({"path": path, "action": "delete"}, "unknown action"),
                         ({"path": path, "action": "undo"}, "no decision to undo"),
                         ({"path": 3, "action": "keep"}, "must be text")]:
        status, answer = server.request("POST", "/api/decisions", body, token)
        assert status == 400 and reason in answer["error"], (body, answer)
    after = (server.queue / JOURNAL).read_bytes() if (server.queue / JOURNAL).exists() else b""
    assert after == before


def test_a_sigkill_during_a_burst_loses_no_acknowledged_decision(curated, tiny_model, tmp_path):
    queue = tmp_path / "queue"
    shutil.copytree(curated.queue, queue)
    proc = ServeProcess(tiny_model, queue, tmp_path / "serve.log").start()
    try:
        paths = sorted({m["path"] for item in proc.get("/api/queue")[1]["items"] for m in item["members"]})
        token = {TOKEN: _token(proc)}
        acked, in_flight, lock, enough = [], [], threading.Lock(), threading.Event()

        def post(worker: int) -> None:  # four tabs, each deciding its own files over and over
            mine = paths[worker::4]
            for n in range(10_000):
                path = mine[n % len(mine)]
                action = ("keep", "remove", "relabel")[n % 3]
                body = {"path": path, "action": action, "label": LABELS[n % 3], "note": f"w{worker}-{n}"}
                with lock:
                    in_flight.append(body["note"])
                try:
                    status, _ = proc.request("POST", "/api/decisions", body, token, timeout=10)
                except OSError:
                    return  # the server is gone
                with lock:
                    if status == 200:
                        acked.append(body["note"])
                    if len(acked) >= 60:
                        enough.set()

        workers = [threading.Thread(target=post, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        assert enough.wait(120), "the burst did not get 60 decisions acknowledged"
        proc.kill()
        for w in workers:
            w.join(30)
        events, skipped = read_journal(queue / JOURNAL)
        journalled = [e.note for e in events]
        assert set(acked) <= set(journalled)  # every acknowledged decision survived the kill
        assert set(journalled) <= set(in_flight) and len(journalled) == len(set(journalled))
        proc.start()  # a restart rebuilds decisions.csv from the journal and serves the same state
        served = proc.get("/api/queue")[1]["decisions"]
        assert {p: d["note"] for p, d in served.items()} == {p: d.note for p, d in replay(events).items()}
        with open(queue / DECISIONS_CSV, newline="", encoding="utf-8") as fh:
            assert {r["path"]: r["note"] for r in csv.DictReader(fh)} == {p: d["note"] for p, d in served.items()}
    finally:
        proc.stop()
    done = relabel(str(queue / DECISIONS_CSV), str(curated.manifest), dry_run=True)
    assert len(done.changes) == len(served) == len(paths) and skipped == []


def test_json_nested_thousands_deep_is_a_400_not_a_500(server):
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    req = urllib.request.Request(server.url + "/api/decisions", data=deep, method="POST",
                                 headers={"Content-Type": "application/json", TOKEN: _token(server)})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            status = res.status
    except urllib.error.HTTPError as err:
        status = err.code
    assert status == 400


def test_a_relabel_to_a_model_label_the_manifest_lacks_applies(curated, tiny_model, tmp_path):
    """The page offers the model's labels; one the manifest has no file of yet must apply, not be
    acknowledged and then refused by every Apply."""
    import pyarrow.parquet as pq

    root = tmp_path / "copy"
    shutil.copytree(curated.queue.parent, root)  # images, manifest, queue: summary.json names the manifest
    queue = root / curated.queue.name
    manifest = root / curated.manifest.name
    summary = json.loads((queue / "summary.json").read_text())
    summary["manifest"] = str(manifest)
    (queue / "summary.json").write_text(json.dumps(summary))
    table = pq.read_table(manifest)
    missing = LABELS[2]
    labels = [LABELS[1] if v == missing else v for v in table["label"].to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), manifest)
    proc = ServeProcess(tiny_model, queue, root / "serve.log")
    try:
        proc.start()
        token = {TOKEN: _token(proc)}
        path = proc.get("/api/queue")[1]["items"][0]["path"]
        assert proc.request("POST", "/api/decisions", {"path": path, "action": "relabel", "label": missing},
                            token)[0] == 200
        status, answer = proc.request("POST", "/api/apply?dry_run=1", None, token)
        assert status == 200, answer
        assert [c["new_label"] for c in answer["changes"]] == [missing]
    finally:
        proc.stop()
