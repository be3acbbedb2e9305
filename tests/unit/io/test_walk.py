"""Walking a folder: hidden files, links, loops and special files never hang or escape the root."""

from __future__ import annotations

import os

import pytest

from dinobatch.errors import InputError
from dinobatch.io.walk import sha256_file, walk
from tests.helpers import picture, save


def paths(root):
    return {e.path: e for e in walk(root)}


def test_walk_is_recursive_sorted_and_skips_hidden(tmp_path):
    save(picture(1), tmp_path / "b.png")
    save(picture(2), tmp_path / "a" / "z.png")
    save(picture(3), tmp_path / ".hidden.png")
    save(picture(4), tmp_path / ".cache" / "y.png")
    found = [e.path for e in walk(tmp_path)]
    assert found == ["a/z.png", "b.png"]


def test_link_to_folder_outside_root_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    save(picture(1), outside / "secret.png")
    root = tmp_path / "root"
    save(picture(2), root / "in.png")
    os.symlink(outside, root / "link")
    assert list(paths(root)) == ["in.png"]


def test_link_loop_terminates_and_each_folder_is_walked_once(tmp_path):
    save(picture(1), tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert list(paths(tmp_path)) == ["a/x.png"]


def test_link_to_folder_inside_root_is_followed_once(tmp_path):
    save(picture(1), tmp_path / "real" / "x.png")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    # 'alias' sorts first, so the folder is read through it; 'real' is then not read again
    assert list(paths(tmp_path)) == ["alias/x.png"]


def test_broken_link_fifo_and_empty_file_are_rows_with_reasons(tmp_path):
    os.symlink(tmp_path / "nowhere.png", tmp_path / "broken.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    found = paths(tmp_path)
    assert "broken symbolic link" in found["broken.png"].error
    assert "FIFO" in found["pipe.jpg"].error
    assert "empty" in found["empty.jpg"].error


def test_file_link_loop_is_a_row_not_a_hang(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    found = paths(tmp_path)
    assert set(found) == {"a.png", "b.png"}
    assert all(e.error for e in found.values())


def test_missing_root_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(walk(tmp_path / "missing"))


def test_undecodable_file_name_is_kept_printable(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        picture(1).save(fh, "PNG")
    (entry,) = walk(tmp_path)
    assert entry.path == "caf\\xe9.png"
    assert entry.error is None
    assert len(sha256_file(entry.abspath)) == 64


def test_walk_table_holds_what_walk_yields_in_the_same_order(tmp_path, monkeypatch):
    import dinobatch.io.walk as walk  # the module: walk.walk is the function

    monkeypatch.setattr(walk, "_TABLE_CHUNK", 3)  # several chunks from a small folder
    for i in range(7):
        save(picture(i), tmp_path / f"d{i % 2}" / f"{i}.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "broken.jpg")
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")
    table = walk.walk_table(tmp_path)
    expected = [(e.path, e.raw, os.fsencode(e.abspath), e.size, e.mtime_ns, e.ctime_ns, e.inode, e.error)
                for e in walk.walk(tmp_path)]
    assert list(zip(*(table[c].to_pylist() for c in table.column_names))) == expected
    assert table.num_rows == 10 and sum(e[-1] is not None for e in expected) == 2
