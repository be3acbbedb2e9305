"""A real HTTP server on 127.0.0.1 standing in for download.pytorch.org, so that torch.hub's own
download code runs in tests (no internet here), and a torchvision weights URL pointed at it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import threading
from pathlib import Path
from typing import Iterator

import torch

_PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """Serve folder over HTTP on a free port of 127.0.0.1; yield its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def publish_weights(monkeypatch, weights, state_dict: dict, folder: Path, base: str, prefix: str) -> str:
    """Write state_dict (torch.save bytes) under a hash-named file and point torchvision's weights at it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    name = f"{prefix}-{hashlib.sha256(data).hexdigest()[:8]}.pth"  # torch.hub checks this hash prefix
    (folder / name).write_bytes(data)
    monkeypatch.setattr(weights.value, "url", f"{base}/{name}")
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return name
