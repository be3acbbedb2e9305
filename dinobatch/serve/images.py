"""GET /api/image/{id} and /api/thumb/{id}: the registered images, by id only (no path from a
request is ever opened), the original bytes or a small JPEG made with classify's safe decode."""

from __future__ import annotations

import functools
import io
import logging
import os
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from dinobatch.serve.context import ImageRegistry

__all__ = ["images_router", "THUMB_SIDE", "content_type"]

log = logging.getLogger(__name__)
THUMB_SIDE = 320  # a thumbnail's longer side, pixels: sharp on a review card at 2x
_THUMB_QUALITY = 85
_THUMBS_KEPT = 512  # thumbnails kept in memory (about 20 KB each)
_NOT_FOUND = "no such image"


def images_router(images: ImageRegistry) -> APIRouter:
    """The two image routes over a registry."""
    router = APIRouter()

    @router.get("/api/image/{image_id}")
    async def image(image_id: str) -> Response:
        path = _registered(images, image_id)
        data = await run_in_threadpool(_read, path)
        return Response(data, media_type=content_type(data),
                        headers={"Cache-Control": "private, max-age=3600", "Content-Disposition": "inline"})

    @router.get("/api/thumb/{image_id}")
    async def thumb(image_id: str) -> Response:
        path = _registered(images, image_id)
        try:
            stat = os.stat(path)
        except OSError:
            raise HTTPException(404, "the image file is gone") from None
        data = await run_in_threadpool(_thumbnail, str(path), stat.st_mtime_ns, stat.st_size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return router


def _registered(images: ImageRegistry, image_id: str) -> Path:
    """The file behind an id the server handed out; 404 for anything else."""
    path = images.path(image_id)
    if path is None:
        raise HTTPException(404, _NOT_FOUND)
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise HTTPException(404, "the image file is gone or cannot be read") from None


def content_type(data: bytes) -> str:
    """The image MIME type Pillow finds in the bytes (never one a browser would run as a page)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "")
    except Exception:  # not an image Pillow knows: sent as plain bytes
        mime = None
    return mime if mime and mime.startswith("image/") and "svg" not in mime else "application/octet-stream"


@functools.lru_cache(maxsize=_THUMBS_KEPT)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """A JPEG of the picture, longer side THUMB_SIDE, decoded as classify decodes (bombs refused,
    EXIF orientation); keyed by the file's mtime and size, so a changed file gets a new one."""
    from PIL import Image

    from dinobatch.imaging.decode import DecodeError, decode

    try:
        picture = decode(Path(path).read_bytes()).image
    except OSError:
        raise HTTPException(404, "the image file is gone or cannot be read") from None
    except DecodeError as exc:
        raise HTTPException(422, str(exc)) from None
    picture.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=_THUMB_QUALITY)
    return out.getvalue()
