"""``omni view`` in a real headless Chromium: media elements, filters, jump to id, a screenshot."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.viewer import serve
from shards.reader import iter_samples
from tests.conftest import demo_recipe_dict

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, installed by `make`
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def demo_run(demo_sources, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("view") / "run"
    run_recipe(recipe_from_dict(demo_recipe_dict(demo_sources, run)), progress=False)
    return run


@pytest.fixture(scope="module")
def server(demo_run: Path) -> Iterator[str]:
    srv = serve(str(demo_run), port=0, block=False)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_media_are_served_from_the_shards_by_range(server: str, demo_run: Path) -> None:
    samples = [s for tar in sorted((demo_run / "shards").glob("*.tar")) for s in iter_samples(str(tar))]
    video = next(s for s in samples if s["kind"] == "video_caption")
    req = urllib.request.Request(f"{server}/media/{video['id']}/0", headers={"Range": "bytes=0-99"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.headers["Content-Type"] == "video/mp4"
        assert r.read() == video["segments"][0]["bytes"][:100]
    with urllib.request.urlopen(f"{server}/api/samples?kind=asr") as r:
        body = json.loads(r.read())
    assert body["total"] == sum(1 for s in samples if s["kind"] == "asr")


def test_browser_shows_media_filters_and_jumps(server: str, demo_run: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    samples = [s for tar in sorted((demo_run / "shards").glob("*.tar")) for s in iter_samples(str(tar))]
    by_kind = {s["kind"]: s for s in samples}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server)
        page.wait_for_selector("body[data-loaded='1']")
        assert page.locator(".card").count() == len(samples)
        for kind, selector in (("image_caption", "img"), ("asr", "audio"), ("video_caption", "video")):
            card = page.locator(f"#s-{by_kind[kind]['id']}")
            assert card.locator(selector).count() == 1, f"{kind} card shows its {selector}"
            assert card.locator(selector).get_attribute("src") == f"/media/{by_kind[kind]['id']}/0"
        assert page.evaluate("() => document.querySelector('img').naturalWidth") > 0, "the image decodes"
        page.select_option("#kind", "asr")
        page.wait_for_selector("body[data-loaded='2']")
        kinds = page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.kind)")
        assert kinds and set(kinds) == {"asr"} and len(kinds) == sum(s["kind"] == "asr" for s in samples)
        assert page.locator(".card audio").count() == len(kinds) and page.locator(".card img").count() == 0
        page.select_option("#kind", "")
        page.wait_for_selector("body[data-loaded='3']")
        target = by_kind["interleaved_image_text"]["id"]
        page.fill("#jump", target)
        page.press("#jump", "Enter")
        page.wait_for_selector("body[data-loaded='4']")
        assert page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.id)") == [target]
        segs = page.locator(".card .seg .tag").all_inner_texts()
        assert segs == ["text", "image", "text", "image", "text"], "interleaved segments keep their order"
        shot = tmp_path / "view.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000


def test_run_report(demo_run: Path, tmp_path: Path) -> None:
    from pipelines.report import write_report

    page = Path(write_report(str(demo_run), str(tmp_path / "report")))
    html = page.read_text()
    assert "Rejects by stage and reason" in html and "unsafe tar member: parent path" in html
    assert "Throughput per stage" in html and "00-validate" in html
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert "samples_by_kind.png" in pngs and len(pngs) >= 4
    for name in pngs:
        assert f'src="{name}"' in html
