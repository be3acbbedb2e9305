"""The app's endpoints: GET /healthz, POST /api/predict and POST /api/similar (multipart `image`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from dinobatch.schema import Col
from dinobatch.serve.guard import BodyTooLarge
from dinobatch.serve.predict import ModelService, Prepared, UnusableImage, species_facts
from dinobatch.serve.reference import ReferenceSet

__all__ = ["api_router", "DEFAULT_K", "MAX_K"]

log = logging.getLogger(__name__)
DEFAULT_K = 5  # /api/similar's matches when k is not given
MAX_K = 50  # /api/similar's k at most: a page of matches, not the whole reference set
_FIELD = "image"


def api_router(service: ModelService, *, species: Mapping[str, Any], reference: ReferenceSet | None,
               top_k: int, health: dict[str, Any]) -> APIRouter:
    """The endpoints over the loaded model, its species facts and the optional reference set."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **health, "batches": service.batcher.batches}

    @router.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        prepared, pred, _ = await _predicted(request, service)
        label = pred[Col.LABEL]
        out = {"label": label, "confidence": pred[Col.CONFIDENCE], "topk": service.top_k(pred[Col.PROBS], top_k),
               "species": species_facts(species, label), "sha256": prepared.sha256,
               "phash": prepared.facts[Col.PHASH], "dhash": prepared.facts[Col.DHASH],
               "format": prepared.facts[Col.FORMAT], "width": prepared.facts[Col.WIDTH],
               "height": prepared.facts[Col.HEIGHT], "precision": pred[Col.PRECISION]}
        if reference is not None:
            out["duplicates"] = reference.duplicates(prepared.sha256, prepared.facts[Col.PHASH],
                                                     prepared.facts[Col.DHASH])
        return out

    @router.post("/api/similar")
    async def similar(request: Request) -> dict[str, Any]:
        if reference is None:
            raise HTTPException(404, "no reference set: start the server with --reference MANIFEST")
        query_k = _k(request.query_params.get("k"))  # checked before the upload is decoded
        _, pred, form_k = await _predicted(request, service)
        k = query_k or _k(form_k) or DEFAULT_K
        return _matches(pred[Col.EMBEDDING], reference, species, k)

    return router


async def _predicted(request: Request, service: ModelService) -> tuple[Prepared, dict, str | None]:
    """The upload in multipart field `image`, decoded in a thread and predicted in the next batch;
    400 with the reason where it is no usable image, 413 where it is too large."""
    data, k = await _upload(request)
    with service.batcher.expecting():  # the batch being formed may wait for this upload's decode
        try:
            prepared = await run_in_threadpool(service.prepare, data)
        except UnusableImage as exc:
            raise HTTPException(400, str(exc)) from None
    # submitted once no longer counted as coming: a lone request's batch does not wait for itself
    pred = await asyncio.wrap_future(service.submit(prepared))
    if isinstance(pred, str):  # stages.infer.NON_FINITE: the model cannot answer for this image
        raise HTTPException(400, pred)
    return prepared, pred, k


async def _upload(request: Request) -> tuple[bytes, str | None]:
    """The bytes of the multipart field `image` (and a form field `k`, if any)."""
    try:
        form = await request.form(max_files=1, max_fields=4)
    except BodyTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except HTTPException:
        raise
    except Exception as exc:  # a malformed multipart body, or none at all
        raise HTTPException(400, f"expected a multipart/form-data upload with a file field '{_FIELD}' ({exc})") \
            from None
    try:
        upload = form.get(_FIELD)
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, f"expected a multipart/form-data upload with a file field '{_FIELD}'")
        k = form.get("k")
        return await upload.read(), k if isinstance(k, str) else None
    finally:
        await form.close()


def _k(raw: str | None) -> int | None:
    """k from the query or the form, None where not given; 400 unless 1..MAX_K."""
    if raw is None:
        return None
    try:
        k = int(raw)
    except ValueError:
        raise HTTPException(400, f"k must be a whole number, not {raw!r}") from None
    if not 1 <= k <= MAX_K:
        raise HTTPException(400, f"k must be between 1 and {MAX_K}, not {k}")
    return k


def _matches(embedding, reference: ReferenceSet, species: Mapping[str, Any], k: int) -> dict[str, Any]:
    """similar's answer for one embedding (curation.similar.rank), each match with its id, thumbnail
    and full-size URLs and its species facts."""
    from dinobatch.curation.similar import rank

    ranked = rank(embedding, reference.labels, reference.embeddings, reference.paths, top_k=k, neighbours=k,
                  species={})
    matches = []
    for m in ranked["nearest"]:
        image_id = reference.ids[m["path"]]
        matches.append({"id": image_id, "path": m["path"], "label": m["label"], "similarity": m["similarity"],
                        "species": species_facts(species, m["label"]), "thumb": f"/api/thumb/{image_id}",
                        "full": f"/api/image/{image_id}"})
    return {"matches": matches,
            "species": [{"label": s["label"], "similarity": s["similarity"],
                         "species": species_facts(species, s["label"])} for s in ranked["species"]]}
