"""What the server's routers share: the token, the image registry, the queue and the model."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ImageRegistry", "ServeContext"]


class ImageRegistry:
    """id -> file for the images the server may send: a request names an id, never a path.

    An id is derived from the file's absolute path (stable across restarts, so a reloaded page's
    URLs stay valid); only paths registered by the server itself (reference manifest, queue) resolve.
    """

    def __init__(self) -> None:
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _id_for(path: Path) -> str:
        return hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:24]

    def add(self, path: str | Path) -> str:
        """Register a file the server may send and return its id (the same id for the same path)."""
        absolute = Path(path).absolute()
        image_id = self._id_for(absolute)
        with self._lock:
            self._paths[image_id] = absolute
        return image_id

    def path(self, image_id: str) -> Path | None:
        """The registered file for an id, or None for any id the server did not hand out."""
        with self._lock:
            return self._paths.get(image_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)


@dataclass
class ServeContext:
    """The per-process state every router of `dinobatch serve` reads."""

    token: str  # checked on every state-changing request (header X-Dinobatch-Token)
    images: ImageRegistry = field(default_factory=ImageRegistry)
    queue_dir: Path | None = None  # CURATE_OUT of --queue, or None
    labels: list[str] = field(default_factory=list)  # the model's class labels, in its order
    model: Any = None  # dinobatch.models.file.LoadedModel, or None
