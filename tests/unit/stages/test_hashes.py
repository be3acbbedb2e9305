"""Scan's stage as a plain function: a batch of files in, one row of facts or of reason per file out."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from dinobatch.config import ScanConfig
from dinobatch.io.walk import walk_table
from dinobatch.jobs.scan import scan_folder
from dinobatch.schema import Col, scan_schema
from dinobatch.stages.hashes import HASH_COLUMNS, hash_batch, hash_file
from tests.helpers import jpeg_bytes, picture, save

FACTS = (Col.FORMAT, Col.WIDTH, Col.HEIGHT, Col.MODE, Col.PHASH, Col.DHASH)


def _folder(tmp_path):
    """good.jpg, corrupt.jpg (not an image) and gone.jpg (walked, then deleted before it is read)."""
    root = tmp_path / "in"
    save(picture(1), root / "good.jpg", quality=90)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    (root / "gone.jpg").write_bytes(jpeg_bytes(picture(2)))
    files = walk_table(root).sort_by(Col.PATH)
    os.remove(root / "gone.jpg")
    return root, files


def test_one_row_per_file_with_its_facts_or_its_reason(tmp_path):
    root, files = _folder(tmp_path)
    rows = hash_batch(files).to_pylist()
    corrupt, gone, good = rows  # the walk's rows, in path order
    data = (root / "good.jpg").read_bytes()
    assert good == {Col.SHA256: hashlib.sha256(data).hexdigest(), Col.BYTES: len(data), Col.FORMAT: "JPEG",
                    Col.WIDTH: 160, Col.HEIGHT: 120, Col.MODE: "RGB", Col.PHASH: good[Col.PHASH],
                    Col.DHASH: good[Col.DHASH], Col.ERROR: None}
    assert len(good[Col.PHASH]) == len(good[Col.DHASH]) == 16 and int(good[Col.PHASH], 16) >= 0
    broken = (root / "corrupt.jpg").read_bytes()
    assert corrupt[Col.SHA256] == hashlib.sha256(broken).hexdigest() and corrupt[Col.BYTES] == len(broken)
    assert corrupt[Col.ERROR] and all(corrupt[c] is None for c in FACTS)
    assert gone[Col.ERROR].startswith("cannot read file") and gone[Col.SHA256] is None and gone[Col.BYTES] is None


def test_each_row_is_what_the_per_file_kernel_says(tmp_path):
    _, files = _folder(tmp_path)
    rows = hash_batch(files).to_pylist()
    for path, size, row in zip(files[Col.ABSPATH].to_pylist(), files[Col.BYTES].to_pylist(), rows):
        sha, nbytes, facts, error = hash_file(os.fsdecode(path), size)
        assert (row[Col.SHA256], row[Col.BYTES], row[Col.ERROR]) == (sha, nbytes, error)
        assert tuple(row[c] for c in FACTS) == (facts or (None,) * 6)


def test_paths_as_text_and_no_size_column_give_the_same_rows(tmp_path):
    _, files = _folder(tmp_path)
    plain = pa.table({Col.ABSPATH: [os.fsdecode(p) for p in files[Col.ABSPATH].to_pylist()]})
    assert hash_batch(plain).equals(hash_batch(files))
    assert hash_batch(plain.slice(0, 0)).num_rows == 0


def test_the_stage_gives_what_scan_writes_in_the_same_types(tmp_path):
    root, files = _folder(tmp_path)
    stage = hash_batch(files)
    scan = scan_schema()
    assert stage.column_names == list(HASH_COLUMNS)
    assert all(stage.schema.field(c).type == scan.field(c).type for c in HASH_COLUMNS)
    scan_folder(ScanConfig(folder=str(root), output=str(tmp_path / "scan.parquet"), workers=0))
    written = {r[Col.PATH]: r for r in pq.read_table(tmp_path / "scan.parquet").to_pylist()}
    for path, row in zip(files[Col.PATH].to_pylist(), stage.to_pylist()):
        if path != "gone.jpg":  # gone before scan walked: not in its output
            assert {c: written[path][c] for c in HASH_COLUMNS} == row
