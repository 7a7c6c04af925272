"""``omni view`` on hostile shards in real headless Chromium: no sample string runs as script, no
segment URI is fetched, foreign Host headers are refused, every response carries the CSP, and bad
members or damaged shards are counted and listed instead of crashing the index."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.executor import run_recipe
from pipelines.operator import Operator, register
from pipelines.recipe import recipe_from_dict
from pipelines.viewer import CSP, serve
from tests.hostile import tar_with
from tests.test_viewer import CHROMIUM, CHROMIUM_ARGS

SCRIPT = "<script>window.__pwned=1;document.title='pwned'</script>"
IMG = "<img src=x onerror=\"window.__pwned=2;document.title='pwned'\">"
SVG = '"><svg onload="window.__pwned=3">'
PAYLOAD = f"{SCRIPT} {IMG} {SVG}"
URI = 'http://evil.example/a"><img src=x onerror=window.__pwned=4>.jpg'
SCORE_KEY = 'q"><img src=x onerror=window.__pwned=5>'


@register
class HostileScores(Operator):
    """Adds score columns whose name and value are markup, as a careless user operator could."""

    name = "test_hostile_scores"

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        batch = batch.append_column(SCORE_KEY, pa.array([0.5] * n))
        return batch.append_column("verdict", pa.array([PAYLOAD] * n))


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile_view")
    lines = [
        {
            "segments": [{"modality": "text", "text": f"caption {PAYLOAD}"}, {"modality": "image", "uri": URI}],
            "lang": SVG,
            "title": PAYLOAD,
        },
        {"text": f"plain {SCRIPT}", "note": IMG},
    ]
    (root / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recipe = {
        "name": "hostile",
        "output": str(root / "run"),
        "sources": [{"name": "docs", "type": "jsonl", "path": str(root / "docs.jsonl")}],
        "imports": ["tests.test_viewer_security"],
        "pipeline": [{"op": "test_hostile_scores"}],
        "storage": {"allow_uris": ["http://evil.example/"]},
        "executor": {"type": "local"},
    }
    run_recipe(recipe_from_dict(recipe), progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def hostile_shards(hostile_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard folder with a hand-made tar (markup in id/kind/source, bad members), a truncated copy of
    a good shard and a manifest entry that points outside the folder."""
    d = tmp_path_factory.mktemp("hostile_shards")
    doc = {
        "format": "omnicorpus/1",
        "id": f"id{SVG}",
        "kind": f"kind{IMG}",
        "source": f"src{SCRIPT}",
        "meta": {"lang": PAYLOAD},
        "columns": {SCORE_KEY: 1.0, "nan": float("nan")},  # Python writes NaN, which JSON.parse refuses
        "segments": [{"modality": "image", "member": "000.html"}, {"modality": "text", "text": PAYLOAD}],
    }
    page = b"<html><script>window.__pwned=6</script></html>"
    members = [
        ("hostile1.json", json.dumps(doc).encode()),
        ("hostile1.000.html", page),
        ("badjson.json", b"{not json"),
        ("list.json", b"[1, 2]"),
        ("nofields.json", json.dumps({"format": "omnicorpus/1", "id": "x"}).encode()),
        ("segsnotlist.json", json.dumps({**doc, "id": "y", "segments": "nope"}).encode()),
    ]
    (d / "h.tar").write_bytes(tar_with(members))
    good = next((hostile_run / "shards").glob("*.tar"))
    data = good.read_bytes()
    (d / "cut.tar").write_bytes(data[: len(data) // 2])
    hostile = (d / "h.tar").read_bytes()
    entries = [
        {"path": "h.tar", "bytes": len(hostile), "sha256": hashlib.sha256(hostile).hexdigest()},
        {"path": "cut.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        {"path": "../outside.tar", "bytes": 10, "sha256": ""},
    ]
    (d / "manifest.json").write_text(json.dumps({"kind": "omnicorpus.shardset", "totals": {}, "shards": entries}))
    return d


def _server(target: Path) -> Iterator[str]:
    srv = serve(str(target), port=0, block=False)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def run_server(hostile_run: Path) -> Iterator[str]:
    yield from _server(hostile_run)


@pytest.fixture(scope="module")
def shards_server(hostile_shards: Path) -> Iterator[str]:
    yield from _server(hostile_shards)


def _get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_foreign_host_is_refused_and_every_response_carries_the_policy(run_server: str, shards_server: str) -> None:
    port = run_server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "localhost"):
        status, headers, body = _get(f"{run_server}/api/samples", host)
        assert status == 403 and b"samples" not in body, host
        assert headers["Content-Security-Policy"] == CSP
    for host in (f"localhost:{port}", f"[::1]:{port}", None):
        assert _get(f"{run_server}/api/facets", host)[0] == 200
    for path in ("/", "/viewer.js", "/viewer.css", "/api/samples", "/api/facets", "/nope", "/media/zz/0"):
        status, headers, _ = _get(run_server + path)
        assert status == (404 if path in ("/nope", "/media/zz/0") else 200), path
        assert headers["Content-Security-Policy"] == CSP, path
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    _, _, page = _get(run_server + "/")
    assert b"<script>" not in page and b"<style>" not in page and b" on" not in page.lower(), "no inline code"
    status, headers, body = _get(f"{shards_server}/media/hostile1/0")
    assert status == 200 and body.startswith(b"<html>")
    assert headers["Content-Type"] == "application/octet-stream", "a member named .html is never served as a page"


def test_bad_members_are_counted_and_damaged_shards_listed(shards_server: str) -> None:
    status, _, body = _get(f"{shards_server}/api/damage")
    damage = json.loads(body)
    assert status == 200
    assert damage["skipped"] == {"bad json member": 1, "json member is not an object": 1, "sample json lacks fields": 2}
    reasons = {Path(d["shard"]).name: d["reason"] for d in damage["damaged"]}
    assert reasons["cut.tar"].startswith("size ") and "manifest says" in reasons["cut.tar"]
    assert reasons["outside.tar"] == "path leaves the shard folder"
    facets = json.loads(_get(f"{shards_server}/api/facets")[2])
    assert facets["damaged"] == damage["damaged"] and facets["kinds"] == [f"kind{IMG}"]
    samples = json.loads(_get(f"{shards_server}/api/samples")[2])
    assert samples["total"] == 1 and samples["samples"][0]["id"] == f"id{SVG}"


def _browse(server: str) -> dict:
    """Open the page, wait for the first load; what ran, what was requested, what the page shows."""
    from playwright.sync_api import sync_playwright

    init = (
        "window.__pwned = 0; window.__csp = [];"
        "document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective));"
    )
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.add_init_script(init)
        page.goto(server)
        page.wait_for_selector("body[data-loaded='1']")
        page.wait_for_load_state("networkidle")
        out = page.evaluate(
            """() => ({
              pwned: window.__pwned, title: document.title, csp: window.__csp,
              text: document.body.innerText,
              svgs: document.querySelectorAll('svg').length,
              scripts: [...document.scripts].map(s => s.getAttribute('src')),
              imgs: [...document.querySelectorAll('img')].map(i => i.getAttribute('src')),
              handlers: [...document.querySelectorAll('*')].flatMap(e => e.getAttributeNames())
                  .filter(n => n.startsWith('on')),
              options: [...document.querySelectorAll('option')].map(o => o.textContent),
              cards: [...document.querySelectorAll('.card')].map(c => c.dataset.id),
            })"""
        )
        browser.close()
    out["requests"] = requests
    return out


def _assert_inert(seen: dict, server: str) -> None:
    assert seen["pwned"] == 0 and seen["title"] == "omni view", "no sample string ran as script"
    assert seen["csp"] == [], f"the page itself needs no exception to the policy: {seen['csp']}"
    assert seen["svgs"] == 0 and seen["handlers"] == [], "no element was made from sample markup"
    assert seen["scripts"] == ["/viewer.js"]
    assert all(src.startswith("/media/") for src in seen["imgs"]), seen["imgs"]
    assert all(u.startswith(server + "/") for u in seen["requests"]), "only this server is ever asked"


def test_payloads_in_a_real_run_show_as_text_and_never_run(run_server: str) -> None:
    seen = _browse(run_server)
    _assert_inert(seen, run_server)
    assert len(seen["cards"]) == 2
    text = seen["text"]
    for shown in (f"caption {PAYLOAD}", f"plain {SCRIPT}", f"uri (not loaded): {URI}", f"verdict={PAYLOAD}"):
        assert shown in text, shown
    assert f"{SCORE_KEY}=0.5" in text and SVG in seen["options"] and SCORE_KEY in seen["options"]
    assert not any("evil.example" in u for u in seen["requests"]), "a segment uri is shown, never fetched"


def test_markup_in_id_kind_and_source_stays_text(shards_server: str) -> None:
    seen = _browse(shards_server)
    _assert_inert(seen, shards_server)
    assert seen["cards"] == [f"id{SVG}"]
    for shown in (f"id{SVG}", f"kind{IMG}", f"src{SCRIPT}", PAYLOAD, "2 damaged shard(s)", "cut.tar", "outside.tar"):
        assert shown in seen["text"], shown
    assert "4 member(s) skipped" in seen["text"]


def test_a_damaged_run_still_opens(hostile_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(hostile_run, run)
    shard = next((run / "shards").glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-700])
    gen = _server(run)
    server = next(gen)
    try:
        status, _, body = _get(f"{server}/api/damage")
        assert status == 200 and json.loads(body)["damaged"][0]["shard"].endswith(shard.name)
        assert json.loads(_get(f"{server}/api/samples")[2])["total"] == 0
    finally:
        next(gen, None)
    (run / "shards" / "manifest.json").write_text('{"shards": [1, 2')
    gen = _server(run)
    server = next(gen)
    try:
        damaged = json.loads(_get(f"{server}/api/damage")[2])["damaged"]
        assert [d["reason"].split(":")[0] for d in damaged] == ["unreadable manifest"]
        assert json.loads(_get(f"{server}/api/samples")[2])["total"] >= 1, "the tars are still shown, unchecked"
    finally:
        next(gen, None)
