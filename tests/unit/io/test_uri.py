"""Folders named by a URI: listed with the local walk's rules, objects read back by their URI."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from dinobatch.errors import InputError
from dinobatch.io.uri import is_uri
from dinobatch.io.walk import check_folder, read_bytes, sha256_file, walk, walk_table
from dinobatch.schema import Col
from tests.helpers import picture, save


def _tree(root):
    """Hidden names at every depth, a name that sorts differently key-wise and level-wise, a space, a
    '%', an empty file."""
    save(picture(1), root / "b.png")
    save(picture(2), root / "a" / "z.png")
    save(picture(3), root / "a.png")  # an object store lists 'a.png' before 'a/z.png'; the walk after
    save(picture(4), root / "a b%.png")
    save(picture(5), root / ".hidden.png")
    save(picture(6), root / "a" / ".cache" / "x.png")
    save(picture(7), root / ".git" / "y.png")
    (root / "a" / "empty.png").write_bytes(b"")


def test_a_uri_folder_is_walked_with_the_local_rules_and_order(tmp_path):
    _tree(tmp_path)
    uri = "file://" + str(tmp_path)
    local, remote = walk_table(tmp_path), walk_table(uri)
    assert remote[Col.PATH].to_pylist() == local[Col.PATH].to_pylist() == [
        "a/empty.png", "a/z.png", "a b%.png", "a.png", "b.png"]
    assert remote[Col.ERROR].to_pylist() == local[Col.ERROR].to_pylist() == ["empty file (0 bytes)", None, None,
                                                                             None, None]
    assert remote[Col.BYTES].to_pylist() == local[Col.BYTES].to_pylist()
    assert remote[Col.CTIME_NS].null_count == remote[Col.INODE].null_count == remote.num_rows  # a store has none
    assert remote[Col.MTIME_NS].null_count == 0


def test_each_object_is_read_back_by_its_full_uri(tmp_path):
    _tree(tmp_path)
    uri = "file://" + str(tmp_path)
    rows = walk_table(uri).to_pylist()
    abspaths = [r[Col.ABSPATH].decode() for r in rows]
    assert f"{uri}/a%20b%25.png" in abspaths and f"{uri}/a/z.png" in abspaths
    for r, abspath in zip(rows, abspaths):
        data = (tmp_path / r[Col.PATH]).read_bytes()
        assert is_uri(abspath)
        assert read_bytes(abspath) == data
        assert sha256_file(abspath) == hashlib.sha256(data).hexdigest()


def test_a_missing_object_is_an_oserror_as_a_missing_file_is(tmp_path):
    with pytest.raises(OSError):
        read_bytes("file://" + str(tmp_path / "gone.png"))
    with pytest.raises(OSError):
        sha256_file("file://" + str(tmp_path / "gone.png"))


def test_unusable_uri_folders_are_input_errors(tmp_path):
    save(picture(1), tmp_path / "f.png")
    with pytest.raises(InputError, match="not found"):
        check_folder("file://" + str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="not a folder"):
        check_folder("file://" + str(tmp_path / "f.png"))
    with pytest.raises(InputError, match="credentials") as caught:
        check_folder("s3://AKIDEXAMPLE:wJalrXUtnFEMI@bucket/prefix")
    assert "wJalrXUtnFEMI" not in str(caught.value)
    with pytest.raises(InputError, match="cannot be listed"):
        check_folder("nosuchscheme://bucket/prefix")


def test_a_uri_folder_keeps_no_trailing_slash(tmp_path):
    assert check_folder("file://" + str(tmp_path) + "/") == "file://" + str(tmp_path)


def test_commands_that_read_local_folders_only_say_so(tmp_path):
    with pytest.raises(InputError, match="local folders only"):
        list(walk("file://" + str(tmp_path)))


def test_local_paths_are_not_uris(tmp_path):
    assert not is_uri(str(tmp_path)) and not is_uri("relative/s3:/x") and not is_uri(tmp_path)
    assert is_uri("s3://bucket/prefix") and is_uri("gs://b/p")
    assert isinstance(walk_table(tmp_path), pa.Table)
