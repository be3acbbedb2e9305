"""scan --engine ray end to end, on a real two-node Ray cluster: the same Parquet file as the local engine."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinobatch.config import ScanConfig
from dinobatch.engines.ray_common import CRASHED
from dinobatch.jobs.scan import scan_folder
from dinobatch.runtime import faults
from dinobatch.schema import Col
from tests.helpers import jpeg_bytes, picture, save

pytest.importorskip("ray.data", reason="the Ray engine needs the ray extra: pip install 'dinobatch[ray]'")

WEIRD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "weird"


@pytest.fixture
def folder(tmp_path) -> Path:
    """Exact and near duplicates (also across blocks), corrupt, unreadable and refused files."""
    root = tmp_path / "photos"
    for i in range(24):  # enough files for several blocks on two nodes
        save(picture(20 + i), root / f"many/p{i:02d}.jpg", quality=90)
    save(picture(1), root / "a.jpg", quality=92)
    (root / "z" / "copy_of_a.jpg").parent.mkdir()
    (root / "z" / "copy_of_a.jpg").write_bytes((root / "a.jpg").read_bytes())
    save(picture(7, (640, 480)), root / "big.png")
    save(picture(7, (640, 480)).resize((320, 240), Image.LANCZOS), root / "sub" / "small_copy.jpg", quality=90)
    save(picture(11).convert("CMYK"), root / "cmyk.jpg", quality=92)
    (root / "truncated.jpg").write_bytes(jpeg_bytes(picture(8))[:700])
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    with open(root / "huge.jpg", "wb") as fh:  # sparse: over the read limit, so it cannot be read
        fh.truncate(513 * 1024 * 1024)
    locked = save(picture(3), root / "locked.png")
    locked.chmod(0)  # unreadable, except to root (who gets a row like any other file)
    os.mkfifo(root / "pipe.jpg")  # refused by the walk, never opened
    save(picture(9), root / ".hidden.jpg")
    return root


def scan_with(engine: str, folder: Path, out: Path, address: str | None = None) -> tuple:
    summary = scan_folder(ScanConfig(folder=str(folder), output=str(out), engine=engine, address=address))
    return summary, pq.read_table(out)


def assert_same_tables(local, ray) -> None:
    """Every column, in the same order, with the same metadata (the failing column named)."""
    assert ray.schema.equals(local.schema, check_metadata=True)
    for name in local.column_names:
        assert ray[name].equals(local[name]), name
    assert ray.equals(local, check_metadata=True)


def test_ray_scan_writes_the_local_engines_table(ray_cluster, folder, tmp_path):
    local_summary, local = scan_with("local", folder, tmp_path / "local.parquet")
    ray_summary, ray = scan_with("ray", folder, tmp_path / "ray.parquet", ray_cluster.address)
    assert_same_tables(local, ray)
    assert ray_summary.counts == local_summary.counts and ray_summary.errors == local_summary.errors
    assert ray_summary.duplicate_groups == local_summary.duplicate_groups >= 2
    rows = {r[Col.PATH]: r for r in ray.to_pylist()}
    assert (rows["z/copy_of_a.jpg"][Col.DUPLICATE_OF], rows["z/copy_of_a.jpg"][Col.DUPLICATE_KIND]) == ("a.jpg", "exact")
    assert rows["sub/small_copy.jpg"][Col.DUPLICATE_OF] == "big.png"
    assert "truncated" in rows["truncated.jpg"][Col.ERROR]
    assert "too large" in rows["huge.jpg"][Col.ERROR] and rows["huge.jpg"][Col.SHA256] is None
    assert "FIFO" in rows["pipe.jpg"][Col.ERROR]
    if os.geteuid() != 0:
        assert "cannot read" in rows["locked.png"][Col.ERROR]


def test_ray_scan_of_the_weird_folder_equals_local(ray_cluster, tmp_path):
    if not WEIRD.is_dir():
        pytest.skip(f"{WEIRD} is absent: the shared real data (../shared/data/weird) is not on this machine")
    _, local = scan_with("local", WEIRD, tmp_path / "local.parquet")
    _, ray = scan_with("ray", WEIRD, tmp_path / "ray.parquet", ray_cluster.address)
    assert_same_tables(local, ray)
    assert local.num_rows == len(list(p for p in WEIRD.rglob("*") if p.is_file() and not p.name.startswith(".")))


def test_a_file_that_kills_its_ray_worker_is_an_error_row(ray_cluster, folder, tmp_path, monkeypatch):
    _, local = scan_with("local", folder, tmp_path / "local.parquet")
    monkeypatch.setenv(faults.ENV, "decode:1:cmyk.jpg")  # every process that decodes it dies (SIGKILL)
    _, ray = scan_with("ray", folder, tmp_path / "ray.parquet", ray_cluster.address)
    rows = {r[Col.PATH]: r for r in ray.to_pylist()}
    assert rows["cmyk.jpg"][Col.ERROR] == CRASHED and rows["cmyk.jpg"][Col.STATUS] == "error"
    others = [i for i, p in enumerate(local[Col.PATH].to_pylist()) if p != "cmyk.jpg"]
    assert_same_tables(local.take(others), ray.take(others))
