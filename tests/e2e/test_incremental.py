"""Reruns: unchanged files are not read again, changed ones always are, and the cache stays small."""

from __future__ import annotations

import os
import time

import pyarrow.parquet as pq

import dinobatch.stages.fingerprint as fingerprint_stage
from dinobatch.store import results

from tests.helpers import picture, save
from tests.helpers import run_classify as run


def _count_hashing(monkeypatch) -> list[str]:
    """Record every file classify reads to fingerprint it."""
    read: list[str] = []
    real = fingerprint_stage.sha256_file

    def counting(path):
        read.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(fingerprint_stage, "sha256_file", counting)
    return read


def _settle() -> None:
    """Let the files age: one changed within two seconds of being hashed is (rightly) hashed again,
    and its ctime, which a test cannot backdate, counts."""
    time.sleep(2.1)


def test_unchanged_rerun_reads_no_file_and_gives_the_same_rows(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "in"
    for i in range(6):
        save(picture(100 + i), root / f"{i}.png")
    _settle()
    first, rows1 = run(root, tmp_path / "out", tiny_model)
    read = _count_hashing(monkeypatch)
    second, rows2 = run(root, tmp_path / "out", tiny_model)
    assert read == []
    assert (second.inferred, second.reused) == (0, 6)
    strip = ("run_id",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows1.values()] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rows2.values()]


def test_a_file_rewritten_with_the_same_size_and_mtime_is_hashed_again(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "in"
    save(picture(1), root / "a.png")
    save(picture(2), root / "b.png")
    _settle()
    _, rows1 = run(root, tmp_path / "out", tiny_model)
    st = (root / "a.png").stat()
    replacement = picture(3)
    save(replacement, tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (root / "a.png").write_bytes(data[: st.st_size].ljust(st.st_size, b"\0"))  # same size, new bytes
    os.utime(root / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime: only ctime tells
    _settle()
    read = _count_hashing(monkeypatch)
    _, rows2 = run(root, tmp_path / "out", tiny_model)
    assert read == ["a.png"]
    assert rows2["a.png"]["sha256"] != rows1["a.png"]["sha256"]
    assert rows2["b.png"]["sha256"] == rows1["b.png"]["sha256"]


def test_a_freshly_written_file_is_not_trusted_by_its_stat(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "in"
    save(picture(1), root / "new.png")  # written just now: the same tick could hide a second write
    run(root, tmp_path / "out", tiny_model)
    read = _count_hashing(monkeypatch)
    run(root, tmp_path / "out", tiny_model)
    assert read == ["new.png"]


def test_force_rehashes_every_file(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "in"
    save(picture(1), root / "a.png")
    _settle()
    run(root, tmp_path / "out", tiny_model)
    read = _count_hashing(monkeypatch)
    summary, _ = run(root, tmp_path / "out", tiny_model, force=True)
    assert read == ["a.png"] and summary.inferred == 1


def test_many_cache_parts_are_merged_without_changing_any_prediction(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(results, "COMPACT_PARTS", 3)
    root = tmp_path / "in"
    for i in range(5):
        save(picture(200 + i), root / f"{i}.png")
    out = tmp_path / "out"
    _, rows1 = run(root, out, tiny_model, batch_size=1, embeddings=True)  # five parts, with embeddings
    for i in range(5, 9):
        save(picture(200 + i), root / f"{i}.png")
    _, rows2 = run(root, out, tiny_model, batch_size=1, force=True)  # newer rows, without embeddings
    parts = sorted((out / "_cache").glob("*/part-*.parquet"))
    assert len(parts) == 1 and parts[0].name.endswith("-zcompact.parquet")
    assert pq.read_table(parts[0]).num_rows == 9 + 5  # newest of each, plus the five embedding rows
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups == 1  # not one tiny row group per old part
    third, rows3 = run(root, out, tiny_model)
    assert third.inferred == 0
    assert {p: r["probs"] for p, r in rows3.items()} == {p: r["probs"] for p, r in rows2.items()}
    with_emb, rows4 = run(root, out, tiny_model, embeddings=True)
    assert with_emb.inferred == 4  # only the four files never inferred with embeddings
    assert all(rows4[f"{i}.png"]["embedding"] == rows1[f"{i}.png"]["embedding"] for i in range(5))
