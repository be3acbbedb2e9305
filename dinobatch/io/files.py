"""Files written whole or not at all: atomic replacement, directory fsync, JSON."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from dinobatch.errors import OutputError
from dinobatch.runtime import faults


def json_plain(value: Any) -> str:
    """json.dumps' default for rows: path_bytes as base64, so names that are not UTF-8 survive."""
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def fsync_dir(path: Path) -> None:
    """Make the names just made in folder path durable (a power cut keeps them); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Atomic:
    """Write to a hidden temporary file beside the target, then rename: never a half-written file."""

    def __init__(self, target: Path):
        self.target = target
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self.tmp = Path(name)
        os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any file

    def commit(self) -> Path:
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        faults.point("write", self.target.name)
        os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)
        return self.target

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, action: str = "write") -> Iterator[Path]:
    """A hidden temporary path beside target, renamed onto it only if the block completes."""
    target = Path(target)
    atomic = None
    try:
        atomic = _Atomic(target)
        yield atomic.tmp
        atomic.commit()
    except OSError as exc:
        _abort(atomic)
        raise output_error(action, target, exc) from exc
    except BaseException:
        _abort(atomic)
        raise


def _abort(atomic: "_Atomic | None") -> None:
    if atomic is not None:
        atomic.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_error(action: str, path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot {action} {path}: {exc.strerror or exc}")


def write_json(obj: Any, target: str | os.PathLike) -> Path:
    """Write obj as indented JSON with sorted keys, atomically, creating the folder: the one writer of
    summaries (OUT/_summary.json, OUT/_runs/, classify's and scan's --summary-json)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error("create folder", target.parent, exc) from exc
    with atomic_path(target, "write summary") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return target
