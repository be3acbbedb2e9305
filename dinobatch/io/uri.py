"""Folders and files named by a URI (s3://bucket/prefix, gs://, any filesystem pyarrow opens): the one
place that knows about URIs, so every engine that reads through dinobatch.io reads object stores.

Credentials and the endpoint come from where the filesystem's own client looks (for S3: AWS_* in the
environment, ~/.aws, an instance role; AWS_ENDPOINT_URL for a non-AWS endpoint); a URI that carries
credentials itself (s3://KEY:SECRET@bucket) is refused, because rows, logs and summaries carry the
URI. An object's URI is its folder's, then '/', then its key below the folder percent-encoded where
it must be (a space, '%', '?', '#'), then the folder's query (pyarrow's options, if any).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from dinobatch.errors import InputError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["is_uri", "check_uri", "list_objects", "read_object", "sha256_object", "object_uri"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_READ_CHUNK = 16 * 1024 * 1024  # an object store answers each read with a request: few, large ones
_SAFE = "/!$&'()*+,;=:@~"  # kept as they are in an object's URI; anything else outside [A-Za-z0-9_.-] is %XX

# (process, scheme, authority, query, client settings) -> (filesystem, what pyarrow puts before the
# URI's path). The process id is in the key: a forked worker makes its own client rather than share
# its parent's; so are the clients' environment variables: a changed endpoint or profile is obeyed.
_filesystems: dict[tuple[Any, ...], tuple[Any, str]] = {}
_CLIENT_ENV = ("AWS_", "GOOGLE_", "AZURE_", "HADOOP_", "ARROW_")


def is_uri(path: str | os.PathLike) -> bool:
    """Whether a FOLDER or file is named by a URI (scheme://...) rather than a local path."""
    return isinstance(path, str) and _SCHEME.match(path) is not None


def _split(uri: str):
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise InputError(f"{parts.scheme}:// URIs with credentials in them are refused (rows and logs carry the "
                         f"URI): give credentials through the environment or the client's configuration")
    return parts


def _resolve(uri: str) -> tuple["pafs.FileSystem", str]:
    """The filesystem that holds uri and uri's path in it; one client per store and process."""
    import pyarrow.fs as pafs

    parts = _split(uri)
    settings = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CLIENT_ENV)))
                              .encode()).hexdigest()  # a digest: no secret kept in the key itself
    key = (os.getpid(), parts.scheme, parts.netloc, parts.query, settings)
    inner = unquote(parts.path)
    if key in _filesystems:
        fs, lead = _filesystems[key]
        return fs, lead + inner
    fs, path = pafs.FileSystem.from_uri(uri)
    if path.endswith(inner):  # S3 and GCS put the bucket before the key; local and HDFS nothing
        _filesystems[key] = (fs, path[:len(path) - len(inner)])
    return fs, path


def check_uri(uri: str) -> str:
    """The URI of a folder in a store, without a trailing '/', or an InputError saying why it cannot be used."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    parts = _split(uri)
    uri = parts._replace(path=parts.path.rstrip("/"), fragment="").geturl()
    try:
        fs, path = _resolve(uri)
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"input folder {uri} cannot be listed: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input folder not found: {uri} (no such bucket, or no object under that prefix)")
    if info.type != pafs.FileType.Directory:
        raise InputError(f"input folder not found or not a folder: {uri}")
    return uri


def object_uri(folder: str, rel: str) -> str:
    """The URI of the object at rel ('/'-separated) below folder (a check_uri result)."""
    parts = urlsplit(folder)
    return parts._replace(path=parts.path + "/" + quote(rel, safe=_SAFE)).geturl()


def list_objects(folder: str) -> list[tuple[str, int | None, int | None]]:
    """(key below folder, size, mtime_ns) of every object under a folder URI, in the store's order;
    an InputError when it cannot be listed."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, base = _resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"input folder {folder} cannot be listed: {exc}") from exc
    start = len(base.rstrip("/")) + 1
    return [(i.path[start:], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File]


def _open(uri: str, limit: int):
    """An object opened for reading, refused (OSError) when larger than limit bytes."""
    import pyarrow as pa

    try:
        fs, path = _resolve(uri)
        fh = fs.open_input_file(path)
    except pa.ArrowException as exc:  # ArrowInvalid and the like: an OSError, as a local file's would be
        raise OSError(str(exc)) from exc
    if fh.size() > limit:
        fh.close()
        raise OSError(f"file too large ({fh.size()} bytes; the limit is {limit})")
    return fh


def read_object(uri: str, limit: int) -> bytes:
    """An object's bytes (one request for the size, one for the bytes); OSError when it cannot be read."""
    with _open(uri, limit) as fh:
        return fh.read()


def sha256_object(uri: str, limit: int) -> str:
    """Hex sha256 of an object's bytes, streamed in large reads."""
    h = hashlib.sha256()
    with _open(uri, limit) as fh:
        for chunk in iter(lambda: fh.read(_READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
