"""``omni view`` for a user: Chinese and Hindi text render as glyphs (not tofu boxes) in headless
Chromium, text search in any script, paging past the first page, lookup by id prefix, a random
sample, rounded scores and token counts. One shard set of 234 samples, written directly."""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import MULTILINGUAL
from pipelines.viewer import MAX_QUERY, serve
from shards.manifest import write_shardset_manifest
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter
from tests.test_viewer import CHROMIUM, CHROMIUM_ARGS

FILLERS = 230
TEXTS = dict(MULTILINGUAL)
EXTRA = {"en-caps": "The QUICK Brown Fox reads the Straße sign.", **{k: TEXTS[k] for k in ("zh", "ja", "hi")}}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """230 English fillers (a score with long decimals, token counts), then Chinese, Japanese, Hindi
    and a mixed-case English sample, in five shards."""
    d = tmp_path_factory.mktemp("view_ui") / "shards"
    order, by_name = [], {}
    with ShardWriter(str(d), "ui", max_samples=50) as w:
        for i in range(FILLERS):
            seg = Segment("text", text=f"Filler sample number {i} about rivers.", meta={"tokens": i + 1})
            row = make_sample("docs", "text", [seg], f"filler/{i}", {"lang": "en"})
            row["q_score"] = i / 7
            w.write(row)
            order.append(row["id"])
        for name, text in EXTRA.items():
            lang = name.split("-")[0]
            row = make_sample("docs", "text", [Segment("text", text=text, meta={"tokens": 7})], name, {"lang": lang})
            w.write(row)
            order.append(row["id"])
            by_name[name] = row["id"]
    write_shardset_manifest(str(d), w.written, {})
    return {"dir": d, "order": order, "ids": by_name}


@pytest.fixture(scope="module")
def server(shard_set: dict[str, Any]) -> Iterator[str]:
    srv = serve(str(shard_set["dir"]), port=0, block=False)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def api(server: str, path: str, **params: Any) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server}{path}?{urllib.parse.urlencode(params)}") as r:
        return json.loads(r.read())


def _ids(body: dict[str, Any]) -> list[str]:
    return [s["id"] for s in body["samples"]]


def shortest_unique_prefix(ident: str, others: list[str]) -> str:
    for n in range(1, len(ident) + 1):
        if sum(o.startswith(ident[:n]) for o in others) == 1:
            return ident[:n]
    raise AssertionError("ids are unique")


