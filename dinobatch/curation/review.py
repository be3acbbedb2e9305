"""Curation outputs: the review queue as Parquet and CSV, a summary, and the review page.

The review page is one page for two modes: "static" (curate --html writes review.html, opened from
disk) and "server" (dinobatch serve --queue). Both show the document review_document builds.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from dinobatch.curation.reasons import Reason
from dinobatch.io.arrow import write_table
from dinobatch.io.files import atomic_path
from dinobatch.io.terminal import spreadsheet_safe
from dinobatch.schema import Col

__all__ = ["write_outputs", "queue_schema", "QUEUE_COLUMNS", "review_document", "render_review_page", "Urls"]

log = logging.getLogger(__name__)

QUEUE_COLUMNS = (Col.PATH, Col.SHA256, Col.STATUS, Col.GIVEN_LABEL, Col.SPLIT, Col.PREDICTED_LABEL,
                 Col.SUGGESTED_LABEL, Col.CONFIDENCE, Col.SCORE, Col.REASONS, Col.DETAILS, Col.DUPLICATE_GROUP,
                 Col.IN_REVIEW)
_THUMB = 160
_MODES = ("static", "server")
_STATIC = Path(__file__).resolve().parent.parent / "serve" / "static"  # package data: review.js, review.css
_TEMPLATE = Path(__file__).resolve().parent / "review_page.html"

Urls = Callable[[Path], tuple[str | None, str | None]]  # a file's absolute path -> (thumbnail URL, full-size URL)


def queue_schema():
    """queue.parquet's schema: one row per flagged image, most urgent first (QUEUE_COLUMNS)."""
    import pyarrow as pa

    types = {Col.CONFIDENCE: pa.float32(), Col.SCORE: pa.float32(), Col.REASONS: pa.list_(pa.string()),
             Col.DUPLICATE_GROUP: pa.int64(), Col.IN_REVIEW: pa.bool_()}
    return pa.schema([(name, types.get(name, pa.string())) for name in QUEUE_COLUMNS])


