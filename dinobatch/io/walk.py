"""Walk an input folder safely and fingerprint each file's bytes (no decoding here)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from dinobatch.errors import InputError
from dinobatch.io.uri import check_uri, is_uri, list_objects, object_uri, read_object, sha256_object

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["FileEntry", "check_folder", "walk", "walk_table", "sha256_file", "read_bytes", "display_path", "name_and_bytes", "read_error",
           "MAX_FILE_BYTES"]

log = logging.getLogger(__name__)

# A larger file is refused before it is read: no photo or drawing comes near this.
MAX_FILE_BYTES = 512 * 1024 * 1024
_CHUNK = 1024 * 1024
_TABLE_CHUNK = 8192  # FileEntry objects alive at once while walk_table builds its columns


@dataclass(frozen=True)
class FileEntry:
    """One candidate file found under the root, with why it cannot be read if it cannot."""

    path: str  # relative to the root, '/'-separated, printable
    abspath: str
    size: int | None = None
    mtime_ns: int | None = None
    error: str | None = None
    raw: bytes | None = None  # the relative path's exact bytes, when `path` had to escape them
    ctime_ns: int | None = None  # with size, mtime and inode: has the file changed since last run?
    inode: int | None = None


def display_path(raw: str) -> str:
    """A printable, UTF-8-safe, one-to-one form of a file name: undecodable bytes are shown as
    \\xNN and a literal backslash as two, so no two different names look the same."""
    return os.fsencode(raw).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def name_and_bytes(raw: str) -> tuple[str, bytes | None]:
    """A relative name as tables show it (display_path, '/'-separated), and its exact bytes where the
    two differ (path and path_bytes: classify's rows, scan's and manifests')."""
    shown = display_path(raw).replace(os.sep, "/")
    return shown, (os.fsencode(raw) if shown != raw.replace(os.sep, "/") else None)


def _size_error(size: int) -> str | None:
    """Why a file of this size is not read (a local file's or an object's), or None."""
    if size == 0:
        return "empty file (0 bytes)"
    if size > MAX_FILE_BYTES:
        return f"file too large ({size} bytes; the limit is {MAX_FILE_BYTES})"
    return None


def _entry(root: str, full: str, st: os.stat_result | None, error: str | None) -> FileEntry:
    rel, raw = name_and_bytes(os.path.relpath(full, root))
    if error is None and st is not None and not stat.S_ISREG(st.st_mode):
        error = f"skipped: {_kind(st.st_mode)}, not an image file"
    if error is None and st is not None:
        error = _size_error(st.st_size)
    if st is None:
        return FileEntry(rel, full, None, None, error, raw)
    return FileEntry(rel, full, st.st_size, st.st_mtime_ns, error, raw, st.st_ctime_ns, st.st_ino)


def _is_inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def walk(root: str | Path, exclude: str | Path | None = None) -> Iterator[FileEntry]:
    """Yield every non-hidden file under root in sorted order, without following links out or in
    loops; the folder `exclude` (say, an output folder inside the input) is not entered."""
    if is_uri(root):  # object stores are listed as a table, by walk_table
        raise InputError(f"{root}: this command reads local folders only; classify and scan read object stores")
    root = check_folder(root)
    root_real = os.path.realpath(root)
    seen_dirs = {root_real}
    if exclude is not None:
        seen_dirs.add(os.path.realpath(exclude))  # a folder already 'seen' is never entered
    stack = [iter(_listing(root))]
    while stack:
        e = next(stack[-1], None)
        if e is None:
            stack.pop()
            continue
        sub = _classify_entry(root, root_real, e, seen_dirs)
        if isinstance(sub, FileEntry):
            yield sub
        elif sub is not None:
            stack.append(iter(_listing(sub)))


def walk_table(root: str | Path, exclude: str | Path | None = None) -> "pa.Table":
    """What walk() yields, in the same order, as one table (schema.walk_schema): built a chunk at a
    time so that no Python object per file outlives its chunk, whatever the size of the folder. A URI's
    objects are listed with the same rules (exclude does not apply: the output is a local folder)."""
    import pyarrow as pa

    chunks, pending = [], []
    for entry in (_object_entries(check_folder(root)) if is_uri(root) else walk(root, exclude)):
        pending.append(entry)
        if len(pending) == _TABLE_CHUNK:
            chunks.append(_entries_table(pending))
            pending = []
    chunks.append(_entries_table(pending))
    return pa.concat_tables(chunks)


def _entries_table(entries: list[FileEntry]) -> "pa.Table":
    from dinobatch.io.arrow import table_from_columns
    from dinobatch.schema import Col, walk_schema

    return table_from_columns({
        Col.PATH: [e.path for e in entries], Col.PATH_BYTES: [e.raw for e in entries],
        Col.ABSPATH: [os.fsencode(e.abspath) for e in entries], Col.BYTES: [e.size for e in entries],
        Col.MTIME_NS: [e.mtime_ns for e in entries], Col.CTIME_NS: [e.ctime_ns for e in entries],
        Col.INODE: [e.inode for e in entries], Col.ERROR: [e.error for e in entries]}, walk_schema())


def _object_entries(folder: str) -> list[FileEntry]:
    """walk() for a folder URI: a FileEntry per object, hidden keys (a component starting with '.')
    skipped, in walk()'s order (sorted a folder level at a time); no ctime or inode in a store."""
    found = []
    for key, size, mtime_ns in list_objects(folder):
        parts = key.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        rel, raw = name_and_bytes(key)
        error = _size_error(size) if size is not None else None
        found.append((parts, FileEntry(rel, object_uri(folder, key), size, mtime_ns, error, raw)))
    found.sort(key=lambda pair: pair[0])
    return [entry for _, entry in found]


def check_folder(root: str | Path) -> str:
    """The absolute path of an input folder (a URI: as check_uri gives it), or an InputError saying why
    it cannot be used."""
    if is_uri(root):
        return check_uri(root)
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise InputError(f"input folder not found or not a folder: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"input folder is not readable: {root}")
    return root


def _listing(folder: str) -> list[os.DirEntry]:
    """Non-hidden entries of a folder sorted by name; an unlistable folder is logged and skipped."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list folder %s: %s", display_path(folder), exc.strerror or exc)
        return []


def _classify_entry(root: str, root_real: str, e: os.DirEntry, seen: set[str]) -> FileEntry | str | None:
    """A FileEntry for a file, a folder path to descend into, or None for a folder to skip."""
    try:
        is_dir = e.is_dir(follow_symlinks=True)
    except OSError:
        is_dir = False
    if is_dir:
        real = os.path.realpath(e.path)
        if e.is_symlink() and not _is_inside(real, root_real):
            log.info("not following link %s: it points outside the input folder", display_path(e.path))
            return None
        if real in seen:
            log.info("not following %s: folder already scanned (link loop or second link)", display_path(e.path))
            return None
        seen.add(real)
        return e.path
    try:
        st = os.stat(e.path)  # follows a link to a file: the file's bytes are what we classify
    except OSError as exc:
        reason = "broken symbolic link" if e.is_symlink() else (exc.strerror or str(exc))
        return _entry(root, e.path, None, read_error(reason))
    return _entry(root, e.path, st, None)


def _open_regular(path: str):
    """Open a file for reading without ever blocking on a FIFO that replaced it after the walk."""
    fd, _ = _open_regular_fd(path)
    return os.fdopen(fd, "rb")


def _open_regular_fd(path: str) -> tuple[int, os.stat_result]:
    """A raw descriptor and its stat, for a regular file within the size limit; anything else refused."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{_kind(st.st_mode)}, not an image file")
        if st.st_size > MAX_FILE_BYTES:
            raise OSError(f"file too large ({st.st_size} bytes; the limit is {MAX_FILE_BYTES})")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes (a local path or a URI), streamed in 1 MiB chunks."""
    if is_uri(path):
        return sha256_object(path, MAX_FILE_BYTES)
    h = hashlib.sha256()
    with _open_regular(path) as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def read_error(exc: OSError | str) -> str:
    """The error of a file that could not be read, as every row and message gives it."""
    return f"cannot read file: {exc if isinstance(exc, str) else exc.strerror or exc}"


def read_bytes(path: str) -> bytes:
    """The whole file, refusing non-regular and oversized files.

    Raw reads, the first sized from the open file's stat (no buffered reader: half the cost for a
    200 KB photo), then on to the end, up to the same limit. A URI: the object's bytes."""
    if is_uri(path):
        return read_object(path, MAX_FILE_BYTES)
    fd, st = _open_regular_fd(path)
    try:
        data = os.read(fd, st.st_size + 1)
        while len(data) <= MAX_FILE_BYTES:  # to the end: a short read, or a file that grew since
            more = os.read(fd, min(_CHUNK, MAX_FILE_BYTES + 1 - len(data)))  # never a 512 MiB buffer
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data
