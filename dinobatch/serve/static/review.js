// The dinobatch review page: one item at a time, keyboard first, for both modes.
// "static" (review.html from disk): the queue is embedded; decisions are a journal in localStorage and
// are downloaded as decisions.csv. "server" (dinobatch serve --queue): the queue comes from /api/queue
// and each decision is posted at once; it counts as made only once the server has answered.
(() => {
  'use strict';
  const MODE = document.documentElement.dataset.mode;
  const TOKEN = document.querySelector('meta[name="dinobatch-token"]').content;
  const COLUMNS = ['path', 'action', 'label', 'note', 'reviewer', 'decided_at'];  // relabel's columns
  const $ = id => document.getElementById(id);
  const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
  const fmt = n => n.toLocaleString('en-US');

  let doc = null;            // the queue document (review_document)
  let decisions = new Map(); // path -> current decision, in the order the current decisions were made
  let journal = [];          // static mode: every event, undo included (replayed on load)
  let session = [];          // paths decided in this page, newest last (what u takes back first)
  let view = [];             // indices of the items the filters let through
  let pos = 0;               // index into view
  let member = 0;            // the selected member of the current item
  let busy = false;          // a post in flight: keys wait, so decisions reach the server in order

  // ---- storage -------------------------------------------------------------------------------
  const storeKey = () => `dinobatch-review:${doc.identity}`;

  // as curation.decisions.replay: undo takes back the file's latest decision; files in the order first decided
  function replay(events) {
    const stacks = new Map();
    for (const e of events) {
      if (!stacks.has(e.path)) stacks.set(e.path, []);
      const stack = stacks.get(e.path);
      if (e.action !== 'undo') stack.push(e); else stack.pop();
    }
    const current = new Map();
    for (const [path, stack] of stacks) if (stack.length) current.set(path, stack[stack.length - 1]);
    return current;
  }

  function nowIso() { return new Date().toISOString().replace(/\.\d+Z$/, '+00:00'); }

  async function record(path, action, label, note) {
    if (MODE === 'server') return post({path, action, label, note});
    const event = {path, action, label: label || '', note: note || '', reviewer: $('reviewer').value.trim(),
                   decided_at: nowIso()};
    const next = journal.concat([event]);
    try {
      localStorage.setItem(storeKey(), JSON.stringify({journal: next}));
    } catch (err) {
      banner(`Not saved: the browser refused to store the decision (${err.message}). Download decisions.csv now.`);
      return false;
    }
    journal = next;
    decisions = replay(journal);
    return true;
  }

  async function post(body) {
    let res;
    try {
      res = await fetch('/api/decisions', {method: 'POST', headers: {'Content-Type': 'application/json',
        'X-Dinobatch-Token': TOKEN}, body: JSON.stringify(body)});
    } catch (err) {
      banner(`Not saved: the server cannot be reached (${err.message}). Your last decision was not recorded.`);
      return false;
    }
    if (!res.ok) {
      banner(`Not saved: the server refused the decision (${await refusal(res)}).`);
      return false;
    }
    if (body.action === 'undo') await load();  // the path's earlier decision, if any, is current again
    else { decisions.delete(body.path); decisions.set(body.path, {...body, decided_at: nowIso()}); }
    return true;
  }

  async function load() {
    const res = await fetch('/api/queue', {headers: {'Accept': 'application/json'}});
    if (!res.ok) throw new Error(`GET /api/queue: HTTP ${res.status}`);
    const data = await res.json();
    const entries = Object.entries(data.decisions || {}).map(([path, d]) => ({path, ...d}));
    decisions = new Map(entries.map(e => [e.path, e]));
    return data;
  }

  function banner(text) { const b = $('banner'); b.textContent = text; b.hidden = !text; }

  // the server's reason for a refusal: its JSON {error} (or FastAPI's {detail}), after the status
  async function refusal(res) {
    let reason = `HTTP ${res.status}`;
    try { const j = await res.json(); reason += `: ${j.detail ?? j.error ?? JSON.stringify(j)}`; } catch (_) { /* not JSON */ }
    return reason;
  }

  // ---- the CSV relabel takes -------------------------------------------------------------------
  // as curation.decisions.csv_text: Python's csv (minimal quoting, CRLF), text cells spreadsheet-safe
  const FORMULA_START = ['=', '+', '-', '@', '\t', '\r'];
  const safe = v => { const s = String(v ?? ''); return FORMULA_START.some(c => s.startsWith(c)) ? "'" + s : s; };

  function cell(value) {
    const s = String(value ?? '');
    return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function decisionsCsv() {
    const lines = [COLUMNS.join(',')];
    for (const d of decisions.values()) {
      lines.push([safe(d.path), d.action, d.label, safe(d.note), safe(d.reviewer), d.decided_at].map(cell).join(','));
    }
    return lines.map(l => l + '\r\n').join('');
  }

  function download() {
    const url = URL.createObjectURL(new Blob([decisionsCsv()], {type: 'text/csv;charset=utf-8'}));
    const a = document.createElement('a');
    a.href = url; a.download = 'decisions.csv';
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---- what is shown ---------------------------------------------------------------------------
  // as curation.decisions.queue_progress: an item is reviewed once any of its files has a decision
  const decided = item => decisions.has(item.path) || item.members.some(m => decisions.has(m.path));
  const current = () => doc.items[view[pos]];

  function applyFilters() {
    const reason = $('reason-filter').value, label = $('label-filter').value;
    view = doc.items.map((_, i) => i).filter(i => {
      const it = doc.items[i];
      return (!reason || it.reasons.includes(reason)) &&
        (!label || [it.given_label, it.predicted_label, it.suggested_label].includes(label) ||
         it.members.some(m => m.label === label || m.predicted_label === label));
    });
    const first = view.findIndex(i => !decided(doc.items[i]));
    pos = first >= 0 ? first : 0;
    member = firstUndecidedMember();
    render();
  }

  function firstUndecidedMember() {
    const it = current();
    if (!it) return 0;
    const i = it.members.findIndex(m => !decisions.has(m.path));
    return i >= 0 ? i : 0;
  }

  function fillFilters() {
    const counts = {};
    for (const it of doc.items) for (const r of it.reasons) counts[r] = (counts[r] || 0) + 1;
    for (const r of Object.keys(doc.reasons)) if (counts[r]) $('reason-filter').add(new Option(`${r} (${counts[r]})`, r));
    const labels = new Set();
    for (const it of doc.items) for (const l of [it.given_label, it.predicted_label, it.suggested_label]) if (l) labels.add(l);
    for (const l of [...labels].sort()) $('label-filter').add(new Option(l, l));
  }

  function progress() {
    const done = doc.items.filter(decided).length;
    $('progress').textContent = `${fmt(done)} of ${fmt(doc.items.length)} reviewed`;
  }

  function memberHtml(m, i, many) {
    const d = decisions.get(m.path);
    const img = m.full || m.thumb
      ? `<img src="${esc(m.full || m.thumb)}" data-thumb="${esc(m.thumb || '')}" alt="${esc(m.path)}">`
      : '<div class="noimg">no preview</div>';
    const badge = d ? `<span class="decision ${esc(d.action)}">${esc(d.action)}${d.action === 'relabel' ? ' → ' + esc(d.label) : ''}</span>` : '';
    return `<figure class="member${i === member ? ' current' : ''}" data-index="${i}">${img}<figcaption>` +
      `${many ? `<b>${i + 1}</b> ` : ''}<span class="path" tabindex="0" title="${esc(m.path)}">${esc(m.path)}</span>` +
      `<div>given <b>${esc(m.label ?? '-')}</b>${m.split ? ` (${esc(m.split)})` : ''} · predicted <b>${esc(m.predicted_label ?? '-')}</b>` +
      `${m.confidence != null ? ` (${Number(m.confidence).toFixed(2)})` : ''}${m.kept === true ? ' · kept copy' : ''}</div>` +
      `${m.full ? `<a href="${esc(m.full)}" target="_blank" rel="noopener">full size</a> ` : ''}${badge}</figcaption></figure>`;
  }

  function render() {
    progress();
    const it = current();
    if (!it) { $('item').innerHTML = `<p>${doc.items.length ? 'No item matches the filters.' : 'Nothing to review.'}</p>`; return; }
    const many = it.members.length > 1;
    $('item').innerHTML =
      `<div class="meta"><span>item <b>${fmt(pos + 1)}</b> of ${fmt(view.length)}</span>` +
      `<span>given <b>${esc(it.given_label ?? '-')}</b></span><span>predicted <b>${esc(it.predicted_label ?? '-')}</b>` +
      `${it.confidence != null ? ` (${Number(it.confidence).toFixed(2)})` : ''}</span>` +
      `<span>suggested <b>${esc(it.suggested_label ?? '-')}</b></span><span>score <b>${Number(it.score).toFixed(2)}</b></span>` +
      `${many ? `<span>${it.members.length} copies of one image</span>` : ''}</div>` +
      `<ul class="reasons">${it.reasons.map(r => `<li><span class="reason-name">${esc(r)}</span> ${esc(doc.reasons[r] ?? '')}</li>`).join('')}</ul>` +
      `<div class="details">${esc(it.details)}</div>` +
      `<div class="members${many ? '' : ' single'}">${it.members.map((m, i) => memberHtml(m, i, many)).join('')}</div>`;
    for (const img of $('item').querySelectorAll('img[data-thumb]')) {
      img.addEventListener('error', () => { if (img.dataset.thumb && img.src !== new URL(img.dataset.thumb, location.href).href) img.src = img.dataset.thumb; }, {once: true});
    }
  }

  function summary() {
    const s = doc.summary || {};
    const rv = s.review || {};
    let text = `<p>${fmt(s.images ?? 0)} images, ${fmt(s.flagged ?? 0)} flagged; this review shows ${fmt(doc.items.length)} items`;
    if (rv.left_out) text += ` (${fmt(rv.left_out)} flagged files beyond --max-review ${rv.max_items} are in queue.csv, marked in_review=False)`;
    text += '.</p><table><tr><th>reason</th><th>images</th><th>what it means</th></tr>' +
      Object.entries(s.counts || {}).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td><td style="text-align:left">${esc(doc.reasons[k])}</td></tr>`).join('') + '</table>';
    const c = s.confusion;
    if (c && c.labels && c.labels.length) {
      text += '<p>Given label (rows) against prediction (columns)</p><table><tr><th></th>' + c.labels.map(l => `<th>${esc(l)}</th>`).join('') + '</tr>' +
        c.counts.map((row, i) => `<tr><th>${esc(c.labels[i])}</th>` + row.map(v => `<td>${v || ''}</td>`).join('') + '</tr>').join('') + '</table>';
    }
    $('summary-body').innerHTML = text;
  }

  // ---- actions ---------------------------------------------------------------------------------
  async function decide(action, label) {
    const it = current();
    if (!it || busy) return;
    const m = it.members[member];
    busy = true;
    const note = $('note').value.trim();
    const ok = await record(m.path, action, label, note);
    busy = false;
    if (!ok) { render(); return; }
    banner('');
    $('note').value = '';
    session.push(m.path);
    const next = it.members.findIndex((x, i) => i > member && !decisions.has(x.path));
    if (next >= 0) member = next;
    else if (pos < view.length - 1) { pos += 1; member = firstUndecidedMember(); }
    render();
  }

  function latestPath() {
    if (MODE === 'server') {
      const all = [...decisions.values()].sort((a, b) => String(a.decided_at).localeCompare(String(b.decided_at)));
      return all.length ? all[all.length - 1].path : undefined;
    }
    const live = [];
    for (const e of journal) {
      if (e.action !== 'undo') { live.push(e); continue; }
      for (let i = live.length - 1; i >= 0; i--) if (live[i].path === e.path) { live.splice(i, 1); break; }
    }
    return live.length ? live[live.length - 1].path : undefined;
  }

  async function undo() {
    if (busy) return;
    let path = session.pop();
    if (path === undefined) path = latestPath();  // after a reload: the latest decision still standing
    if (path === undefined) return;
    busy = true;
    const ok = await record(path, 'undo', '', '');
    busy = false;
    if (!ok) { session.push(path); render(); return; }
    banner('');
    const at = view.findIndex(i => doc.items[i].members.some(m => m.path === path));
    if (at >= 0) { pos = at; member = current().members.findIndex(m => m.path === path); }
    render();
  }

  function move(step) {
    const to = pos + step;
    if (to < 0 || to >= view.length) return;
    pos = to; member = firstUndecidedMember(); render();
  }

  function skip() {
    for (let i = pos + 1; i < view.length; i++) if (!decided(doc.items[view[i]])) { pos = i; member = firstUndecidedMember(); render(); return; }
    move(1);
  }

  // ---- relabel type-ahead ------------------------------------------------------------------------
  let choices = [], chosen = 0;

  function openRelabel() {
    if (!current()) return;
    $('relabel').hidden = false;
    $('relabel-input').value = '';
    filterLabels();
    $('relabel-input').focus();
  }

  function filterLabels() {
    const q = $('relabel-input').value.trim().toLowerCase();
    const suggested = current().suggested_label;
    const labels = doc.labels.slice().sort((a, b) => (b === suggested) - (a === suggested));
    const starts = labels.filter(l => l.toLowerCase().startsWith(q));
    choices = starts.concat(labels.filter(l => !starts.includes(l) && l.toLowerCase().includes(q)));
    chosen = 0;
    drawChoices();
  }

  function drawChoices() {
    $('relabel-list').innerHTML = choices.map((l, i) => `<li role="option" aria-selected="${i === chosen}">${esc(l)}</li>`).join('') ||
      '<li>no label matches</li>';
  }

  function closeRelabel() { $('relabel').hidden = true; $('item').focus(); }

  $('relabel-input').addEventListener('input', filterLabels);
  $('relabel-input').addEventListener('keydown', e => {
    if (e.key === 'Escape') { e.preventDefault(); closeRelabel(); }
    else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      if (choices.length) { chosen = (chosen + (e.key === 'ArrowDown' ? 1 : choices.length - 1)) % choices.length; drawChoices(); }
    } else if (e.key === 'Enter') {
      e.preventDefault();
      const label = choices[chosen];
      if (!label) return;
      closeRelabel();
      decide('relabel', label);
    }
  });

  // ---- apply (server mode): relabel's dry run shown first, then a new manifest version ----------------
  const ACTIONS = ['keep', 'relabel', 'remove'];
  const SHOWN_CHANGES = 10;  // the dialog lists the first few; the counts cover them all

  // POST /api/apply (with ?dry_run=1 for the summary); the answer, or null once the banner says why not
  async function postApply(dryRun) {
    const what = dryRun ? 'the dry run' : 'the apply';
    let res;
    try {
      res = await fetch(dryRun ? '/api/apply?dry_run=1' : '/api/apply',
                        {method: 'POST', headers: {'X-Dinobatch-Token': TOKEN}});
    } catch (err) {
      banner(`Not applied: the server cannot be reached for ${what} (${err.message}).`);
      return null;
    }
    if (!res.ok) { banner(`Not applied: the server refused ${what} (${await refusal(res)}).`); return null; }
    try { return await res.json(); } catch (err) { banner(`Not applied: ${what} answered no JSON (${err.message}).`); return null; }
  }

  const countsText = counts => ACTIONS.map(a => `${fmt((counts || {})[a] || 0)} ${a}`).join(' · ');

  function changeHtml(c) {
    const what = c.action === 'relabel' ? `${esc(c.old_label)} → <b>${esc(c.new_label)}</b>`
      : c.action === 'remove' ? `<b>remove</b> (${esc(c.old_label)})` : `keep (${esc(c.old_label)})`;
    return `<li><span title="${esc(c.path)}">${esc(c.path)}</span>: ${what}${c.note ? ` <i>${esc(c.note)}</i>` : ''}</li>`;
  }

  function dryRunHtml(dry) {
    const changes = dry.changes || [];
    const more = changes.length - SHOWN_CHANGES;
    return `<p>relabel --dry-run with decisions.csv on <code>${esc(dry.manifest)}</code>: ` +
      `<b>${fmt(changes.length)}</b> decisions, <span id="apply-counts">${countsText(dry.counts)}</span>.</p>` +
      `<ul id="apply-changes">${changes.slice(0, SHOWN_CHANGES).map(changeHtml).join('')}</ul>` +
      (more > 0 ? `<p>… and ${fmt(more)} more.</p>` : '') +
      '<p>Confirm writes a new manifest version beside it (the manifest itself and the image folders are never changed).</p>';
  }

  async function openApply() {
    if (MODE !== 'server' || busy || $('apply-dialog').open) return;
    busy = true;  // no decision changes decisions.csv between the dry run and its summary
    $('apply').disabled = true;
    const dry = await postApply(true);
    busy = false;
    $('apply').disabled = false;
    if (!dry) return;
    banner('');
    $('apply-body').innerHTML = dryRunHtml(dry);
    $('apply-dialog').showModal();
    $('apply-confirm').focus();  // A, then Enter applies; Esc cancels
  }

  async function confirmApply() {
    if (busy) return;
    busy = true;
    $('apply-confirm').disabled = $('apply-cancel').disabled = true;
    const done = await postApply(false);
    busy = false;
    $('apply-confirm').disabled = $('apply-cancel').disabled = false;
    $('apply-dialog').close();
    if (!done) return;
    banner('');
    const n = fmt((done.changes || []).length);
    const head = done.outcome === 'written' || done.outcome === 'finished'
      ? `Applied ${n} decisions (${countsText(done.counts)}) to <code>${esc(done.manifest)}</code>: the new manifest version is `
      : `Already applied: these ${n} decisions are in the manifest version `;
    $('applied').innerHTML = `${head}<code id="new-manifest">${esc(done.new_manifest)}</code>.`;
    $('applied').hidden = false;
  }

  $('apply').addEventListener('click', openApply);
  $('apply-confirm').addEventListener('click', confirmApply);
  $('apply-cancel').addEventListener('click', () => $('apply-dialog').close());
  $('apply-dialog').addEventListener('cancel', e => { if (busy) e.preventDefault(); });  // Esc while applying
  $('apply-dialog').addEventListener('close', () => $('item').focus());

  // ---- keys --------------------------------------------------------------------------------------
  document.addEventListener('keydown', e => {
    if (e.ctrlKey || e.metaKey || e.altKey || !doc || $('apply-dialog').open) return;
    const t = e.target;
    if (t.id === 'note' && (e.key === 'Enter' || e.key === 'Escape')) { e.preventDefault(); $('item').focus(); return; }
    if (t instanceof HTMLInputElement || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement) return;
    const it = current();
    const actions = {
      k: () => decide('keep', ''), x: () => decide('remove', ''), r: openRelabel, u: undo,
      j: () => move(1), ArrowRight: () => move(1), ArrowLeft: () => move(-1), s: skip,
      n: () => $('note').focus(), ...(MODE === 'server' ? {A: openApply} : {}),
    };
    if (/^[1-9]$/.test(e.key) && it && Number(e.key) <= it.members.length) { e.preventDefault(); member = Number(e.key) - 1; render(); return; }
    if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
  });

  for (const id of ['reason-filter', 'label-filter']) $(id).addEventListener('change', e => { applyFilters(); e.target.blur(); });

  // ---- start ---------------------------------------------------------------------------------------
  async function start() {
    if (MODE === 'server') {
      doc = await load();
    } else {
      doc = JSON.parse($('dinobatch-queue').textContent);
      $('reviewer').value = localStorage.getItem('dinobatch-reviewer') || '';
      $('reviewer').addEventListener('change', () => localStorage.setItem('dinobatch-reviewer', $('reviewer').value.trim()));
      $('download').addEventListener('click', download);
      const saved = JSON.parse(localStorage.getItem(storeKey()) || '{"journal": []}');
      journal = saved.journal || [];
      decisions = replay(journal);
    }
    fillFilters();
    summary();
    applyFilters();
    $('item').focus();
    document.body.dataset.ready = '1';
  }

  start().catch(err => banner(`The review queue could not be loaded: ${err.message}`));
})();
