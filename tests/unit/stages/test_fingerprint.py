"""Stage fingerprint as a pure function: the file index vouches for unchanged files, the rest are read."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa

from dinobatch.io.walk import walk_table
from dinobatch.schema import Col, file_index_schema
from dinobatch.stages.fingerprint import KNOWN_SHA256, fingerprint, with_known_shas
from tests.helpers import picture, save


def _index(files: pa.Table, shas: dict[str, str], **changed) -> pa.Table:
    """A file index holding shas (by path) for the files' stat as walked, with changed columns overriding."""
    rows = []
    for f in files.to_pylist():
        if f[Col.PATH] in shas:
            row = {c: f[c] for c in (Col.ABSPATH, Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE)}
            rows.append({**row, **changed.get(f[Col.PATH], {}), Col.SHA256: shas[f[Col.PATH]]})
    return pa.Table.from_pylist(rows, schema=file_index_schema())


def test_the_index_vouches_where_the_stat_matches_and_the_rest_is_read(tmp_path):
    for name in ("same.png", "touched.png", "new.png"):
        save(picture(len(name)), tmp_path / name)
    files = walk_table(tmp_path)
    real = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("same.png", "touched.png", "new.png")}
    # a sha256 no file has: taken as it is, which proves the file was not read
    index = _index(files, {"same.png": "0" * 64, "touched.png": "1" * 64},
                   **{"touched.png": {Col.MTIME_NS: 1}})
    batch = with_known_shas(files, index)
    assert batch[KNOWN_SHA256].to_pylist() == ["0" * 64 if p == "same.png" else None
                                               for p in files[Col.PATH].to_pylist()]
    out = dict(zip(files[Col.PATH].to_pylist(), fingerprint(batch).to_pylist()))
    assert out["same.png"] == {Col.SHA256: "0" * 64, Col.ERROR: None}
    assert out["touched.png"] == {Col.SHA256: real["touched.png"], Col.ERROR: None}
    assert out["new.png"] == {Col.SHA256: real["new.png"], Col.ERROR: None}


def test_a_file_that_cannot_be_read_has_an_error_and_no_sha(tmp_path):
    save(picture(1), tmp_path / "gone.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    files = walk_table(tmp_path)
    (tmp_path / "gone.png").unlink()  # after the walk, before it is read
    out = dict(zip(files[Col.PATH].to_pylist(),
                   fingerprint(with_known_shas(files, file_index_schema().empty_table())).to_pylist()))
    assert out["gone.png"][Col.SHA256] is None and "No such file" in out["gone.png"][Col.ERROR]
    assert out["dangling.png"][Col.SHA256] is None and "broken symbolic link" in out["dangling.png"][Col.ERROR]


def test_objects_without_ctime_or_inode_are_vouched_for_by_size_and_mtime(tmp_path):
    for name in ("same.png", "touched.png", "resized.png", "unsized.png"):
        save(picture(len(name)), tmp_path / name)
    files = walk_table("file://" + str(tmp_path))  # listed as a store lists: no ctime, no inode
    index = _index(files, {n: "0" * 64 for n in ("same.png", "touched.png", "resized.png", "unsized.png")},
                   **{"touched.png": {Col.MTIME_NS: 1}, "resized.png": {Col.BYTES: 1}, "unsized.png": {Col.BYTES: None}})
    files = files.set_column(files.schema.get_field_index(Col.BYTES), Col.BYTES, pa.array(
        [None if p == "unsized.png" else b for p, b in zip(files[Col.PATH].to_pylist(), files[Col.BYTES].to_pylist())],
        pa.int64()))
    known = dict(zip(files[Col.PATH].to_pylist(), with_known_shas(files, index)[KNOWN_SHA256].to_pylist()))
    assert known == {"same.png": "0" * 64, "touched.png": None, "resized.png": None, "unsized.png": None}
