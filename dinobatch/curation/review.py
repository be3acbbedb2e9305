"""Curation outputs: the review queue as Parquet and CSV, a summary, and a static review page."""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

from dinobatch.curation.reasons import Reason
from dinobatch.io.arrow import write_table
from dinobatch.io.files import atomic_path
from dinobatch.io.terminal import spreadsheet_safe
from dinobatch.schema import Col

__all__ = ["write_outputs", "queue_schema", "QUEUE_COLUMNS"]

log = logging.getLogger(__name__)

QUEUE_COLUMNS = (Col.PATH, Col.SHA256, Col.STATUS, Col.GIVEN_LABEL, Col.SPLIT, Col.PREDICTED_LABEL,
                 Col.SUGGESTED_LABEL, Col.CONFIDENCE, Col.SCORE, Col.REASONS, Col.DETAILS, Col.DUPLICATE_GROUP)
_THUMB = 160


def queue_schema():
    """queue.parquet's schema: one row per flagged image, most urgent first (QUEUE_COLUMNS)."""
    import pyarrow as pa

    types = {Col.CONFIDENCE: pa.float32(), Col.SCORE: pa.float32(), Col.REASONS: pa.list_(pa.string()),
             Col.DUPLICATE_GROUP: pa.int64()}
    return pa.schema([(name, types.get(name, pa.string())) for name in QUEUE_COLUMNS])


def write_outputs(result, out: str | Path, *, html_page: bool) -> dict[str, Path]:
    """queue.parquet, queue.csv, summary.json and, with html_page, review.html with thumbs/."""
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
    summary = {"images": result.images, "flagged": len(result.queue), "counts": result.counts,
               "breaches": result.breaches, "duplicate_groups": len(result.groups)}
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["summary.json"] = out / "summary.json"
    if html_page:
        paths["review.html"] = _page(result, summary, out)
    return paths


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


def _thumbs(result, out: Path) -> dict[str, str]:
    """Thumbnails of every queued and grouped image, named by content: sha256 -> relative src."""
    if not result.source_folder:
        return {}
    root = Path(result.source_folder)
    wanted = {q[Col.SHA256]: q[Col.PATH] for q in result.queue if q[Col.SHA256]}
    wanted.update({m[Col.SHA256]: m[Col.PATH] for g in result.groups for m in g if m[Col.SHA256]})
    srcs = {}
    for sha, rel in wanted.items():
        name = f"thumbs/{sha[:16]}.jpg"
        if _thumbnail(root / rel, out / name):
            srcs[sha] = name
    return srcs


