"""Curation: each reason on data where the answer is known, decisions applied without loss, export by
copying, and similar-species lookup. The review page in a real browser: test_review_page.py."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from dinobatch.cli.main import cli
from dinobatch.config import ClassifyConfig
from dinobatch.curation.curate import CurateConfig, confident_learning, curate
from dinobatch.curation.relabel import relabel
from dinobatch.errors import EXIT_THRESHOLD, DataError
from dinobatch.io.walk import sha256_file
from dinobatch.jobs.classify import classify, new_run_id
from dinobatch.schema import row_schema, schema_metadata
from dinobatch.store.results import ResultsDir
from dinobatch.training.manifest import build_manifest, load_manifest, write_manifest
from tests.helpers import REPO, picture, save, tree_digest

LABELS = ["stegosaurus", "triceratops", "velociraptor"]


@pytest.mark.parametrize("method", ["confident_learning", "prune_by_noise_rate"])
def test_confident_learning_finds_the_planted_label_error(method):
    probs = np.array([[0.8, 0.1, 0.1]] * 5 + [[0.1, 0.8, 0.1]] * 5 + [[0.05, 0.9, 0.05]])
    given = np.array([0] * 5 + [1] * 5 + [0])  # the last one is labelled 0 but is clearly 1
    issue, suggested, score = confident_learning(probs, given, method=method)
    assert issue.tolist() == [False] * 10 + [True]
    assert suggested[-1] == 1 and score[-1] == pytest.approx(0.95)


def test_prune_by_noise_rate_flags_about_as_many_as_the_noise_and_mostly_the_flipped():
    rng = np.random.default_rng(0)
    n, c = 300, 3
    true = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c), n) * 0.4
    probs[np.arange(n), true] += 0.6
    given = true.copy()
    flipped = rng.choice(n, 30, replace=False)
    given[flipped] = (true[flipped] + 1) % c
    pruned, _, _ = confident_learning(probs, given, method="prune_by_noise_rate")
    assert abs(int(pruned.sum()) - 30) <= 6  # about as many as the labels that were flipped
    assert len(set(np.nonzero(pruned)[0]) & set(flipped)) >= 24


def _planted(tmp_path):
    """A classify output folder and a manifest where every curation reason has one known answer."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    rows, manifest_lines = [], ["path,label,split"]

    def add(name, label, split, probs, *, emb=None, group=None, dup_of=None, size=(160, 120), dhash=None,
            status="ok", error=None, seed=None):
        path = save(picture(seed if seed is not None else len(rows) + 1, size), root / name)
        p = np.array(probs, dtype=np.float32)
        e = emb if emb is not None else centres[LABELS.index(label)] + rng.normal(scale=0.8, size=32)
        rows.append({"run_id": "r", "path": name, "bytes": path.stat().st_size, "sha256": sha256_file(str(path)),
                     "status": status, "error": error, "format": "PNG", "width": size[0], "height": size[1],
                     "mode": "RGB", "phash": "8f0f0f0f0f0f0f0f", "dhash": dhash or "f0f0f0f0f0f0f0f0",
                     "duplicate_of": dup_of, "duplicate_kind": "exact" if dup_of else None, "duplicate_group": group,
                     "model": "m", "model_fingerprint": "f" * 64,
                     "label": None if status == "error" else LABELS[int(p.argmax())],
                     "confidence": None if status == "error" else float(p.max()),
                     "topk_labels": None, "topk_probs": None, "probs": None if status == "error" else p.tolist(),
                     "margin": None, "entropy": None,
                     "embedding": None if status == "error" else e.astype(np.float32).tolist()})
        manifest_lines.append(f"{name},{label},{split}")

    for i in range(8):
        for k, label in enumerate(LABELS):
            probs = [0.1, 0.1, 0.1]
            probs[k] = 0.8
            add(f"{label}_{i}.png", label, "train", probs)
    add("mislabelled.png", "stegosaurus", "train", [0.03, 0.94, 0.03])
    add("unsure.png", "velociraptor", "train", [0.3, 0.3, 0.4])
    add("conflict_a.png", "stegosaurus", "train", [0.8, 0.1, 0.1], group=1, seed=500)
    add("conflict_b.png", "triceratops", "train", [0.8, 0.1, 0.1], group=1, dup_of="conflict_a.png", seed=501)
    add("leak_a.png", "triceratops", "train", [0.1, 0.8, 0.1], group=2, seed=600)
    add("leak_b.png", "triceratops", "test", [0.1, 0.8, 0.1], group=2, dup_of="leak_a.png", seed=601)
    twin = centres[2] + rng.normal(scale=0.3, size=32)
    add("scene_1.png", "velociraptor", "train", [0.1, 0.1, 0.8], emb=twin)
    add("scene_2.png", "velociraptor", "train", [0.1, 0.1, 0.8], emb=twin + 0.001)
    add("odd_one.png", "stegosaurus", "train", [0.8, 0.1, 0.1], emb=-centres.sum(axis=0) * 3)
    add("tiny.png", "triceratops", "train", [0.1, 0.8, 0.1], size=(20, 20))
    add("strip.png", "triceratops", "train", [0.1, 0.8, 0.1], size=(800, 100))
    add("blank.png", "triceratops", "train", [0.1, 0.8, 0.1], dhash="0000000000000000")
    add("broken.png", "triceratops", "train", [0.1, 0.8, 0.1], status="error", error="truncated image")
    out = ResultsDir(tmp_path / "results")
    out.ensure()
    meta = schema_metadata(version="t", model_name="m", model_fingerprint="f" * 64, labels=LABELS, folder=str(root))
    schema = row_schema(meta)
    run_id = new_run_id(datetime.now(timezone.utc))
    out.write_rows(run_id, [pa.Table.from_pylist(rows, schema=schema).to_batches()[0]], schema)
    out.write_summary(run_id, {"run_id": run_id, "config": {"folder": str(root)}})
    (tmp_path / "labels.csv").write_text("\n".join(manifest_lines) + "\n")
    shutil.move(str(tmp_path / "labels.csv"), root / "labels.csv")
    return tmp_path / "results", root / "labels.csv"


