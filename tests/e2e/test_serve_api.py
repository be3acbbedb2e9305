"""`dinobatch serve`'s endpoints through HTTP against one real server process: predictions equal
classify's rows, similar equals `dinobatch similar`, awkward uploads are 200 or 400 with a reason,
oversize uploads 413, no path escapes the image registry, state changes need the token."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.training.manifest import build_manifest, write_manifest
from tests.helpers import LABELS, REPO, SHARED_DATA, jpeg_bytes, picture, run_classify, save

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="dinobatch serve needs its extra (pip install -e '.[serve]')")

SPECIES = str(REPO / "manifests" / "species.csv")
MAX_UPLOAD_MB = 2  # every file of the shared weird folder fits; the oversize tests send more
_STARTUP_S = 120


class _Server:
    """A `python -m dinobatch serve` child process, its URL and its log."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "dinobatch", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.log: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    def wait_ready(self) -> str:
        """The base URL once /healthz answers; fails with the server's log otherwise."""
        self._ready.wait(_STARTUP_S)
        deadline = time.monotonic() + _STARTUP_S
        while self.url and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self.url
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("dinobatch serve did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A tiny labelled reference manifest of generated pictures (three per label)."""
    root = tmp_path_factory.mktemp("reference")
    for i, label in enumerate(LABELS):
        for j in range(3):
            save(picture(40 + 10 * i + j), root / "images" / label / f"{j}.png")
    return write_manifest(build_manifest(root / "images", seed=0), root / "ref.parquet", root / "images")


@pytest.fixture(scope="module")
def server(tiny_model, reference, tmp_path_factory):
    """ONE server for the module: the tiny model, the reference manifest, 2 MB uploads."""
    cache = tmp_path_factory.mktemp("embeddings")
    proc = _Server(["-m", str(tiny_model), "--reference", str(reference), "--cache", str(cache),
                    "--species", SPECIES, "--max-upload-mb", str(MAX_UPLOAD_MB)])
    try:
        url = proc.wait_ready()
        with httpx.Client(base_url=url, timeout=60) as client:
            client.cache_dir = cache  # the similar test asks `dinobatch similar` the same, from the same cache
            yield client
    finally:
        proc.stop()


def _post(client, path: Path | str, data: bytes | None = None, endpoint: str = "/api/predict", **params):
    name = Path(path).name
    body = data if data is not None else Path(path).read_bytes()
    return client.post(endpoint, files={"image": (name, body, "application/octet-stream")}, params=params)


def test_health_names_the_model(server, tiny_model):
    health = server.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == tiny_model.name and len(health["model_fingerprint"]) == 64


def test_predictions_equal_classify_rows_for_the_same_files(server, inbox, tiny_model, tmp_path):
    _, rows = run_classify(inbox["a.jpg"].parent, tmp_path / "out", tiny_model)
    own = {path: row for path, row in rows.items() if row["status"] != "duplicate"}  # duplicates carry their keeper's
    assert len(own) >= 10
    precision = server.get("/healthz").json()["precision"]
    for path, row in own.items():
        answer = _post(server, inbox["a.jpg"].parent / path)
        if row["status"] == "error":
            assert answer.status_code == 400 and answer.json() == {"error": row["error"]}, path
            continue
        assert answer.status_code == 200, (path, answer.text)
        got = answer.json()
        assert (got["label"], got["sha256"], got["phash"], got["dhash"]) == (
            row["label"], row["sha256"], row["phash"], row["dhash"]), path
        assert got["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        assert got["precision"] == row["precision"] == precision, path  # what the prediction was made at
        assert [t["label"] for t in got["topk"]] == row["topk_labels"]
        assert [t["prob"] for t in got["topk"]] == pytest.approx(row["topk_probs"], abs=1e-5)
        assert got["species"]["common_name"] == row["species_common_name"]
        assert got["species"]["length_m"] == row["species_length_m"]


def test_similar_equals_the_similar_command(server, reference, tiny_model, inbox):
    image = inbox["b.png"]
    answer = _post(server, image, endpoint="/api/similar", k=4).json()
    args = ["similar", str(image), "-m", str(tiny_model), "--reference", str(reference), "--cache",
            str(server.cache_dir), "--json", "--species", SPECIES, "-k", "4", "--neighbours", "4"]
    expected = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)[0]
    assert [(m["path"], m["label"]) for m in answer["matches"]] == [(n["path"], n["label"]) for n in expected["nearest"]]
    assert [m["similarity"] for m in answer["matches"]] == pytest.approx(
        [n["similarity"] for n in expected["nearest"]], abs=1e-5)
    assert [s["label"] for s in answer["species"]] == [s["label"] for s in expected["species"]]
    best = answer["matches"][0]
    assert best["species"]["common_name"] == expected["species"][0]["species_common_name"] or \
        best["label"] != expected["species"][0]["label"]
    thumb = server.get(best["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    full = server.get(best["full"])
    assert full.content == (reference.parent / "images" / best["path"]).read_bytes()


def test_predict_names_the_reference_images_an_upload_duplicates(server, reference):
    original = reference.parent / "images" / LABELS[1] / "2.png"
    exact = _post(server, original).json()["duplicates"]
    assert exact[0]["path"] == f"{LABELS[1]}/2.png" and exact[0]["kind"] == "exact" and exact[0]["label"] == LABELS[1]
    near = _post(server, "copy.jpg", jpeg_bytes(picture(40 + 10 * 1 + 2).resize((320, 240)))).json()["duplicates"]
    assert [(d["path"], d["kind"]) for d in near] == [(f"{LABELS[1]}/2.png", "near")]
    assert _post(server, "new.jpg", jpeg_bytes(picture(999))).json()["duplicates"] == []


def test_every_awkward_file_is_an_answer_or_a_400_with_its_reason(server):
    weird = SHARED_DATA / "weird"
    if not weird.is_dir():
        pytest.skip(f"the shared test data is not here: {weird} (see CONTRIBUTING.md, Real test data)")
    files = sorted(p for p in weird.iterdir() if p.is_file())
    assert len(files) > 50
    for path in files:
        answer = _post(server, path)
        assert answer.status_code in (200, 400), (path.name, answer.status_code, answer.text)
        body = answer.json()
        assert (body["label"] in LABELS) if answer.status_code == 200 else body["error"].strip(), path.name
    assert server.get("/healthz").status_code == 200  # and the server is still up


def test_an_upload_that_is_no_image_or_no_upload_is_400_with_the_reason(server):
    assert _post(server, "notes.txt", b"not an image\n").json() == {
        "error": "not an image, or a format Pillow cannot identify"}
    assert _post(server, "empty.png", b"").json() == {"error": "empty file (0 bytes)"}
    missing = server.post("/api/predict", files={"photo": ("a.jpg", jpeg_bytes(picture(1)))})
    assert missing.status_code == 400 and "'image'" in missing.json()["error"]
    assert server.post("/api/predict", json={"image": "a.jpg"}).status_code == 400
    bad_k = _post(server, "a.jpg", jpeg_bytes(picture(1)), endpoint="/api/similar", k=0)
    assert bad_k.status_code == 400 and "k must be" in bad_k.json()["error"]


def test_an_upload_over_the_limit_is_413_whether_or_not_it_says_its_length(server):
    big = os.urandom(MAX_UPLOAD_MB * 1_000_000 + 200_000)
    declared = _post(server, "big.jpg", big)
    assert declared.status_code == 413 and "upload too large" in declared.json()["error"]
    boundary = "dinobatchtest"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def chunks():  # no Content-Length: the server must stop reading at the limit by itself
        yield head
        for i in range(0, len(big), 256_000):
            yield big[i:i + 256_000]
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = server.post("/api/predict", content=chunks(),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert streamed.status_code == 413 and "upload too large" in streamed.json()["error"]
    assert _post(server, "a.jpg", jpeg_bytes(picture(1))).status_code == 200  # and it goes on serving


@pytest.mark.parametrize("attempt", ["../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd",
                                     "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd", "%2fetc%2fpasswd",
                                     "..", "%2e%2e", "images/triceratops/0.png", "0" * 24])
@pytest.mark.parametrize("route", ["/api/image/", "/api/thumb/"])
def test_paths_and_unknown_ids_never_reach_a_file(server, route, attempt):
    answer = server.get(route + attempt)
    assert answer.status_code == 404 and b"root:" not in answer.content
    assert answer.headers["content-type"] == "application/json" and "error" in answer.json()


def test_a_symlink_beside_the_reference_images_is_not_served(server, reference, tmp_path):
    from dinobatch.serve.context import ImageRegistry

    secret = tmp_path / "secret.png"
    save(picture(5), secret)
    link = reference.parent / "images" / LABELS[0] / "link.png"
    link.symlink_to(secret)
    try:
        guessed = ImageRegistry().add(link)  # the id that path would get, had the server registered it
        for route in ("/api/image/", "/api/thumb/"):
            assert server.get(route + guessed).status_code == 404
    finally:
        link.unlink()


def test_a_state_changing_request_without_the_token_is_refused(server):
    for method, path in (("POST", "/api/decisions"), ("POST", "/api/apply"), ("PUT", "/api/predict"),
                         ("DELETE", "/api/image/x")):
        answer = server.request(method, path, json={"path": "a.jpg", "action": "keep"})
        assert answer.status_code == 403 and "token" in answer.json()["error"], (method, path)
    wrong = server.post("/api/decisions", headers={"X-Dinobatch-Token": "guess"}, json={})
    assert wrong.status_code == 403


def test_a_request_addressed_to_another_host_name_is_refused(server):
    answer = server.get("/healthz", headers={"Host": "attacker.example:8000"})
    assert answer.status_code == 400 and "127.0.0.1" in answer.json()["error"]


def test_a_served_file_is_never_sent_as_a_page(server, reference):
    from dinobatch.serve.images import content_type

    assert content_type(b"<html><script>alert(1)</script></html>") == "application/octet-stream"
    match = _post(server, reference.parent / "images" / LABELS[0] / "0.png", endpoint="/api/similar").json()
    full = server.get(match["matches"][0]["full"])
    assert full.headers["content-type"] == "image/png" and full.headers["x-content-type-options"] == "nosniff"


def test_concurrent_requests_share_forward_passes(server):
    before = server.get("/healthz").json()["batches"]
    data = io.BytesIO(jpeg_bytes(picture(3))).getvalue()
    url = str(server.base_url)

    def one(_):
        with httpx.Client(base_url=url, timeout=60) as c:
            return _post(c, "a.jpg", data).json()["label"]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(one, range(32)))
    assert len(set(labels)) == 1
    assert server.get("/healthz").json()["batches"] - before < 32