def test_search_paging_prefix_and_random_over_http(server: str, shard_set: dict[str, Any]) -> None:
    order, ids = shard_set["order"], shard_set["ids"]
    assert _ids(api(server, "/api/samples", q="狐狸")) == [ids["zh"]], "a Chinese word finds the Chinese sample"
    assert set(_ids(api(server, "/api/samples", q="狐"))) == {ids["zh"], ids["ja"]}, "Han in Chinese and Japanese"
    assert _ids(api(server, "/api/samples", q="लोमड़ी")) == [ids["hi"]]
    assert _ids(api(server, "/api/samples", q="quick brown")) == [ids["en-caps"]], "case-insensitive"
    assert _ids(api(server, "/api/samples", q="STRASSE")) == [ids["en-caps"]], "case-folded: ß is ss"
    assert api(server, "/api/samples", q="x" * 10 * MAX_QUERY)["total"] == 0, "a huge query is cut, not an error"
    assert api(server, "/api/samples", q="rivers", lang="en")["total"] == FILLERS, "search and filters combine"

    first = api(server, "/api/samples")
    assert first["total"] == len(order) and first["limit"] == 200 and _ids(first) == order[:200]
    second = api(server, "/api/samples", offset=200)
    assert second["offset"] == 200 and _ids(second) == order[200:], "sample 201 and on are reachable"
    assert _ids(api(server, "/api/samples", offset=10, limit=5)) == order[10:15]
    assert api(server, "/api/samples", offset=10**9)["offset"] == len(order) - 1, "an offset past the end is clamped"
    assert len(api(server, "/api/samples", limit=10**9)["samples"]) == len(order), "limit capped, still all here"

    zh = ids["zh"]
    prefix = shortest_unique_prefix(zh, order)
    found = api(server, "/api/samples", id=prefix)
    assert found["id_match"] == "prefix" and _ids(found) == [zh]
    assert api(server, "/api/samples", id=prefix.upper())["id_match"] == "prefix", "ids are hex: any case"
    exact = api(server, "/api/samples", id=zh)
    assert exact["id_match"] == "exact" and _ids(exact) == [zh]
    ambiguous = api(server, "/api/samples", id=zh[0])
    assert ambiguous["id_match"] == "ambiguous" and ambiguous["total"] == sum(i.startswith(zh[0]) for i in order) > 1
    assert all(i.startswith(zh[0]) for i in _ids(ambiguous))
    assert api(server, "/api/samples", id="not-an-id")["id_match"] == "none"

    picks = [_ids(api(server, "/api/random", seed=f"s{n}")) for n in range(8)]
    assert all(len(p) == 1 for p in picks) and len({p[0] for p in picks}) > 1
    assert _ids(api(server, "/api/random", seed="s3")) == picks[3], "the same seed picks the same sample"
    assert {_ids(api(server, "/api/random", q="狐", seed=n))[0] for n in range(10)} <= {ids["zh"], ids["ja"]}
    assert api(server, "/api/random", q="nothing matches this")["samples"] == []

    s = api(server, "/api/samples", offset=3, limit=1)["samples"][0]
    assert s["tokens"] == 4 and s["segments"][0]["tokens"] == 4, "token counts from segment meta"


def _glyph_crops(page: Any, chars: list[str], inside: str) -> list[np.ndarray]:
    """Each character drawn 48 px big in its own box inside ``inside`` (so with the page's fonts and
    that element's language), at integer offsets from one origin; greyscale crops of each box."""
    page.evaluate(
        """([chars, inside]) => {
          const box = document.createElement('div');
          box.style.position = 'relative';
          box.style.height = '70px';
          chars.forEach((c, i) => {
            const s = document.createElement('span');
            s.className = 'glyph';
            s.textContent = c;
            Object.assign(s.style, {position: 'absolute', left: (i * 72) + 'px', top: '0px', width: '64px',
              height: '64px', fontSize: '48px', lineHeight: '64px', textAlign: 'center'});
            box.append(s);
          });
          document.querySelector(inside).append(box);
        }""",
        [chars, inside],
    )
    crops = page.locator(f"{inside} .glyph")
    return [np.asarray(Image.open(io.BytesIO(crops.nth(i).screenshot())).convert("L")) for i in range(len(chars))]