def write_outputs(result, out: str | Path, *, html_page: bool) -> dict[str, Path]:
    """queue.parquet, queue.csv, groups.json, summary.json and, with html_page, review.html with thumbs/."""
    import pyarrow as pa

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(result.queue, schema=queue_schema())
    paths = {"queue.parquet": write_table(table, out / "queue.parquet")}
    with atomic_path(out / "queue.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=QUEUE_COLUMNS)
            writer.writeheader()
            for q in result.queue:
                row = {**q, Col.REASONS: ";".join(q[Col.REASONS])}
                writer.writerow({k: spreadsheet_safe(v) if isinstance(v, str) else v for k, v in row.items()})
    paths["queue.csv"] = out / "queue.csv"
    paths["groups.json"] = _write_json(out / "groups.json", result.groups)
    paths["summary.json"] = _write_json(out / "summary.json", _summary(result))
    if html_page:
        paths["review.html"] = _page(out)
    return paths


def _summary(result) -> dict[str, Any]:
    """summary.json: counts, thresholds passed, what the review page shows, and what the review applies to."""
    shown = [q for q in result.queue if q.get(Col.IN_REVIEW, True)]
    from dinobatch.curation.curate import review_key

    return {"images": result.images, "flagged": len(result.queue), "counts": result.counts,
            "breaches": result.breaches, "duplicate_groups": len(result.groups),
            "review": {"max_items": result.max_review, "items": len({review_key(q) for q in shown}),
                       "files": len(shown), "left_out": len(result.queue) - len(shown)},
            "manifest": result.manifest, "folder": result.source_folder, "labels": result.labels,
            "confusion": result.confusion}


def _write_json(path: Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path


def _thumbnail(source: Path, target: Path) -> bool:
    """A small JPEG of an image (decoded with draft, oriented, on white); False when it cannot be read."""
    from dinobatch.imaging.decode import DecodeError, decode
    from dinobatch.io.walk import read_bytes

    if target.exists():
        return True
    try:
        img = decode(read_bytes(str(source)), min_side=_THUMB).image
    except (OSError, DecodeError):
        return False
    img.thumbnail((_THUMB, _THUMB))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        img.save(tmp, "JPEG", quality=80)
    return True


def _static_urls(out: Path, shas: dict[Path, str]) -> Urls:
    """review.html's URLs: a thumbnail made beside it (named by content) and the original as a file:// URL."""
    def urls(path: Path) -> tuple[str | None, str | None]:
        sha = shas.get(path)
        name = f"thumbs/{sha[:16]}.jpg" if sha else None
        thumb = name if name and _thumbnail(path, out / name) else None
        return thumb, path.as_uri() if path.is_absolute() else None
    return urls


def _page(out: Path) -> Path:
    """Write review.html (static mode: the document inside, decisions kept in the browser)."""
    import pyarrow.parquet as pq

    summary = _read_json(out / "summary.json") or {}
    root = Path(summary["folder"]) if summary.get("folder") else None
    rows = pq.read_table(out / "queue.parquet", columns=[Col.PATH, Col.SHA256]).to_pylist()
    rows += [m for g in (_read_json(out / "groups.json") or []) for m in g]
    shas = {root / r[Col.PATH]: r[Col.SHA256] for r in rows if root and r[Col.SHA256]}
    document = review_document(out, _static_urls(out, shas))
    page = render_review_page(document, mode="static", title=f"dinobatch review: {out}")
    with atomic_path(out / "review.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "review.html"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def review_document(queue_dir: str | Path, urls: Urls) -> dict[str, Any]:
    """The queue as the review page shows it: the entries in review, a duplicate group as ONE item with every
    member, the model's labels, each reason's meaning, and the queue's identity (sha256 of queue.parquet).

    urls(absolute path) gives each member's (thumbnail, full-size) URLs: thumbs/ and file:// for review.html,
    /api/thumb/{id} and /api/image/{id} for the server."""
    import pyarrow.parquet as pq

    from dinobatch.curation.curate import review_key

    queue_dir = Path(queue_dir)
    parquet = queue_dir / "queue.parquet"
    summary = _read_json(queue_dir / "summary.json") or {}
    entries = [q for q in pq.read_table(parquet).to_pylist() if q.get(Col.IN_REVIEW, True) is not False]
    groups = {m[Col.DUPLICATE_GROUP]: g for g in (_read_json(queue_dir / "groups.json") or [])
              for m in g[:1] if m.get(Col.DUPLICATE_GROUP) is not None}
    root = Path(summary["folder"]) if summary.get("folder") else None
    items: dict[str, list[dict[str, Any]]] = {}
    for q in entries:  # score order: an item's first entry is its best
        items.setdefault(review_key(q), []).append(q)
    labels = summary.get("labels") or sorted({q[c] for q in entries for c in (Col.PREDICTED_LABEL, Col.GIVEN_LABEL)
                                              if q[c]})
    return {"items": [_item(key, flagged, groups, root, urls) for key, flagged in items.items()],
            "labels": labels, "reasons": {r.value: f"{r.description} (score {r.scores()})" for r in Reason},
            "identity": hashlib.sha256(parquet.read_bytes()).hexdigest(),
            "summary": {k: summary.get(k) for k in ("images", "flagged", "counts", "review", "confusion")}}


def _item(key: str, flagged: list[dict[str, Any]], groups: dict, root: Path | None, urls: Urls) -> dict[str, Any]:
    """One review item from its flagged entries (more than one only for a duplicate group)."""
    best = flagged[0]
    group = best[Col.DUPLICATE_GROUP]
    reasons = list(dict.fromkeys(r for q in flagged for r in q[Col.REASONS]))
    details = "; ".join(dict.fromkeys(q[Col.DETAILS] for q in flagged if q[Col.DETAILS]))
    if group is not None and group in groups:
        members = [{Col.PATH: m[Col.PATH], "label": m[Col.LABEL], Col.PREDICTED_LABEL: m.get(Col.PREDICTED_LABEL),
                    Col.CONFIDENCE: m.get(Col.CONFIDENCE), Col.SPLIT: m[Col.SPLIT], "kept": m["kept"]}
                   for m in groups[group]]
    else:
        members = [{Col.PATH: q[Col.PATH], "label": q[Col.GIVEN_LABEL], Col.PREDICTED_LABEL: q[Col.PREDICTED_LABEL],
                    Col.CONFIDENCE: q[Col.CONFIDENCE], Col.SPLIT: q[Col.SPLIT], "kept": None} for q in flagged]
    for m in members:
        m["thumb"], m["full"] = urls(root / m[Col.PATH] if root else Path(m[Col.PATH]))
    return {"key": key, **{c: best[c] for c in (Col.PATH, Col.GIVEN_LABEL, Col.PREDICTED_LABEL, Col.SUGGESTED_LABEL,
                                               Col.CONFIDENCE, Col.SPLIT, Col.DUPLICATE_GROUP)},
            Col.SCORE: round(best[Col.SCORE], 4),  # float32 in the Parquet file: 0.985, not 0.98500001
            Col.REASONS: reasons, Col.DETAILS: details, "members": members}


def render_review_page(document: dict[str, Any] | None, *, mode: str, token: str | None = None,
                       title: str = "dinobatch review") -> str:
    """The review page, its JS and CSS inline. mode "static": the document is embedded and decisions stay in
    the browser; mode "server": the page loads /api/queue and posts each decision with the token."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}")
    if mode == "server" and not token:
        raise ValueError("the server page needs the process's token")
    payload = json.dumps(document if mode == "static" else None)
    parts = {"__TITLE__": html.escape(title), "__MODE__": mode, "__TOKEN__": html.escape(token or ""),
             "__CSS__": (_STATIC / "review.css").read_text(encoding="utf-8"),
             "__JS__": (_STATIC / "review.js").read_text(encoding="utf-8").replace("</", "<\\/"),
             "__DATA__": payload.replace("<", "\\u003c")}  # no '</script>' or '<!--' can reach the HTML parser
    # one pass: a value (a path in the title or the data) is never read as a placeholder
    return re.sub("|".join(parts), lambda m: parts[m[0]], _TEMPLATE.read_text(encoding="utf-8"))