def test_each_reason_flags_exactly_the_planted_images(tmp_path):
    predictions, manifest = _planted(tmp_path)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(manifest)))
    flagged = {q["path"]: q for q in result.queue}

    def having(reason):
        return {p for p, q in flagged.items() if reason in q["reasons"]}

    # conflict_b is a copy of conflict_a (it carries conflict_a's prediction) labelled otherwise: both finds are right
    assert having("label_error") == {"mislabelled.png", "conflict_b.png"}
    assert flagged["mislabelled.png"]["suggested_label"] == "triceratops"
    assert having("low_confidence") == {"unsure.png"}
    assert having("duplicate_label_conflict") == {"conflict_a.png", "conflict_b.png"}
    assert having("duplicate_split_leak") == {"leak_a.png", "leak_b.png"}
    assert having("embedding_near_duplicate") == {"scene_1.png", "scene_2.png"}
    assert having("outlier") == {"odd_one.png"}
    assert having("tiny") == {"tiny.png"} and having("extreme_aspect") == {"strip.png"}
    assert having("nearly_blank") == {"blank.png"} and having("unreadable") == {"broken.png"}
    scores = [q["score"] for q in result.queue]
    assert scores == sorted(scores, reverse=True)  # most urgent first
    assert result.queue[0]["path"] in {"mislabelled.png", "leak_a.png", "leak_b.png"}


def test_without_a_manifest_only_label_free_reasons_are_used(tmp_path):
    predictions, _ = _planted(tmp_path)
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q")))
    reasons = {r for q in result.queue for r in q["reasons"]}
    assert "low_confidence" in reasons and "outlier" in reasons and "unreadable" in reasons
    assert not reasons & {"label_error", "duplicate_label_conflict", "duplicate_split_leak"}