def _fonts_for(page: Any, selector: str) -> dict[str, int]:
    """The platform fonts Chromium drew an element's text with, and how many glyphs each drew."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cdp.detach()
    return {f["familyName"]: f["glyphCount"] for f in fonts}


def _search(page: Any, query: str) -> list[str]:
    before = int(page.evaluate("() => document.body.dataset.loaded"))
    page.fill("#q", query)
    page.press("#q", "Enter")
    page.wait_for_selector(f"body[data-loaded='{before + 1}']")
    return page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.id)")


def test_chinese_and_hindi_render_as_glyphs_not_tofu(server: str, shard_set: dict[str, Any], browser: Any) -> None:
    ids = shard_set["ids"]
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(server)
    page.wait_for_selector("body[data-loaded='1']")
    assert _search(page, "狐狸") == [ids["zh"]], "search in the page finds the Chinese sample"
    zh_text = f"#s-{ids['zh']} .seg.text"
    assert page.locator(zh_text).get_attribute("lang") == "zh"
    han = sum("\u4e00" <= c <= "\u9fff" for c in TEXTS["zh"])
    fonts = _fonts_for(page, zh_text)
    cjk = {name: n for name, n in fonts.items() if "CJK" in name}
    assert sum(cjk.values()) >= han, f"the Chinese text is drawn with a CJK font: {fonts}"

    # Tofu: a font's "no glyph" box, the same picture for every missing character. Two characters
    # nobody has a glyph for show what that looks like here; real glyphs differ from it and each other.
    chars = ["敏", "捷", "\U0010fffd", "\U0010fffc", "क", "ख"]
    zh1, zh2, tofu1, tofu2, hi1, hi2 = _glyph_crops(page, chars, zh_text)
    assert np.array_equal(tofu1, tofu2), "two missing glyphs render alike (the check can see tofu)"
    for name, a, b in (("Chinese", zh1, zh2), ("Devanagari", hi1, hi2)):
        for crop in (a, b):
            assert (crop < 128).sum() > 100, f"{name}: the glyph has ink"
            assert (crop != tofu1).sum() > 200, f"{name}: a glyph, not the missing-glyph box"
        assert (a != b).sum() > 200, f"{name}: two different characters look different"

    assert _search(page, "लोमड़ी") == [ids["hi"]]
    fonts = _fonts_for(page, f"#s-{ids['hi']} .seg.text")
    assert any("Devanagari" in name for name in fonts), f"Hindi is drawn with a Devanagari font: {fonts}"
    page.screenshot(path=str(Path(shard_set["dir"]).parent / "glyphs.png"))
    page.close()


def test_paging_id_prefix_random_and_rounded_scores_in_the_page(
    server: str, shard_set: dict[str, Any], browser: Any
) -> None:
    order, ids = shard_set["order"], shard_set["ids"]
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{server}/?seed=ui")
    page.wait_for_selector("body[data-loaded='1']")
    cards = "cards => cards.map(c => c.dataset.id)"
    assert page.locator(".card").evaluate_all(cards) == order[:200]
    assert page.inner_text("#count") == f"1\u2013200 of {len(order)} samples"
    assert page.is_disabled("#prev") and not page.is_disabled("#next")
    page.click("#next")
    page.wait_for_selector("body[data-loaded='2']")
    assert page.locator(".card").evaluate_all(cards) == order[200:], "sample 201 and on, on page two"
    assert page.inner_text("#count") == f"201\u2013{len(order)} of {len(order)} samples"
    assert page.is_disabled("#next")
    page.click("#prev")
    page.wait_for_selector("body[data-loaded='3']")
    assert page.locator(".card").evaluate_all(cards)[0] == order[0]

    # a filler: its score 5/7 in three digits (the full value in the tooltip), its token count
    filler = page.locator(f"#s-{order[5]}")
    assert filler.locator(".tag.score").inner_text() == "q_score=0.714"
    assert filler.locator(".tag.score").get_attribute("title") == f"q_score={5 / 7}"
    assert filler.locator("> .tag.tokens").inner_text() == "6 tok"

    prefix = shortest_unique_prefix(ids["hi"], order)
    page.fill("#jump", prefix)
    page.press("#jump", "Enter")
    page.wait_for_selector("body[data-loaded='4']")
    assert page.locator(".card").evaluate_all(cards) == [ids["hi"]], "a unique prefix opens its sample"
    first = order[0][0]
    page.fill("#jump", first)
    page.press("#jump", "Enter")
    page.wait_for_selector("body[data-loaded='5']")
    shown = page.locator(".card").evaluate_all(cards)
    assert len(shown) > 1 and all(i.startswith(first) for i in shown), "an ambiguous prefix lists its samples"
    assert page.inner_text("#note") == f"{len(shown)} sample ids start with {first}"
    page.fill("#jump", "")
    page.press("#jump", "Enter")
    page.wait_for_selector("body[data-loaded='6']")

    expected = [_ids(api(server, "/api/random", seed=f"ui:{n}")) for n in range(2)]
    for n in range(2):
        page.click("#random")
        page.wait_for_selector(f"body[data-loaded='{7 + n}']")
        assert page.locator(".card").evaluate_all(cards) == expected[n], "the page shows the server's pick"
        assert page.inner_text("#count") == f"a random one of {len(order)} samples"
    page.close()
