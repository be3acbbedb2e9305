"""ServeConfig: everything `dinobatch serve` depends on, resolved from flags and the config file.

Torch- and FastAPI-free, so the CLI can read the defaults at --help."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dinobatch.config import MAX_BATCH_SIZE, ClassifyConfig
from dinobatch.errors import ConfigError

__all__ = ["ServeConfig", "LOOPBACK_HOSTS"]

# Hosts that only this machine can reach: binding elsewhere is logged as a warning, and on these the
# server answers only requests addressed to a loopback name (a DNS-rebinding page gets 400).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_CLASSIFY_TOP_K = next(f.default for f in dataclasses.fields(ClassifyConfig) if f.name == "top_k")


@dataclass(frozen=True)
class ServeConfig:
    """The resolved options of one `dinobatch serve` process."""

    model: str
    reference: str | None = None  # a manifest: /api/similar, duplicates in /api/predict, thumbnails
    queue: str | None = None  # curate's output folder: /review
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log says which)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32  # requests sharing one forward pass at most
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_upload_mb: float = 20.0  # larger uploads are refused with 413 before they are read
    species: str | None = None  # species facts CSV; None: manifests/species.csv
    cache: str | None = None  # reference embeddings cache folder; None: similar's default
    top_k: int = _CLASSIFY_TOP_K  # labels in /api/predict's topk, as classify's topk_labels

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {self.batch_size}")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= 1000):
            raise ConfigError(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms}")
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0):
            raise ConfigError(f"max_upload_mb must be a positive number, got {self.max_upload_mb}")
        if self.top_k < 1:
            raise ConfigError("top_k must be at least 1")
        if self.queue is not None and not self.loopback:
            # the review page hands its token to whoever loads it: on a network address anyone who can
            # reach the port could post decisions and apply them; a reviewer elsewhere uses a tunnel
            raise ConfigError(f"--queue is served on a loopback address only (not --host {self.host}): the review "
                              "page's token guards decisions against other web pages, not against other machines; "
                              "from another machine, reach it through an SSH tunnel (ssh -L 8000:127.0.0.1:8000)")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (a MB is 10^6 bytes, as browsers and phones count)."""
        return int(self.max_upload_mb * 1_000_000)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
