"""Stage rows as pure functions: one row per file in path order, errors as rows, duplicates carrying
the kept file's prediction, and the counts the summary gives (returned, not filled in on the side)."""

from __future__ import annotations

import pyarrow as pa

from dinobatch.schema import Col, cache_schema, walk_schema
from dinobatch.stages.decode import CHANGED
from dinobatch.stages.group import duplicates
from dinobatch.stages.rows import MISSING, FileOutcomes, RowContext, file_errors, path_order, row_batches, row_stats
from tests.helpers import LABELS


def _files(names_and_errors) -> pa.Table:
    return pa.Table.from_pylist([{Col.PATH: n, Col.ABSPATH: f"/in/{n}".encode(), Col.BYTES: 10, Col.MTIME_NS: 10**18,
                                  Col.CTIME_NS: 10**18, Col.INODE: i, Col.ERROR: e}
                                 for i, (n, e) in enumerate(names_and_errors)], schema=walk_schema())


def _content(sha, label, size, phash) -> dict:
    probs = [0.1, 0.1, 0.1]
    probs[LABELS.index(label)] = 0.8
    return {Col.SHA256: sha, Col.FORMAT: "PNG", Col.WIDTH: size, Col.HEIGHT: size, Col.MODE: "RGB",
            Col.PHASH: phash, Col.DHASH: "0000000000000000", Col.LABEL: label, Col.CONFIDENCE: 0.8,
            Col.PROBS: probs, Col.MARGIN: 0.7, Col.ENTROPY: 0.6, Col.EMBEDDING: [1.0]}


def _outcomes():
    files = _files([("f.png", None), ("b.png", None), ("a.png", None), ("c.png", None), ("d.png", "cannot read file: x"),
                     ("e.png", None)])
    shas = pa.chunked_array([["s4", "small", "big", "s2", None, "s3"]], pa.string())
    content = pa.Table.from_pylist([_content("big", "triceratops", 200, "0000000000000000"),
                                    _content("small", "velociraptor", 100, "0000000000000001"),
                                    _content("s3", "stegosaurus", 100, "ffffffffffffffff")], schema=cache_schema())
    errors, own = file_errors(shas, files[Col.ERROR], abspaths=files[Col.ABSPATH], changed=pa.array([b"/in/e.png"]),
                              failed=pa.table({Col.SHA256: ["s2"], Col.ERROR: ["not an image"]}), content=content)
    order = path_order(files)
    groups = duplicates(content, own, order, phash_max=8, dhash_max=3)
    return FileOutcomes(files=files, shas=shas, errors=errors, own=own, groups=groups, order=order), content


def test_every_file_gets_its_own_error_its_content_s_or_a_missing_prediction():
    outcomes, _ = _outcomes()
    assert outcomes.errors.to_pylist() == [MISSING, None, None, "not an image", "cannot read file: x", CHANGED]
    assert outcomes.own.tolist() == [-1, 1, 0, -1, -1, -1]  # e.png's content is cached, but e.png changed


def test_one_row_per_file_in_path_order_duplicates_carry_the_kept_prediction():
    outcomes, content = _outcomes()
    ctx = RowContext(run_id="r1", model_name="m.pt", model_fingerprint="f" * 64, labels=LABELS, top_k=2,
                     embeddings=False, species={"triceratops": {Col.SPECIES_COMMON_NAME: "Three-horned face"}})
    rows = pa.Table.from_batches(list(row_batches(outcomes, content, ctx))).to_pylist()
    assert [r[Col.PATH] for r in rows] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    a, b = rows[0], rows[1]
    assert (a[Col.STATUS], a[Col.LABEL], a[Col.TOPK_LABELS]) == ("ok", "triceratops", ["triceratops", "stegosaurus"])
    assert a[Col.SPECIES_COMMON_NAME] == "Three-horned face" and a[Col.EMBEDDING] is None and a[Col.RUN_ID] == "r1"
    # a near duplicate: its own facts, the kept file's prediction
    assert (b[Col.STATUS], b[Col.DUPLICATE_OF], b[Col.DUPLICATE_KIND]) == ("duplicate", "a.png", "near")
    assert (b[Col.WIDTH], b[Col.LABEL]) == (100, "triceratops")
    assert a[Col.DUPLICATE_GROUP] == b[Col.DUPLICATE_GROUP] == 0
    for r in rows[2:]:
        assert r[Col.STATUS] == "error" and r[Col.ERROR] and r[Col.LABEL] is None and r[Col.WIDTH] is None
    assert rows[3][Col.SHA256] is None and rows[2][Col.SHA256] == "s2"


def test_the_counts_and_first_errors_are_returned_with_the_groups():
    outcomes, _ = _outcomes()
    stats = row_stats(outcomes)
    assert stats.counts == {"ok": 1, "duplicate": 1, "error": 4} and stats.groups == 1
    assert [e["path"] for e in stats.errors] == ["c.png", "d.png", "e.png", "f.png"]
    assert stats.errors[0] == {"path": "c.png", "error": "not an image"}