def _page(result, summary: dict[str, Any], out: Path) -> Path:
    srcs = _thumbs(result, out)
    data = {"queue": [{**q, "thumb": srcs.get(q[Col.SHA256] or "")} for q in result.queue],
            "groups": [[{**m, "thumb": srcs.get(m[Col.SHA256] or "")} for m in g] for g in result.groups],
            "summary": summary, "confusion": result.confusion,
            "reasons": {r.value: f"{r.description} (score {r.scores()})" for r in Reason}}
    payload = json.dumps(data).replace("<", "\\u003c")  # no '</script>' or '<!--' can reach the HTML parser
    page = _TEMPLATE.replace("__TITLE__", html.escape(f"dinobatch review: {out}")).replace("__DATA__", payload)
    with atomic_path(out / "review.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "review.html"


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3} td.diag{background:#dde8ff} td.off{background:#ffe0e0}
#gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{width:180px;border:1px solid #ccc;border-radius:6px;padding:6px;font-size:12px}
.card img,.group img{width:160px;height:160px;object-fit:contain;background:#fafafa}
.reason{display:inline-block;background:#eee;border-radius:3px;padding:0 4px;margin:1px}
.group{display:flex;gap:8px;margin-bottom:10px;border-bottom:1px solid #eee;padding-bottom:8px}
.group div{width:164px;font-size:12px}
.noimg{width:160px;height:160px;display:flex;align-items:center;justify-content:center;background:#eee}
</style></head><body>
<h1>dinobatch review</h1>
<div id="summary"></div>
<h2>Given label against prediction</h2><div id="confusion"></div>
<h2>Review queue, most urgent first</h2>
<label>Reason: <select id="filter"><option value="">all</option></select></label>
<p id="shown"></p><div id="gallery"></div><p><button id="more">Show more</button></p>
<h2>Duplicate groups</h2><div id="groups"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const img = (src, alt) => src ? `<img loading="lazy" src="${esc(src)}" alt="${esc(alt)}">` : `<div class="noimg">no preview</div>`;
const S = D.summary;
document.getElementById('summary').innerHTML =
  `<p><b>${S.images}</b> images, <b>${S.flagged}</b> to review, <b>${S.duplicate_groups}</b> duplicate groups</p>` +
  '<table><tr><th>reason</th><th>images</th><th>what it means</th></tr>' +
  Object.entries(S.counts).map(([k, v]) => `<tr><td style="text-align:left">${esc(k)}</td><td>${v}</td>` +
    `<td style="text-align:left">${esc(D.reasons[k])}</td></tr>`).join('') + '</table>' +
  (S.breaches.length ? `<p style="color:#b00">Thresholds passed: ${S.breaches.map(esc).join('; ')}</p>` : '');
const C = D.confusion;
document.getElementById('confusion').innerHTML = C.labels.length ?
  '<table><tr><th>given \\\\ predicted</th>' + C.labels.map(l => `<th>${esc(l)}</th>`).join('') + '</tr>' +
  C.counts.map((row, i) => `<tr><th>${esc(C.labels[i])}</th>` + row.map((v, j) =>
    `<td class="${v ? (i === j ? 'diag' : 'off') : ''}">${v || ''}</td>`).join('') + '</tr>').join('') + '</table>'
  : '<p>No labels given (run curate with --manifest).</p>';
const sel = document.getElementById('filter');
Object.keys(S.counts).filter(k => S.counts[k]).forEach(k => sel.add(new Option(`${k} (${S.counts[k]})`, k)));
let shown = 0, items = D.queue;
const PAGE = 100;
function card(q) {
  return `<div class="card">${img(q.thumb, q.path)}<div><b>${esc(q.path)}</b></div>` +
    `<div>given: <b>${esc(q.given_label ?? '-')}</b></div><div>suggested: <b>${esc(q.suggested_label ?? '-')}</b></div>` +
    `<div>score ${Number(q.score).toFixed(2)}</div>` + q.reasons.map(r => `<span class="reason" title="${esc(D.reasons[r])}">${esc(r)}</span>`).join('') +
    `<div title="${esc(q.details)}">${esc(String(q.details ?? '').slice(0, 160))}</div></div>`;
}
function render(reset) {
  const g = document.getElementById('gallery');
  if (reset) { g.innerHTML = ''; shown = 0; }
  g.insertAdjacentHTML('beforeend', items.slice(shown, shown + PAGE).map(card).join(''));
  shown = Math.min(items.length, shown + PAGE);
  document.getElementById('shown').textContent = `showing ${shown} of ${items.length}`;
  document.getElementById('more').style.display = shown < items.length ? '' : 'none';
}
sel.onchange = () => { items = sel.value ? D.queue.filter(q => q.reasons.includes(sel.value)) : D.queue; render(true); };
document.getElementById('more').onclick = () => render(false);
render(true);
document.getElementById('groups').innerHTML = D.groups.length ? D.groups.map(g => '<div class="group">' +
  g.map(m => `<div>${img(m.thumb, m.path)}<div>${esc(m.path)}${m.kept ? ' (kept)' : ''}</div>` +
    `<div>${esc(m.label ?? '')} ${esc(m.split ?? '')}</div></div>`).join('') + '</div>').join('')
  : '<p>No duplicate groups.</p>';
</script></body></html>
"""
