"""The ``download`` operator against img2dataset fetching the same URL list from the same local server.

A loopback HTTP server (its own process, so neither client shares its GIL) serves N real JPEGs
(scikit-image photographs); each contender fetches all N with the same thread count, in turns,
best of R, after one warm-up each. img2dataset (PyPI 1.47) runs from its own venv
(``/tmp/i2d-venv``, or ``I2D_PYTHON``): ``resize_mode=no``, ``disable_all_reencoding`` and no hash,
its leanest path, writing ``files``; its timing is taken inside its process around ``download()``, so
its import is not counted but its worker-pool start-up is (that is what a user waits for), and a
1-URL run estimates that fixed cost for the notes. Without the venv its side is skipped with a note.

Set-up for img2dataset's side: ``python3 -m venv /tmp/i2d-venv && /tmp/i2d-venv/bin/pip install img2dataset==1.47.0``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path

import pyarrow.compute as pc

from bench.common import Row, main, result
from pipelines.operator import REASON_COLUMN
from shards.schema import Segment, make_sample, samples_table
from synth.download import Download

I2D_PYTHON = os.environ.get("I2D_PYTHON", "/tmp/i2d-venv/bin/python")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")

# runs in img2dataset's venv: time download() over the URL list, print {"seconds", "successes"}
I2D_SCRIPT = r"""
import glob, json, os, sys, time
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from img2dataset import download
urls, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
download(url_list=urls, output_folder=out, output_format="files", input_format="txt", processes_count=1,
         thread_count=threads, resize_mode="no", disable_all_reencoding=True, compute_hash=None,
         extract_exif=False, timeout=10, retries=0, incremental_mode="incremental", enable_wandb=False,
         number_sample_per_shard=100000)
seconds = time.perf_counter() - start
ok = sum(json.load(open(p))["successes"] for p in glob.glob(os.path.join(out, "*_stats.json")))
print(json.dumps({"seconds": seconds, "successes": ok}))
"""


def _serve(conn: Connection) -> None:
    """Child process: serve the photographs at ``/img/<i>.jpg`` (photo ``i % 6``) over HTTP/1.1."""
    from pipelines.demo_data import photo_bytes

    photos = [photo_bytes(name) for name in PHOTOS]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            try:
                body = photos[int(self.path.removeprefix("/img/").removesuffix(".jpg")) % len(photos)]
            except ValueError:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    conn.send(server.server_port)
    server.serve_forever()


def _ours(op: Download, urls: list[str]) -> float:
    table = samples_table(make_sample("bench", "image", [Segment("image", uri=u)], u) for u in urls)
    start = time.perf_counter()
    out = op(table)
    seconds = time.perf_counter() - start
    failed = pc.sum(pc.is_valid(out[REASON_COLUMN])).as_py()
    if failed:
        raise RuntimeError(f"download rejected {failed} of {len(urls)} local URLs; the benchmark would be wrong")
    return seconds


def _img2dataset(urls: list[str], threads: int, work: Path) -> float:
    listing = work / f"urls-{len(urls)}.txt"
    listing.write_text("".join(u + "\n" for u in urls), encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=work) as out:
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.run(
            [I2D_PYTHON, "-c", I2D_SCRIPT, str(listing), os.path.join(out, "i2d"), str(threads)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=True,
        )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["successes"] != len(urls):
        raise RuntimeError(f"img2dataset fetched {got['successes']} of {len(urls)} local URLs")
    return float(got["seconds"])


def run(quick: bool = False) -> list[Row]:
    n, threads, repeats = (300, 16, 2) if quick else (2000, 16, 3)
    parent, child = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve, args=(child,), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{parent.recv()}/"
        urls = [f"{base}img/{i}.jpg" for i in range(n)]
        op = Download(allow_uris=[base], concurrency=threads, retries=0)
        have_i2d = Path(I2D_PYTHON).exists()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            _ours(op, urls)  # warm-up: the server's page of photos, our imports
            fixed = _img2dataset(urls[:1], threads, work) if have_i2d else 0.0
            best = {"ours": float("inf"), "i2d": float("inf")}
            for _ in range(repeats):
                best["ours"] = min(best["ours"], _ours(op, urls))
                if have_i2d:
                    best["i2d"] = min(best["i2d"], _img2dataset(urls, threads, work))
    finally:
        server.kill()
        server.join()
    ours = n / best["ours"]
    notes = f"N={n}, {threads} threads, best of {repeats}, HTTP/1.1 server on 127.0.0.1 in its own process"
    if not have_i2d:
        return [result("download/http", "images", ours, 0.0, f"{notes}; img2dataset skipped: no {I2D_PYTHON}")]
    bare = n / best["i2d"]
    steady = n / max(best["i2d"] - fixed, 1e-9)
    notes += (
        f"; img2dataset 1.47 files, resize_mode=no, no re-encode, no hash; its 1-URL run takes {fixed:.2f} s "
        f"(pool start-up), without it {steady:.0f} img/s (ratio {ours / steady:.2f})"
    )
    return [result("download/http", "images", ours, bare, notes)]


if __name__ == "__main__":
    main(run, sys.argv[1:])
