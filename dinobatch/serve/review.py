"""/review and its API: the queue document, each decision made durable before it is acknowledged, and
"Apply" (relabel's dry run, then a new manifest version). The token is checked before a route runs
(serve.guard); decisions are kept by curation.decisions (decisions.jsonl, then decisions.csv)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from dinobatch.curation.decisions import Decision, Journal, new_decision, queue_progress
from dinobatch.errors import DataError, DinobatchError, InputError, LockedError, OutputError
from dinobatch.serve.context import ServeContext

__all__ = ["review_router", "REVIEWER_HEADER"]

log = logging.getLogger(__name__)

REVIEWER_HEADER = "x-dinobatch-reviewer"  # who decides; else the login name of the server's user


class _Review:
    """What the routes share: the queue document (built once: the queue does not change while served),
    the files a decision may name, the labels a relabel may give, and the journal."""

    def __init__(self, ctx: ServeContext) -> None:
        from dinobatch.curation.review import review_document

        if ctx.queue_dir is None:
            raise InputError("review needs --queue, the folder `dinobatch curate -o` wrote")
        self.ctx, self.folder = ctx, Path(ctx.queue_dir)
        self.document = review_document(self.folder, self._urls)
        self.items: list[dict[str, Any]] = self.document["items"]
        self.paths = {m["path"] for item in self.items for m in item.get("members") or [item]}
        self.paths |= {item["path"] for item in self.items}
        self.labels = set(self.document.get("labels") or ()) | set(ctx.labels)
        self.journal = Journal(self.folder)
        if self.journal.skipped:
            log.warning("review: %d line(s) of %s were cut short by a kill and skipped",
                        len(self.journal.skipped), self.journal.path)

    def _urls(self, path: Path) -> tuple[str | None, str | None]:
        """A queue file's thumbnail and full-size URLs, by id: the page never names a path to the server."""
        image_id = self.ctx.images.add(path)
        return f"/api/thumb/{image_id}", f"/api/image/{image_id}"

    def decide(self, body: Any, reviewer: str | None) -> dict[str, int]:
        """Check a posted decision against the queue, make it durable, and return the progress."""
        if not isinstance(body, dict):
            raise DataError("the body must be a JSON object: {path, action, label, note}")
        fields = {k: body.get(k) for k in ("path", "action", "label", "note")}
        wrong = [k for k, v in fields.items() if not isinstance(v, str) and not (v is None and k in ("label", "note"))]
        if wrong:
            raise DataError(f"{', '.join(wrong)}: must be text")
        decision = new_decision(fields["path"], fields["action"], fields["label"] or "", fields["note"] or "",
                                reviewer=reviewer)
        if decision.path not in self.paths:
            raise DataError(f"{decision.path!r} is not a file of this review queue")
        if decision.action == "relabel" and decision.label not in self.labels:
            raise DataError(f"{decision.label!r} is not one of the labels: {', '.join(sorted(self.labels))}")
        return queue_progress(self.journal.record(decision), self.items)

    def queue(self) -> dict[str, Any]:
        """The document and the current decisions, so that a reloaded page resumes."""
        current = self.journal.current()
        return {**self.document, "decisions": {p: _shown(d) for p, d in current.items()},
                "progress": queue_progress(current, self.items)}

    def apply(self, dry_run: bool, user: str | None) -> dict[str, Any]:
        """relabel the manifest curate used with decisions.csv: its dry run, or a new manifest version."""
        from dinobatch.curation.relabel import relabel

        manifest = self._manifest()
        if not self.journal.current():
            raise DataError("no decisions yet: nothing to apply")
        with self.journal.held():  # decisions.csv stays as relabel read it (its sha256 is the version's origin)
            # the labels the page offers (the model's) may be new to the manifest: relabel's --new-label
            done = relabel(str(self.journal.csv_path), str(manifest), dry_run=dry_run, user=user,
                           new_labels=sorted(self.labels))
        counts: dict[str, int] = {}
        for c in done.changes:
            counts[c.action] = counts.get(c.action, 0) + 1
        return {"dry_run": dry_run, "outcome": done.outcome, "manifest": str(manifest),
                "new_manifest": str(done.target) if done.target else None, "counts": counts,
                "changes": [{"path": c.path, "action": c.action, "old_label": c.old_label, "new_label": c.new_label,
                             "note": c.note} for c in done.changes]}

    def _manifest(self) -> Path:
        """The manifest curate read (summary.json's "manifest"), which Apply changes."""
        import json

        try:
            summary = json.loads((self.folder / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {self.folder / 'summary.json'}: {exc}") from exc
        manifest = summary.get("manifest") if isinstance(summary, dict) else None
        if not manifest:
            raise DataError("this queue was curated without --manifest: there is no manifest to apply the "
                            "decisions to (decisions.csv is kept; give it to `dinobatch relabel --manifest`)")
        return Path(manifest)


def _shown(d: Decision) -> dict[str, str]:
    return {"action": d.action, "label": d.label, "note": d.note, "reviewer": d.reviewer, "decided_at": d.decided_at}


def _error(exc: DinobatchError) -> JSONResponse:
    """A refusal as JSON {"error": reason}: 409 when another relabel holds the manifest, 503 when the
    decision could not be written (a full disk: nothing was acknowledged), else 400 (the request's fault)."""
    status = 409 if isinstance(exc, LockedError) else 503 if isinstance(exc, OutputError) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


def review_router(ctx: ServeContext) -> APIRouter:
    """GET /review, GET /api/queue, POST /api/decisions, POST /api/apply over ctx's queue folder."""
    from dinobatch.curation.review import render_review_page

    review = _Review(ctx)
    page = render_review_page(None, mode="server", token=ctx.token, title=f"dinobatch review: {review.folder}")
    router = APIRouter()

    @router.get("/review", response_class=HTMLResponse)
    def review_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/api/queue")
    def queue() -> JSONResponse:
        return JSONResponse(review.queue(), headers={"Cache-Control": "no-store"})

    @router.post("/api/decisions")
    async def decisions(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return JSONResponse({"error": "the body is not JSON: {path, action, label, note}"}, status_code=400)
        try:  # in a thread: the fsyncs must not stall the other requests
            return JSONResponse(await run_in_threadpool(review.decide, body, request.headers.get(REVIEWER_HEADER)))
        except DinobatchError as exc:
            return _error(exc)

    @router.post("/api/apply")
    async def apply(request: Request, dry_run: bool = False) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(review.apply, dry_run, request.headers.get(REVIEWER_HEADER)))
        except DinobatchError as exc:
            return _error(exc)
        except OSError as exc:  # relabel could not write the new version (a full disk): the request was fine
            return JSONResponse({"error": f"not applied: {exc.strerror or exc}"}, status_code=503)

    return router
