"""The ``download`` operator against a real HTTP server on 127.0.0.1 serving real photographs.

Routes cover what URL lists meet in the wild: 404, a 500 that recovers, a 500 that does not, a
server slower than the timeout, redirect chains and loops, bodies over the size cap (with and
without Content-Length), ``X-Robots-Tag`` opt-outs and redirects that leave the allowed prefix.
Timeouts and backoff are tiny so the whole file runs in a few seconds.
"""

from __future__ import annotations

import io
import json
import pickle
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image

from pipelines.audit import audit
from pipelines.demo_data import photo_bytes
from pipelines.executor import run_recipe
from pipelines.operator import get_operator, param_problem, split_rejected
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from shards.reader import iter_samples
from shards.schema import DETAIL_COLUMN, REASON_COLUMN, Segment, loads_meta, make_sample, samples_table
from synth.download import Download, opted_out

PHOTOS = {name: photo_bytes(name) for name in ("astronaut", "coffee", "chelsea")}
BIG = 300_000  # bytes of the oversized routes; tests cap at 100 kB
SLOW_S = 3.0  # how long /slow stalls; the tests time out after 0.3 s


class Handler(BaseHTTPRequestHandler):
    """Routes by path; state (hit counts) lives on the server so each test gets a fresh one."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, *args: Any) -> None:
        """Quiet: pytest output is for failures."""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Type": "image/jpeg", "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self._send(status, b"", {"Location": location, "Content-Type": "text/plain"})

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        server: Server = self.server  # type: ignore[assignment]
        path = self.path
        with server.lock:
            server.hits[path] += 1
            hits = server.hits[path]
        photo = PHOTOS["astronaut"]
        if path.startswith("/img/"):
            name = path.removeprefix("/img/").removesuffix(".jpg")
            self._send(200, PHOTOS[name]) if name in PHOTOS else self._send(404)
        elif path.startswith("/flaky/"):
            self._send(500, b"oops", {"Content-Type": "text/plain"}) if hits == 1 else self._send(200, photo)
        elif path == "/always500":
            self._send(500, b"oops", {"Content-Type": "text/plain"})
        elif path == "/busy":
            self._send(429, b"", {"Retry-After": "0"}) if hits == 1 else self._send(200, photo)
        elif path == "/slow":
            server.release.wait(SLOW_S)
            self._send(200, photo)
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect(f"/chain/{n - 1}" if n > 0 else "/img/coffee.jpg", 301 if n % 2 else 307)
        elif path == "/loop/a":
            self._redirect("/loop/b")
        elif path == "/loop/b":
            self._redirect(f"http://127.0.0.1:{server.server_port}/loop/a")
        elif path == "/big":
            self._send(200, b"\xff" * BIG)
        elif path == "/bigstream":  # no Content-Length: the size cap must stop the stream itself
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(BIG // 10_000):
                self.wfile.write(b"\xff" * 10_000)
            self.close_connection = True
        elif path == "/noai":
            self._send(200, photo, {"X-Robots-Tag": "noai"})
        elif path == "/otherbot":
            self._send(200, photo, {"X-Robots-Tag": "otherbot: noindex, NoImageAI"})
        elif path == "/robots-fine":
            self._send(200, photo, {"X-Robots-Tag": "noindex, nofollow"})
        elif path == "/away":  # to a host the recipe does not allow (loopback by name: never fetched anyway)
            self._redirect(f"http://localhost:{server.server_port}/img/coffee.jpg")
        elif path == "/tofile":
            self._redirect("file:///etc/passwd")
        elif path == "/caf%C3%A9%20au%20lait.jpg":
            self._send(200, photo)
        elif path == "/empty":
            self._send(200, b"")
        else:
            self._send(404, b"not here", {"Content-Type": "text/plain"})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


def base(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.server_port}/"


def op(srv: Server, **params: Any) -> Download:
    defaults: dict[str, Any] = {"timeout_s": 0.3, "retries": 2, "backoff_s": 0.01, "max_bytes": 100_000}
    return Download(allow_uris=[base(srv)], **{**defaults, **params})


def url_table(urls: list[str]) -> pa.Table:
    return samples_table(
        make_sample("web", "image_caption", [Segment("image", uri=u), Segment("text", text=f"caption {i}")], u)
        for i, u in enumerate(urls)
    )


def outcomes(result: pa.Table) -> list[tuple[str | None, str | None]]:
    return list(zip(result[REASON_COLUMN].to_pylist(), result[DETAIL_COLUMN].to_pylist(), strict=True))


def test_success_moves_the_url_into_meta_and_the_bytes_into_the_segment(server: Server) -> None:
    urls = [f"{base(server)}img/{name}.jpg" for name in PHOTOS]
    result = op(server)(url_table(urls))
    assert outcomes(result) == [(None, None)] * 3
    for name, url, segs in zip(PHOTOS, urls, result["segments"].to_pylist(), strict=True):
        image, text = segs
        assert image["bytes"] == PHOTOS[name] and image["uri"] is None
        meta = loads_meta(image["meta"])
        assert meta == {
            "url": url,
            "status": 200,
            "content_type": "image/jpeg",
            "bytes": len(PHOTOS[name]),
            "ext": "jpg",
        }
        assert text["text"].startswith("caption")


def test_failures_are_rejects_with_the_status_or_error(server: Server) -> None:
    b = base(server)
    cases = {
        "img/nope.jpg": ("download failed", "HTTP 404"),
        "always500": ("download failed", "HTTP 500 after 3 attempts"),
        "slow": ("download failed", "timeout after 3 attempts"),
        "loop/a": ("download failed", "redirect loop"),
        "chain/9": ("download failed", "too many redirects (> 5)"),
        "big": ("download too large", "300000 bytes > 100000"),
        "bigstream": ("download too large", "over 100000 bytes"),
        "noai": ("opted out (X-Robots-Tag)", "noai"),
        "otherbot": ("opted out (X-Robots-Tag)", "otherbot: noindex, NoImageAI"),
        "away": ("redirect not allowed", f"http://localhost:{server.server_port}/img/coffee.jpg"),
        "tofile": ("redirect not allowed", "file:///etc/passwd"),
        "empty": ("download failed", "empty body"),
    }
    urls = [b + path for path in cases]
    outside = f"http://localhost:{server.server_port}/img/coffee.jpg"
    result = op(server)(url_table([*urls, outside]))
    got = outcomes(result)
    for (path, (reason, detail)), url, (r, d) in zip(cases.items(), urls, got, strict=False):
        assert (r, d) == (reason, f"{detail} ({url})"), path
    assert got[-1] == ("uri not allowed", f"{outside} ({outside})")
    assert server.hits["/img/coffee.jpg"] == 0, "a URL outside allow_uris was fetched"
    assert server.hits["/always500"] == 3 and server.hits["/img/nope.jpg"] == 1, "only 5xx and timeouts are retried"
    statuses = [loads_meta(segs[0]["meta"]).get("status") for segs in result["segments"].to_pylist()]
    assert statuses[:2] == [404, 500], "the per-URL status stays in the segment meta"
    kept, rejected = split_rejected(result)
    assert len(kept) == 0 and rejected is not None and len(rejected) == len(urls) + 1


def test_retries_redirects_and_harmless_robots_tags_succeed(server: Server) -> None:
    b = base(server)
    paths = ["flaky/1", "busy", "chain/4", "robots-fine", "café au lait.jpg"]
    result = op(server)(url_table([b + p for p in paths]))
    assert outcomes(result) == [(None, None)] * 5
    metas = [loads_meta(segs[0]["meta"]) for segs in result["segments"].to_pylist()]
    assert metas[0]["attempts"] == 2 and metas[1]["attempts"] == 2
    assert metas[2]["final_url"] == b + "img/coffee.jpg" and metas[2]["bytes"] == len(PHOTOS["coffee"])
    assert server.hits["/flaky/1"] == 2


def test_resize_at_download_caps_pixels_and_keeps_small_images(server: Server) -> None:
    big_name, small_name, cap = "astronaut", "chelsea", 40_000
    result = op(server, resize={"max_pixels": cap, "quality": 80})(url_table([f"{base(server)}img/{big_name}.jpg"]))
    image = result["segments"].to_pylist()[0][0]
    meta = loads_meta(image["meta"])
    with Image.open(io.BytesIO(image["bytes"])) as im:
        assert im.format == "JPEG" and im.width * im.height <= cap
        assert [im.width, im.height] == [meta["width"], meta["height"]]
    assert meta["resized_from"] == list(Image.open(io.BytesIO(PHOTOS[big_name])).size)
    untouched = op(server, resize={"max_pixels": 10**8})(url_table([f"{base(server)}img/{small_name}.jpg"]))
    assert untouched["segments"].to_pylist()[0][0]["bytes"] == PHOTOS[small_name]


def test_robots_tag_forms() -> None:
    assert opted_out(["noai"]) == "noai"
    assert opted_out(["noindex", "googlebot: noimageai"]) == "googlebot: noimageai"
    assert opted_out(["NOAI, noindex"]) == "NOAI, noindex"
    assert opted_out(["noindex, nofollow", "unavailable_after: 25 Jun 2010"]) is None
    assert opted_out(["noairplane"]) is None


def test_parameters_are_checked_before_a_run() -> None:
    cls = get_operator("download")
    assert param_problem(cls, {}) == "missing required parameter 'allow_uris'"
    assert "must be in" in (param_problem(cls, {"allow_uris": [], "retries": 99}) or "")
    with pytest.raises(ValueError, match="http"):
        Download(allow_uris=["/etc"])
    with pytest.raises(ValueError, match="max_pixels"):
        Download(allow_uris=[], resize={"pixels": 5})


def test_omni_run_downloads_url_rows_and_balances(server: Server, tmp_path: Path) -> None:
    """A JSONL URL list through ``download`` then ``validate``: good rows in shards, the rest ledgered."""
    b = base(server)
    rows = [  # the shorthand (``image`` + ``text``) for the good rows, explicit segments for the rest
        *({"image": f"{b}img/{name}.jpg", "text": name} for name in PHOTOS),
        {"segments": [{"modality": "image", "uri": f"{b}missing.jpg"}, {"modality": "text", "text": "gone"}]},
        {"segments": [{"modality": "image", "uri": f"{b}noai"}, {"modality": "text", "text": "opted out"}]},
        {"segments": [{"modality": "image", "uri": f"{b}bigstream"}, {"modality": "text", "text": "huge"}]},
    ]
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "name": "urls",
            "output": str(out),
            "sources": [{"name": "web", "type": "jsonl", "path": str(manifest)}],
            "storage": {"allow_uris": [b]},
            "pipeline": [
                {"op": "download", "params": {"allow_uris": [b], "timeout_s": 2.0, "max_bytes": 100_000}},
                {"op": "validate"},
            ],
            "shards": {"max_samples": 10, "max_bytes": "8MB"},
        }
    )
    m = run_recipe(recipe, executor="local", progress=False)
    report = audit(str(out))
    assert report.balanced, report.summary()
    assert (m["ingested"], m["written"], m["rejected"]) == (6, 3, 3)
    ledger = sorted((r["reason"], r["detail"]) for r in RunDir(str(out)).read_ledger().to_pylist())
    assert ledger == [
        ("download failed", f"HTTP 404 ({b}missing.jpg)"),
        ("download too large", f"over 100000 bytes ({b}bigstream)"),
        ("opted out (X-Robots-Tag)", f"noai ({b}noai)"),
    ]
    samples = [s for t in sorted((out / "shards").glob("*.tar")) for s in iter_samples(str(t))]
    got = {s["segments"][1]["text"]: s["segments"][0] for s in samples}
    assert {name: seg["bytes"] for name, seg in got.items()} == PHOTOS
    assert all(seg["uri"] is None and loads_meta(seg["meta"])["url"].startswith(b) for seg in got.values())


def test_a_refused_connection_is_retried_then_ledgered() -> None:
    with socket.socket() as s:  # a loopback port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.jpg"
    step = Download(allow_uris=[f"http://127.0.0.1:{port}/"], timeout_s=0.3, retries=1, backoff_s=0.01)
    step = pickle.loads(pickle.dumps(step))  # Ray ships operators to workers pickled
    ((reason, detail),) = outcomes(step(url_table([url])))
    assert (reason, detail) == (
        "download failed",
        f"ConnectionRefusedError: [Errno 111] Connection refused after 2 attempts ({url})",
    )


def test_on_failure_drop_keeps_a_document_without_its_dead_images(server: Server) -> None:
    b = base(server)
    coffee, dead = f"{b}img/coffee.jpg", f"{b}img/nope.jpg"
    docs = [
        [Segment("text", text="早上好。"), Segment("image", uri=dead), Segment("image", uri=coffee)],
        [Segment("text", text="Only a dead image here."), Segment("image", uri=dead)],
    ]
    table = samples_table(make_sample("web", "interleaved_image_text", d, f"doc{k}") for k, d in enumerate(docs))
    assert [r for r, _ in outcomes(op(server)(table))] == ["download failed"] * 2  # reject: the default
    result = op(server, on_failure="drop")(table)
    assert outcomes(result) == [(None, None), ("download failed", f"HTTP 404 ({dead})")]
    kept = result["segments"][0].as_py()
    assert [s["modality"] for s in kept] == ["text", "image"] and kept[1]["bytes"] == PHOTOS["coffee"]
    assert loads_meta(result["meta"][0].as_py())["download_failed"] == [
        {"segment": 1, "url": dead, "reason": "download failed", "status": 404}
    ]
    with pytest.raises(ValueError, match="on_failure"):
        op(server, on_failure="skip")
