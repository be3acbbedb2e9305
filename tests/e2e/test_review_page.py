"""The review page in a real browser (headless Chromium driven by Playwright): the static review.html
that curate --html writes, reviewed by keyboard from disk, and the page's server mode against a
stand-in for the server's two endpoints (dinobatch serve's own tests drive the real process)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.curation.curate import CurateConfig, curate
from dinobatch.curation.decisions import Decision, csv_text
from dinobatch.curation.review import render_review_page, review_document, write_outputs
from tests.e2e.test_curation import _planted

NOW = "2026-12-04T10:00:00+00:00"


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("DINOBATCH_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium is required here (DINOBATCH_REQUIRE_BROWSER) but not installed")
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh browser profile (its own localStorage) and a page that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.clock.set_fixed_time(NOW)
    yield page
    context.close()
    assert not errors, errors


def _artefact(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("DINOBATCH_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def test_static_page_review_by_keyboard_undo_reload_and_download_what_relabel_takes(page, tmp_path):
    predictions, manifest = _planted(tmp_path)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(manifest)))
    html = write_outputs(result, tmp_path / "q", html_page=True)["review.html"]
    _open(page, html.as_uri())
    assert page.text_content("#progress") == "0 of 11 reviewed"
    assert page.locator("#apply").is_hidden() and page.locator("#download").is_visible()  # no server to apply
    page.fill("#reviewer", "ana")
    page.locator("#item").focus()  # the name is stored when the field is left
    assert "mislabelled.png" in page.text_content("#item")
    page.keyboard.press("r")
    page.keyboard.type("tri")
    page.keyboard.press("Enter")  # relabel: three letters of the label, then Enter
    group = page.text_content("#item")
    assert "conflict_a.png" in group and "conflict_b.png" in group  # the group once, both copies side by side
    page.keyboard.press("k")  # conflict_a
    page.keyboard.press("x")  # conflict_b, the next copy of the same item
    for key in "kkxkx":  # leak_a, leak_b, broken, scene_1, scene_2
        page.keyboard.press(key)
    page.keyboard.press("u")  # takes back scene_2's remove, and shows it again
    assert "scene_2.png" in page.text_content("#item")
    page.keyboard.press("k")
    page.keyboard.press("n")
    page.keyboard.type('far off, "odd"')
    page.keyboard.press("Enter")
    page.keyboard.press("k")  # odd_one, with the note
    assert page.text_content("#progress") == "7 of 11 reviewed"
    page.keyboard.press("A")  # Apply's key does nothing here
    assert page.locator("#apply-dialog[open]").count() == 0 and page.text_content("#progress") == "7 of 11 reviewed"
    _artefact(page, "review-static.png", tmp_path)

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#progress") == "7 of 11 reviewed"
    assert "blank.png" in page.text_content("#item")  # resumes at the first item not reviewed
    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename == "decisions.csv"
    got = Path(download.path()).read_bytes()

    plan = [("mislabelled.png", "relabel", "triceratops", ""), ("conflict_a.png", "keep", "", ""),
            ("conflict_b.png", "remove", "", ""), ("leak_a.png", "keep", "", ""), ("leak_b.png", "keep", "", ""),
            ("broken.png", "remove", "", ""), ("scene_1.png", "keep", "", ""), ("scene_2.png", "keep", "", ""),
            ("odd_one.png", "keep", "", 'far off, "odd"')]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["path", "action", "label", "note", "reviewer", "decided_at"])
    writer.writerows([*row, "ana", NOW] for row in plan)
    assert got == buf.getvalue().encode("utf-8")
    # the same bytes as the server writes for the same decisions
    assert got.decode("utf-8") == csv_text({p: Decision(p, a, label, note, "ana", NOW) for p, a, label, note in plan})
    (tmp_path / "decisions.csv").write_bytes(got)
    dry = CliRunner().invoke(cli, ["relabel", str(tmp_path / "decisions.csv"), "--manifest", str(manifest),
                                   "--dry-run"], catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert "mislabelled.png: stegosaurus -> triceratops" in dry.output and "9 decisions; dry run" in dry.output


def test_filters_long_paths_and_hostile_names_in_the_static_page(page, tmp_path):
    predictions, _ = _planted(tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "photos"
    hostile = "<img src=x onerror=window.pwned=1>.png"
    comment = "<!--<script>x.png"  # opens the HTML parser's double-escaped state inside a script
    long = "a_very_long_folder_name_that_goes_on_" * 4 + ".png"
    (folder / "tiny.png").rename(folder / hostile)
    (folder / "strip.png").rename(folder / long)
    (folder / "blank.png").rename(folder / comment)
    rows_file = next(predictions.glob("*.parquet"))
    table = pq.read_table(rows_file)
    names = {"tiny.png": hostile, "strip.png": long, "blank.png": comment}
    paths = [names.get(p, p) for p in table["path"].to_pylist()]
    pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths)), rows_file)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q")))
    html = write_outputs(result, tmp_path / "q", html_page=True)["review.html"]
    assert "<!--<script>" not in html.read_text()
    _open(page, html.as_uri())
    page.select_option("#reason-filter", "nearly_blank")
    assert comment in page.text_content("#item")
    page.select_option("#reason-filter", "tiny")
    assert page.text_content("#item").count(hostile) >= 1  # shown as text
    assert page.evaluate("window.pwned") is None
    assert page.locator(".meta").text_content().startswith("item 1 of 1")
    page.select_option("#reason-filter", "extreme_aspect")
    path = page.locator(".member .path")
    assert path.get_attribute("title") == long
    card, text = page.locator(".member").bounding_box(), path.bounding_box()
    assert text["x"] + text["width"] <= card["x"] + card["width"]  # wraps inside its card, never over a neighbour
    full = page.locator(".member a", has_text="full size")
    assert full.get_attribute("href") == (folder / long).as_uri()
    page.keyboard.press("x")  # the filter's item is decided; the progress counts the whole queue
    assert page.text_content("#progress") == f"1 of {len(review_document(tmp_path / 'q', lambda p: (None, None))['items'])} reviewed"


def test_static_page_shows_the_summary_groups_once_and_small_thumbnails(page, tmp_path):
    predictions, manifest = _planted(tmp_path)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(manifest)))
    html = write_outputs(result, tmp_path / "q", html_page=True)["review.html"]
    _open(page, html.as_uri())
    page.click("#summary summary")
    summary = page.text_content("#summary-body")
    assert f"{result.images} images, {len(result.queue)} flagged; this review shows 11 items" in summary
    assert "mislabelled.png" in page.text_content("#item") and "triceratops" in page.text_content(".meta")
    page.select_option("#label-filter", "stegosaurus")
    count = int(page.locator(".meta span").first.text_content().split(" of ")[1])
    seen = []
    for _ in range(count):  # every item the filter lets through, once each
        seen.append(page.locator(".member .path").all_text_contents())
        page.keyboard.press("j")
    members = [p for item in seen for p in item]
    assert ["conflict_a.png", "conflict_b.png"] in seen and members.count("conflict_a.png") == 1  # a group once
    thumbs = sorted((tmp_path / "q" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 13 and all(t.stat().st_size < 20_000 for t in thumbs)  # every member's, 160 px
    assert page.locator(".member img").first.get_attribute("data-thumb").startswith("thumbs/")


def _serve_stand_in(page, document, decisions, *, fail: bool):
    """/review, /api/queue and /api/decisions answered in the browser, to see what the page sends and shows."""
    posted: list[dict] = []
    html = render_review_page(None, mode="server", token="secret-token")
    page.route("http://dinobatch.test/review", lambda route: route.fulfill(body=html, content_type="text/html"))
    page.route("http://dinobatch.test/api/queue", lambda route: route.fulfill(
        body=json.dumps({**document, "decisions": decisions}), content_type="application/json"))

    def decide(route):
        posted.append({"body": json.loads(route.request.post_data), "token": route.request.headers.get("x-dinobatch-token")})
        if fail:
            route.fulfill(status=507, body=json.dumps({"detail": "disk full"}), content_type="application/json")
        else:
            route.fulfill(body=json.dumps({"reviewed": 1, "total": 2}), content_type="application/json")
    page.route("http://dinobatch.test/api/decisions", decide)
    return posted


def _two_items(tmp_path):
    predictions, manifest = _planted(tmp_path)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(manifest)))
    write_outputs(result, tmp_path / "q", html_page=False)
    return review_document(tmp_path / "q", lambda p: (None, None))


def test_server_mode_resumes_posts_with_the_token_and_never_pretends_a_failed_post_was_saved(page, tmp_path):
    document = _two_items(tmp_path)
    first = document["items"][0]["path"]
    done = {first: {"action": "keep", "label": "", "note": "", "reviewer": "ana", "decided_at": NOW}}
    posted = _serve_stand_in(page, document, done, fail=True)
    _open(page, "http://dinobatch.test/review")
    total = len(document["items"])
    assert page.text_content("#progress") == f"1 of {total} reviewed"
    assert document["items"][1]["members"][0]["path"] in page.text_content("#item")  # resumed after the decided one
    page.keyboard.press("k")
    page.wait_for_selector("#banner:not([hidden])")
    assert "Not saved" in page.text_content("#banner") and "disk full" in page.text_content("#banner")
    assert page.text_content("#progress") == f"1 of {total} reviewed"  # not counted
    assert posted == [{"body": {"path": document["items"][1]["members"][0]["path"], "action": "keep", "label": "",
                                "note": ""}, "token": "secret-token"}]
    _artefact(page, "review-server-error.png", tmp_path)


def test_server_mode_apply_shows_the_dry_run_first_and_the_servers_refusal_as_a_banner(page, tmp_path):
    document = _two_items(tmp_path)
    _serve_stand_in(page, document, {}, fail=False)
    changes = [{"path": f"dir/file_{i}.png", "action": ("keep", "relabel", "remove")[i % 3], "old_label": "stegosaurus",
                "new_label": "triceratops" if i % 3 == 1 else None, "note": ""} for i in range(12)]
    applies: list[tuple[str, str | None]] = []

    def apply(route):
        dry = route.request.url.endswith("?dry_run=1")
        applies.append(("dry run" if dry else "apply", route.request.headers.get("x-dinobatch-token")))
        if dry:
            route.fulfill(body=json.dumps({"dry_run": True, "outcome": "dry run", "manifest": "/data/m.parquet",
                                           "new_manifest": None, "counts": {"keep": 4, "relabel": 4, "remove": 4},
                                           "changes": changes}), content_type="application/json")
        else:
            route.fulfill(status=409, body=json.dumps({"error": "the manifest /data/m.parquet is held by another "
                                                                "relabel"}), content_type="application/json")
    page.route(re.compile(r"http://dinobatch\.test/api/apply(\?.*)?$"), apply)
    _open(page, "http://dinobatch.test/review")
    page.click("#apply")
    page.wait_for_selector("#apply-dialog[open]")
    assert page.text_content("#apply-counts") == "4 keep · 4 relabel · 4 remove"
    assert page.locator("#apply-changes li").count() == 10 and "… and 2 more" in page.text_content("#apply-body")
    assert "stegosaurus → triceratops" in page.text_content("#apply-changes li:nth-child(2)")
    page.click("#apply-cancel")  # nothing applied
    assert page.locator("#apply-dialog[open]").count() == 0 and applies == [("dry run", "secret-token")]
    page.keyboard.press("k")  # the keys work again once the dialog is closed
    page.wait_for_function("() => document.querySelector('#progress').textContent.startsWith('1 of')")
    page.keyboard.press("A")
    page.wait_for_selector("#apply-dialog[open]")
    page.keyboard.press("k")  # no decision behind the dialog
    page.click("#apply-confirm")
    page.wait_for_selector("#banner:not([hidden])")
    banner = page.text_content("#banner")
    assert "Not applied" in banner and "HTTP 409" in banner and "held by another relabel" in banner
    assert page.locator("#applied").is_hidden() and page.locator("#apply-dialog[open]").count() == 0
    assert applies == [("dry run", "secret-token"), ("dry run", "secret-token"), ("apply", "secret-token")]
    assert page.text_content("#progress").startswith("1 of")