def test_fail_on_exits_non_zero_after_writing_the_queue(tmp_path):
    predictions, manifest = _planted(tmp_path)
    runner = CliRunner()
    args = ["curate", str(predictions), "--manifest", str(manifest), "-o", str(tmp_path / "q")]
    ok = runner.invoke(cli, args + ["--fail-on", "label_error=0.5"], catch_exceptions=False)
    assert ok.exit_code == 0
    bad = runner.invoke(cli, args + ["--fail-on", "label_error=1%"])
    assert bad.exit_code == EXIT_THRESHOLD and "threshold passed: label_error" in bad.output
    with open(tmp_path / "q" / "queue.csv", newline="") as fh:
        queue = list(csv.DictReader(fh))
    assert queue[0]["score"] and any(q["path"] == "mislabelled.png" for q in queue)


def test_relabel_writes_a_new_version_and_an_audit_log_and_never_touches_images(tmp_path):
    root = tmp_path / "data"
    for i, label in enumerate(LABELS):
        save(picture(i), root / label / "a.png")
        save(picture(10 + i), root / label / "b.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    before = tree_digest(root)
    decisions = tmp_path / "d.csv"
    decisions.write_text("path,action,label,note\nstegosaurus/a.png,relabel,triceratops,horns visible\n"
                         "triceratops/b.png,remove,,blurry\nvelociraptor/a.png,keep,,\n")
    new = relabel(str(decisions), str(tmp_path / "m.parquet"), user="tester").target
    assert new == tmp_path / "m.v2.parquet" and (tmp_path / "m.parquet").exists()
    rows = {r["path"]: r for r in load_manifest(new).table.to_pylist()}
    assert rows["stegosaurus/a.png"]["label"] == "triceratops"
    assert rows["triceratops/b.png"]["status"] == "removed" and rows["triceratops/b.png"]["split"] is None
    assert "triceratops/b.png" not in {r["path"] for r in load_manifest(new).rows()}
    with open(tmp_path / "m.audit.csv", newline="") as fh:
        audit = list(csv.DictReader(fh))
    assert [(a["path"], a["action"], a["old_label"], a["new_label"], a["user"]) for a in audit] == [
        ("stegosaurus/a.png", "relabel", "stegosaurus", "triceratops", "tester"),
        ("triceratops/b.png", "remove", "triceratops", "", "tester"),
        ("velociraptor/a.png", "keep", "velociraptor", "", "tester")]
    assert datetime.fromisoformat(audit[0]["time"]).tzinfo == timezone.utc
    assert tree_digest(root) == before


@pytest.mark.parametrize("content, message", [
    ("path,action\nstegosaurus/a.png,keep\n../outside.png,remove\n", "line 3, column path: ../outside.png is outside the dataset root"),
    ("path,action\nstegosaurus/a.png,keep\n/etc/passwd,remove\n", "line 3, column path: /etc/passwd is outside the dataset root"),
    ("path,action\nstegosaurus/a.png,keep\nstegosaurus/zzz.png,remove\n", "line 3, column path: stegosaurus/zzz.png is not in the manifest"),
    ("path,action\nstegosaurus/a.png,remove\nstegosaurus/a.png,keep\n", "line 3, column path: stegosaurus/a.png was already decided on line 2"),
    ("path,action\nstegosaurus/a.png,keep\ntriceratops/a.png,delete\n", "line 3, column action: unknown action 'delete'"),
    ("path,action,label\nstegosaurus/a.png,relabel,\n", "line 2, column label: relabel needs a label"),
    ("path,label\nstegosaurus/a.png,x\n", "missing column(s) action"),
    (b"path,action,note\nstegosaurus/a.png,keep,caf\xe9\n", "not UTF-8"),
])
def test_bad_decisions_are_refused_whole_and_nothing_is_written(tmp_path, content, message):
    root = tmp_path / "data"
    save(picture(1), root / "stegosaurus" / "a.png")
    save(picture(2), root / "triceratops" / "a.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    decisions = tmp_path / "d.csv"
    decisions.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        relabel(str(decisions), str(tmp_path / "m.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "data", "m.parquet"]


def test_relabel_dry_run_prints_and_writes_nothing(tmp_path):
    root = tmp_path / "data"
    save(picture(1), root / "stegosaurus" / "a.png")
    save(picture(2), root / "triceratops" / "a.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    (tmp_path / "d.csv").write_text("path,action,label\nstegosaurus/a.png,relabel,triceratops\n")
    out = CliRunner().invoke(cli, ["relabel", str(tmp_path / "d.csv"), "--manifest", str(tmp_path / "m.parquet"),
                                   "--dry-run"], catch_exceptions=False)
    assert out.exit_code == 0 and "relabel  stegosaurus/a.png: stegosaurus -> triceratops" in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "data", "m.parquet"]


def test_classify_curate_html_export_and_similar_end_to_end(tmp_path, inbox, tiny_model):
    folder = inbox["a.jpg"].parent
    before = tree_digest(folder)
    summary = classify(ClassifyConfig(folder=str(folder), out=str(tmp_path / "res"), model=str(tiny_model),
                                      workers=0, embeddings=True))
    runner = CliRunner()
    cur = runner.invoke(cli, ["curate", str(tmp_path / "res"), "-o", str(tmp_path / "q"), "--html"],
                        catch_exceptions=False)
    assert cur.exit_code == 0 and (tmp_path / "q" / "review.html").is_file()
    queue = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert queue["images"] == summary.files and queue["counts"]["unreadable"] == summary.counts["error"]
    exp = runner.invoke(cli, ["export", str(tmp_path / "res"), "--to", str(tmp_path / "sorted"),
                              "--min-confidence", "0.5"], catch_exceptions=False)
    assert exp.exit_code == 0
    copied = sorted(p.relative_to(tmp_path / "sorted").as_posix() for p in (tmp_path / "sorted").rglob("*") if p.is_file())
    assert len(copied) == summary.files and "_review/truncated.jpg" in copied
    assert tree_digest(folder) == before  # copies, never moves
    ref = tmp_path / "ref"
    for i, label in enumerate(("triceratops", "stegosaurus")):
        for j in range(3):
            save(picture(40 + 10 * i + j), ref / label / f"{j}.png")
    write_manifest(build_manifest(ref, seed=0), tmp_path / "ref.parquet", ref)
    cache = tmp_path / "cache"
    args = ["similar", str(ref / "triceratops" / "0.png"), str(inbox["b.png"]), "-m", str(tiny_model),
            "--reference", str(tmp_path / "ref.parquet"), "--cache", str(cache), "--json",
            "--species", str(REPO / "manifests" / "species.csv")]
    first = json.loads(runner.invoke(cli, args, catch_exceptions=False).stdout)
    assert first[0]["nearest"][0]["path"] == "triceratops/0.png" and first[0]["nearest"][0]["similarity"] > 0.999
    assert len(first[1]["species"]) == 2 and first[1]["species"][0]["species_common_name"]
    assert len(list(cache.glob("*.parquet"))) == 1
    second = json.loads(runner.invoke(cli, args, catch_exceptions=False).stdout)
    assert second == first  # served from the cache, same answer


def test_manifest_paths_that_differ_from_the_classified_folder_still_match_and_copies_conflict(tmp_path):
    predictions, manifest = _planted(tmp_path)
    lines = manifest.read_text().splitlines()
    absolute = [lines[0]] + [f"{manifest.parent / line.split(',', 1)[0]},{line.split(',', 1)[1]}" for line in lines[1:]]
    absolute.append(f"{manifest.parent / 'tiny.png'},velociraptor,test")  # the same file listed twice
    elsewhere = tmp_path / "labels-elsewhere.csv"
    elsewhere.write_text("\n".join(absolute) + "\n")
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(elsewhere)))
    flagged = {q["path"]: q["reasons"] for q in result.queue}
    assert "duplicate_split_leak" in flagged["leak_b.png"] and "label_error" in flagged["mislabelled.png"]
    assert {"duplicate_label_conflict", "duplicate_split_leak"} <= set(flagged["tiny.png"])


def test_labels_the_model_does_not_know_are_reported(tmp_path):
    predictions, manifest = _planted(tmp_path)
    manifest.write_text(manifest.read_text().replace("unsure.png,velociraptor", "unsure.png,Velociraptor"))
    result = curate(CurateConfig(predictions=str(predictions), out=str(tmp_path / "q"), manifest=str(manifest)))
    assert [q["path"] for q in result.queue if "unknown_label" in q["reasons"]] == ["unsure.png"]


def test_agrees_with_cleanlab_on_the_same_probabilities():
    filt = pytest.importorskip("cleanlab.filter", reason="cleanlab is in the dev extra: pip install -e '.[dev]'")
    rng = np.random.default_rng(3)
    n, c = 400, 4
    true = rng.integers(0, c, n)
    probs = rng.dirichlet(np.ones(c) * 0.7, n) * 0.5
    probs[np.arange(n), true] += 0.5
    given = true.copy()
    flipped = rng.choice(n, 40, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, c, 40)) % c
    for method in ("confident_learning", "prune_by_noise_rate"):
        ours = set(np.nonzero(confident_learning(probs, given, method=method)[0])[0])
        theirs = set(np.nonzero(filt.find_label_issues(given, probs, filter_by=method))[0])
        assert len(ours ^ theirs) <= 0.1 * max(len(theirs), 1), (method, len(ours), len(theirs))


def test_relabel_takes_rows_not_link_targets_and_normalises_spellings(tmp_path):
    import os

    root = tmp_path / "data"
    save(picture(1), root / "triceratops" / "a.png")
    save(picture(2), root / "stegosaurus" / "b.png")
    os.symlink(root / "triceratops" / "a.png", root / "stegosaurus" / "alias.png")
    write_manifest(build_manifest(root, seed=0), tmp_path / "m.parquet", root)
    (tmp_path / "d.csv").write_text("path,action,label\nstegosaurus/alias.png,relabel,velociraptor\n")
    new = relabel(str(tmp_path / "d.csv"), str(tmp_path / "m.parquet"), user="t", new_labels=["velociraptor"]).target
    rows = {r["path"]: r["label"] for r in load_manifest(new).table.to_pylist()}
    assert rows["stegosaurus/alias.png"] == "velociraptor" and rows["triceratops/a.png"] == "triceratops"
    (tmp_path / "d2.csv").write_text("path,action\nstegosaurus/b.png,keep\n./stegosaurus/b.png,remove\n")
    with pytest.raises(DataError, match="already decided on line 2"):
        relabel(str(tmp_path / "d2.csv"), str(tmp_path / "m.parquet"), user="t")


def test_export_never_overwrites_and_a_rerun_copies_nothing_twice(tmp_path, inbox, tiny_model):
    from dinobatch.curation.export import export

    classify(ClassifyConfig(folder=str(inbox["a.jpg"].parent), out=str(tmp_path / "res"), model=str(tiny_model),
                            workers=0))
    first = export(str(tmp_path / "res"), str(tmp_path / "to"), min_confidence=0.0)
    assert sum(first.values()) == 15
    assert export(str(tmp_path / "res"), str(tmp_path / "to"), min_confidence=0.0) == {}
    mine = next(p for p in (tmp_path / "to").rglob("b.png"))
    mine.write_bytes(b"the user's own file")
    again = export(str(tmp_path / "res"), str(tmp_path / "to"), min_confidence=0.0)
    assert again == {"_skipped": 1} and mine.read_bytes() == b"the user's own file"
