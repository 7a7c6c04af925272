// omni view: every string from a shard goes into the page as text (textContent, dataset, title, new
// Option), never as HTML; only /media/ URLs made by the server are loaded. The CSP header backs this up.
'use strict';
const $ = (id) => document.getElementById(id);
const MEDIA_URL = /^\/media\/[0-9A-Za-z_-]{1,128}\/\d{1,6}$/;
const LANG_TAG = /^[a-z]{2,3}$/;  // a language code the browser may pick glyph variants by (zh vs ja)
const FILTERS = ['kind', 'lang', 'score', 'min', 'q', 'jump'];
const state = {offset: 0, limit: 200, randoms: 0};
const seed = new URLSearchParams(location.search).get('seed');  // repeatable random picks (tests)

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function tag(text, cls) { return el('span', 'tag' + (cls ? ' ' + cls : ''), text); }

// Scores to three significant digits (the full value in the tooltip); integers and strings as they are.
function fmt(v) {
  if (typeof v !== 'number' || !Number.isFinite(v) || Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(3)));
}

function tokens(n) { return n === null || n === undefined ? null : tag(n + ' tok', 'tokens'); }

function segment(s, lang) {
  const div = el('div', 'seg ' + (s.modality === 'text' ? 'text' : 'media'));
  div.append(tag(s.modality));
  const t = tokens(s.tokens);
  if (t) div.append(t);
  if (s.modality === 'text') {
    if (LANG_TAG.test(lang)) div.lang = lang;
    div.append(document.createTextNode(s.text || ''));
    return div;
  }
  const player = {image: 'img', audio: 'audio', video: 'video'}[s.modality];
  if (player && typeof s.media === 'string' && MEDIA_URL.test(s.media)) {
    const m = document.createElement(player);
    if (player !== 'img') { m.controls = true; m.preload = 'none'; }
    m.src = s.media;
    div.append(m);
  } else if (s.uri) {
    div.append(el('span', 'uri', 'uri (not loaded): ' + s.uri));  // fetching it would be an SSRF from the browser
  } else {
    div.append(el('span', 'uri', 'no media'));
  }
  return div;
}

function card(x) {
  const c = el('div', 'card');
  c.dataset.id = x.id;
  c.dataset.kind = x.kind;
  c.id = 's-' + x.id;
  c.append(el('h3', null, x.id), tag(x.kind), tag(x.lang), tag(x.source));
  const t = tokens(x.tokens);
  if (t) c.append(t);
  for (const [k, v] of Object.entries(x.scores || {})) {
    const s = tag(k + '=' + fmt(v), 'score');
    s.title = k + '=' + String(v);
    c.append(s);
  }
  for (const s of x.segments || []) c.append(segment(s, x.lang));
  c.append(el('div', 'meta', JSON.stringify(x.meta)));
  return c;
}

function problems(f) {
  const box = $('problems');
  box.replaceChildren();
  if (f.damaged && f.damaged.length) {
    box.append(el('b', null, f.damaged.length + ' damaged shard(s), not shown:'));
    const ul = el('ul');
    for (const d of f.damaged) ul.append(el('li', 'damaged', d.shard + ' \u2014 ' + d.reason));
    box.append(ul);
  }
  const skipped = Object.entries(f.skipped || {});
  if (skipped.length) {
    const n = skipped.reduce((a, [, v]) => a + v, 0);
    const why = skipped.map(([k, v]) => k + ' \u00d7' + v).join(', ');
    box.append(el('div', 'skipped', n + ' member(s) skipped: ' + why));
  }
}

function filters() {
  return {kind: $('kind').value, lang: $('lang').value, score: $('score').value, min: $('min').value,
    q: $('q').value.trim()};
}

function show(r, what) {
  $('samples').replaceChildren(...r.samples.map(card));
  $('count').textContent = what;
  $('prev').disabled = r.random || r.offset <= 0;
  $('next').disabled = r.random || r.offset + r.samples.length >= r.total;
  document.body.dataset.loaded = (Number(document.body.dataset.loaded || 0) + 1).toString();
}

async function load() {
  const id = $('jump').value.trim();
  const q = new URLSearchParams({...filters(), id, offset: state.offset, limit: state.limit});
  const r = await (await fetch('/api/samples?' + q)).json();
  state.offset = r.offset;
  const first = r.total ? r.offset + 1 : 0;
  const last = r.offset + r.samples.length;
  const what = r.total > r.samples.length ? first + '\u2013' + last + ' of ' + r.total + ' samples'
    : r.total + ' samples';
  const notes = {none: 'no sample id starts with ' + id, ambiguous: r.total + ' sample ids start with ' + id};
  $('note').textContent = notes[r.id_match] || '';
  show(r, what);
}

async function pick() {
  const q = new URLSearchParams(filters());
  if (seed !== null) q.set('seed', seed + ':' + state.randoms);
  state.randoms += 1;
  const r = await (await fetch('/api/random?' + q)).json();
  $('note').textContent = '';
  show(r, r.total ? 'a random one of ' + r.total + ' samples' : '0 samples');
}

function refilter() { state.offset = 0; load(); }

async function init() {
  const f = await (await fetch('/api/facets')).json();
  for (const [id, vals] of [['kind', f.kinds], ['lang', f.langs], ['score', f.scores]])
    for (const v of vals) $(id).append(new Option(v, v));
  state.limit = f.page_size || state.limit;
  problems(f);
  for (const id of FILTERS) $(id).addEventListener('change', refilter);
  $('prev').addEventListener('click', () => { state.offset = Math.max(0, state.offset - state.limit); load(); });
  $('next').addEventListener('click', () => { state.offset += state.limit; load(); });
  $('random').addEventListener('click', pick);
  load();
}

init();
