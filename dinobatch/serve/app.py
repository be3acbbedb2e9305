"""create_app: the FastAPI application of `dinobatch serve` (model, reference set, review queue), and
serve: run it on uvicorn at the configured address."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dinobatch.errors import ConfigError, InputError
from dinobatch.serve.config import ServeConfig
from dinobatch.serve.context import ImageRegistry, ServeContext
from dinobatch.serve.guard import BodyTooLarge, Guard

__all__ = ["create_app", "serve", "listening_socket"]

log = logging.getLogger(__name__)


def create_app(cfg: ServeConfig) -> FastAPI:
    """Load the model (and the reference set), build the context the routers share, and the app."""
    from dinobatch.imaging import decode_budget
    from dinobatch.models.file import resolve_model
    from dinobatch.runtime.device import resolve_runtime
    from dinobatch.runtime.memory import tune_process
    from dinobatch.serve.predict import ModelService
    from dinobatch.store.species import default_species_csv, load_species

    tuned = resolve_runtime(cfg.device, cfg.precision)
    tune_process(tuned)  # classify's process settings (the allocator, torch's threads) before the model loads
    model = resolve_model(cfg.model)
    runtime = tuned.for_model(model.spec.precision, cfg.precision)  # an int8 file: CPU only, int8
    if runtime.device != tuned.device:  # an int8 file that --device auto put on the CPU: the CPU's settings
        tune_process(runtime)
    species = load_species(cfg.species or default_species_csv())
    decode_budget.install(decode_budget.from_env())  # concurrent uploads share classify's decode memory budget
    ctx = ServeContext(token=secrets.token_urlsafe(32), images=ImageRegistry(),
                       queue_dir=_queue_dir(cfg.queue), labels=list(model.spec.labels), model=model)
    reference = _reference(cfg, model, runtime, ctx.images)
    service = ModelService(model, runtime, batch_size=cfg.batch_size, max_wait_ms=cfg.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # answers what is queued, then stops the model's thread

    app = FastAPI(title="dinobatch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.images, app.state.context, app.state.service = ctx.images, ctx, service
    health = {"model": model.name, "model_fingerprint": model.fingerprint, "labels": len(model.spec.labels),
              "device": runtime.resolved()["device"], "precision": runtime.precision,
              "batch_size": cfg.batch_size, "max_wait_ms": cfg.max_wait_ms,
              "reference": len(reference.row_paths) if reference else 0, "review": ctx.queue_dir is not None}
    _add_routes(app, cfg, ctx, service, species, reference, health)
    _add_error_handlers(app)
    app.add_middleware(Guard, token=ctx.token, max_upload=cfg.max_upload_bytes,
                       loopback=cfg.loopback)
    return app


def _add_routes(app: FastAPI, cfg: ServeConfig, ctx: ServeContext, service, species, reference,
                health: dict[str, Any]) -> None:
    from dinobatch.serve.api import api_router
    from dinobatch.serve.images import images_router

    app.include_router(api_router(service, species=species, reference=reference, top_k=cfg.top_k, health=health))
    app.include_router(images_router(ctx.images))
    if ctx.queue_dir is not None:
        from dinobatch.serve.review import review_router

        app.include_router(review_router(ctx))


def _queue_dir(queue: str | None) -> Path | None:
    """--queue's folder (curate's output), checked before anything loads."""
    if queue is None:
        return None
    path = Path(queue).absolute()
    if not (path / "queue.parquet").is_file():
        raise InputError(f"--queue {queue}: no queue.parquet there; give the folder `dinobatch curate -o` wrote")
    return path


def _reference(cfg: ServeConfig, model, runtime, images: ImageRegistry):
    """The reference set of --reference, or None."""
    if cfg.reference is None:
        return None
    from dinobatch.curation.similar import default_cache_dir
    from dinobatch.serve.reference import load_reference

    cache = Path(cfg.cache) if cfg.cache else default_cache_dir()
    return load_reference(cfg.reference, model, runtime, images, cache_dir=cache, batch_size=None)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error": reason} with its status; a bug is a 500 with no details."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else "no such endpoint or image"
        return JSONResponse({"error": reason}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {reasons}"}, status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413, headers={"Connection": "close"})


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a ConfigError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, *, access_log: bool = False) -> None:
    """Build the app, bind, log the URLs and serve until SIGINT or SIGTERM."""
    import uvicorn

    if not cfg.loopback:
        log.warning("listening on %s: every machine that can reach this address can use the model and "
                    "read the reference images", cfg.host)
    sock = listening_socket(cfg.host, cfg.port)  # before the model loads: a taken port fails at once
    app = create_app(cfg)
    host, port = sock.getsockname()[:2]
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info("serving on %s (model %s)", base, app.state.context.model.name)
    if app.state.context.queue_dir is not None:
        log.info("review: %s/review", base)
    config = uvicorn.Config(app, log_config=None, access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
