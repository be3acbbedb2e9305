"""What every request passes before a route sees it: the Host check (loopback servers), the token on
state-changing requests, and the upload limit (413 before the body is read, or as soon as it passes)."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any, Awaitable, Callable

__all__ = ["Guard", "TOKEN_HEADER", "READ_ONLY_POSTS", "MULTIPART_SLACK", "BodyTooLarge"]

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-dinobatch-token"
# POSTs that change nothing (an app uploads a photo and reads the answer): no token needed.
READ_ONLY_POSTS = ("/api/predict", "/api/similar")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# A request body may pass the upload limit by this much: the multipart boundaries and part headers.
MULTIPART_SLACK = 64 * 1024
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# Every response: no sniffing a served file into a page, no framing the review page (clickjacking),
# no leaking its URLs to other sites.
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                     (b"referrer-policy", b"no-referrer")]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    """A request body went past the upload limit while it was being read."""


class Guard:
    """ASGI middleware (pure, so that it can refuse before the body is read)."""

    def __init__(self, app, *, token: str, max_upload: int, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback
        self.max_upload, self.max_body = max_upload, max_upload + MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _json(send, *refusal)
            return
        await self.app(scope, self._limited(receive), _with_security_headers(send))

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, reason) where the request is refused before it runs, else None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback and _host_name(headers.get("host", "")) not in _LOOPBACK_NAMES:
            # a page on another site whose name was made to resolve here (DNS rebinding) must not read it
            return 400, "this server only answers requests addressed to 127.0.0.1 or localhost"
        read_only = scope["method"] in _SAFE_METHODS or (scope["method"] == "POST" and scope["path"] in READ_ONLY_POSTS)
        if not read_only:
            if not secrets.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
                return 403, f"missing or wrong {TOKEN_HEADER} header: reload the page served by this process"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "invalid Content-Length"
            if int(length) > self.max_body:
                return 413, f"upload too large: {int(length):,} bytes; the limit is {self.max_upload:,} bytes"
        return None

    def _limited(self, receive: Receive) -> Receive:
        """receive, raising BodyTooLarge as soon as the body read so far passes the limit (a body
        sent without a Content-Length, or longer than it said): nothing past the limit is buffered."""
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(f"upload too large: more than {self.max_upload:,} bytes")
            return message

        return limited


def _host_name(host: str) -> str:
    """The Host header without its port."""
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
        await send(message)

    return wrapped


async def _json(send: Send, status: int, reason: str) -> None:
    """A complete JSON error response {"error": reason}; the connection closes (the body is unread)."""
    body = json.dumps({"error": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *_SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
