// omni view: every string from a shard goes into the page as text (textContent, dataset, new Option),
// never as HTML; only /media/ URLs made by the server are loaded. The CSP header backs this up.
'use strict';
const $ = (id) => document.getElementById(id);
const MEDIA_URL = /^\/media\/[0-9A-Za-z_-]{1,128}\/\d{1,6}$/;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function tag(text) { return el('span', 'tag', text); }

function segment(s) {
  const div = el('div', 'seg ' + (s.modality === 'text' ? 'text' : 'media'));
  div.append(tag(s.modality));
  if (s.modality === 'text') {
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
  for (const [k, v] of Object.entries(x.scores || {})) c.append(tag(k + '=' + v));
  for (const s of x.segments || []) c.append(segment(s));
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

async function load() {
  const q = new URLSearchParams({kind: $('kind').value, lang: $('lang').value, score: $('score').value,
    min: $('min').value, id: $('jump').value.trim()});
  const r = await (await fetch('/api/samples?' + q)).json();
  $('count').textContent = r.total + ' samples';
  $('samples').replaceChildren(...r.samples.map(card));
  document.body.dataset.loaded = (Number(document.body.dataset.loaded || 0) + 1).toString();
}

async function init() {
  const f = await (await fetch('/api/facets')).json();
  for (const [id, vals] of [['kind', f.kinds], ['lang', f.langs], ['score', f.scores]])
    for (const v of vals) $(id).append(new Option(v, v));
  problems(f);
  for (const id of ['kind', 'lang', 'score', 'min', 'jump']) $(id).onchange = load;
  load();
}

init();
