"""Ingest counts for each foreign layout, on data written by the real third-party tools (issue 12).

In a temp dir, each layout is written by the tool that writes it in the wild, then ingested through
a real local ``omni run`` (``run_recipe(executor="local")``) and audited:

- img2dataset 1.47 (``/tmp/i2d-venv``, or ``I2D_PYTHON``) downloads a CSV URL list, a few of them
  404s, from a loopback HTTP server of real photographs (scikit-image) into ``webdataset`` shards
  (``.jpg``/``.txt``/``.json`` per key, with its ``.parquet`` and ``_stats.json`` beside the tars);
  the output folder is a ``webdataset`` source as it lies.
- ``webdataset.TarWriter``/``ShardWriter`` shards in the layout of WebDataset's own test data:
  ``.cls`` labels, ``.txt.gz``/``.json.gz`` members, ``.jpg``/``.png``, a ``.tar.gz`` ImageNet shard.
- video2dataset's layout (``.mp4`` + ``.txt`` + ``.json``; still-image rows whose ``.mp4`` holds a
  JPEG), written with ``webdataset.TarWriter``; the clips are ffmpeg ``testsrc`` H.264/MPEG-4.
- CSV manifests: img2dataset's ``url,caption`` with local paths (stdlib ``csv``), the very URL list
  img2dataset read, and a WebVid CSV of loopback ``.mp4`` URLs, both through ``download``.
- mmc4 and OBELICS interleaved JSONL (local ``image_name`` files and loopback URLs, then ``download``).
- audio in every container ffmpeg writes that the reader sniffs, as a ``local`` folder with transcripts.

Captions mix Chinese and English. Each run has ``validate``; every run must audit balanced. The table
is markdown, for the issue: ``.venv/bin/python -m bench.foreign_ingest`` (about a minute on 2 cores).
Not in ``bench.run_all``: its rows are counts, not throughput ratios.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import webdataset as wds

from pipelines.audit import audit
from pipelines.demo_data import photo_bytes
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from shards.reader import iter_samples

I2D_PYTHON = os.environ.get("I2D_PYTHON", "/tmp/i2d-venv/bin/python")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "coins", "moon")
CAPTIONS = (
    ("宇航员在国旗前微笑", "An astronaut smiling in front of a flag"),
    ("一杯放在碟子上的咖啡", "A cup of coffee on a saucer"),
    ("一只名叫切尔西的橘猫", "A ginger tabby cat named Chelsea"),
    ("发射台上的火箭", "A rocket on the launch pad"),
    ("显微镜下的染色组织", "A stained tissue sample under a microscope"),
    ("拿着三脚架的摄影师", "A cameraman with a tripod"),
    ("黑色背景上的希腊硬币", "Greek coins on a dark background"),
    ("布满陨石坑的月球表面", "The surface of the moon, full of craters"),
)
AUDIO = ("wav", "flac", "mp3", "ogg", "aiff", "caf", "m4a")
VALIDATE = {"op": "validate", "params": {"threads": 2}}

# runs in img2dataset's venv: its webdataset writer over a CSV URL list; prints its stats totals
I2D_SCRIPT = r"""
import glob, json, os, sys
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
from img2dataset import download
urls, out = sys.argv[1], sys.argv[2]
download(url_list=urls, output_folder=out, output_format="webdataset", input_format="csv", url_col="url",
         caption_col="caption", processes_count=1, thread_count=4, image_size=128, resize_mode="keep_ratio",
         timeout=5, retries=0, enable_wandb=False, number_sample_per_shard=8, save_additional_columns=["lang"])
stats = [json.load(open(p)) for p in glob.glob(os.path.join(out, "*_stats.json"))]
print(json.dumps({k: sum(s[k] for s in stats) for k in ("count", "successes", "failed_to_download")}))
"""


def caption(i: int) -> str:
    zh, en = CAPTIONS[i % len(CAPTIONS)]
    return zh if i % 2 else en


# ---------------------------------------------------------------- loopback server


@contextmanager
def serve(media: dict[str, bytes]) -> Iterator[str]:
    """A loopback HTTP/1.1 server of ``media`` by path (``img/astronaut.jpg``); anything else is a 404.
    Yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = media.get(self.path.lstrip("/"))
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            ctype = "video/mp4" if self.path.endswith(".mp4") else "image/jpeg"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- one ingest


def ingest(work: Path, name: str, sources: list[dict[str, Any]], **doc: Any) -> dict[str, Any]:
    """A real local run of ``sources`` (with ``validate``) and its audit: counts and rejects by reason."""
    out = work / "runs" / name
    pipeline = doc.pop("pipeline", [VALIDATE])
    recipe = recipe_from_dict({"name": name, "output": str(out), "sources": sources, "pipeline": pipeline, **doc})
    start = time.perf_counter()
    m = run_recipe(recipe, executor="local", progress=False)
    seconds = time.perf_counter() - start
    report = audit(str(out))
    ledger = RunDir(str(out)).read_ledger().to_pylist()
    kinds: Counter[str] = Counter()
    cjk = 0
    for shard in sorted((out / "shards").glob("*.tar")):
        for s in iter_samples(str(shard)):
            kinds[s["kind"]] += 1
            cjk += any(seg["text"] and any("\u4e00" <= c <= "\u9fff" for c in seg["text"]) for seg in s["segments"])
    return {
        "kinds": kinds,
        "cjk": cjk,
        "inputs": m["ingested"],
        "samples": m["written"],
        "rejects": Counter(r["reason"] for r in ledger),
        "details": {r["locator"]: f"{r['reason']}: {r['detail']}" for r in ledger},
        "balanced": report.balanced and report.ingested == m["ingested"],
        "audit": report.summary().splitlines()[0],
        "seconds": seconds,
    }


# ---------------------------------------------------------------- the media


def ffmpeg_media(work: Path) -> dict[str, bytes]:
    """Audio in each container (one ffmpeg call) and two clips: H.264 with AAC, and MPEG-4 Part 2."""
    out = work / "ffmpeg"
    out.mkdir()
    sine = ["-f", "lavfi", "-i", "sine=frequency=440:duration=0.5:sample_rate=16000"]
    subprocess.run(["ffmpeg", "-v", "error", *sine, *(str(out / f"a.{ext}") for ext in AUDIO)], check=True)
    src = ["-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=1", "-f", "lavfi", "-i", "sine=duration=1"]
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"]
    subprocess.run(["ffmpeg", "-v", "error", *src, *h264, str(out / "h264.mp4")], check=True)
    mpeg4 = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=5:duration=1", "-c:v", "mpeg4"]
    subprocess.run(["ffmpeg", "-v", "error", *mpeg4, str(out / "mpeg4.mp4")], check=True)
    return {p.name: p.read_bytes() for p in out.iterdir()}


# ---------------------------------------------------------------- layouts


def img2dataset_shards(work: Path, base: str, url_csv: Path) -> tuple[dict[str, Any] | str, str]:
    """The real img2dataset over the URL list; its output folder ingested as it lies."""
    if not Path(I2D_PYTHON).exists():
        return f"skipped: img2dataset not installed (no {I2D_PYTHON})", ""
    out = work / "i2d"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [I2D_PYTHON, "-c", I2D_SCRIPT, str(url_csv), str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode:
        return f"skipped: img2dataset failed: {proc.stderr.strip().splitlines()[-1:]}", ""
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    files = Counter("_stats.json" if p.name.endswith("_stats.json") else "".join(p.suffixes) for p in out.iterdir())
    note = (
        f"img2dataset: {stats['count']} URLs, {stats['successes']} written, {stats['failed_to_download']} failed "
        f"(its parquet keeps those); folder holds {dict(sorted(files.items()))}"
    )
    return ingest(work, "i2d-shards", [{"name": "i2d", "type": "webdataset", "path": str(out)}]), note


def webdataset_shards(work: Path, media: dict[str, bytes]) -> dict[str, Any]:
    """``ShardWriter`` (4 samples a shard) and a gzipped ``TarWriter`` ImageNet-style shard."""
    out = work / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=4, verbose=0, mtime=0) as sink:
        for i, name in enumerate(PHOTOS):
            sample: dict[str, Any] = {"__key__": f"sample{i:04d}", "cls": i}
            if i % 2:
                sample["png"] = photo_bytes(name, "PNG", size=(64, 48))
                sample["json.gz"] = {"caption": caption(i), "source": "webdataset", "index": i}
            else:
                sample["jpg"] = media[f"img/{name}.jpg"]
            sample["txt.gz" if i % 3 else "txt"] = caption(i)
            sink.write(sample)
    with wds.TarWriter(str(out / "imagenet-000000.tar.gz"), mtime=0) as sink:  # gzip by its name, as w|gz
        for i, name in enumerate(PHOTOS[:6]):
            sink.write({"__key__": f"n0{1440764 + i}_{10026 + i}", "jpg": media[f"img/{name}.jpg"], "cls": 100 + i})
    return ingest(work, "wds", [{"name": "wds", "type": "webdataset", "path": str(out)}])


def video2dataset_shards(work: Path, media: dict[str, bytes]) -> dict[str, Any]:
    """video2dataset's key layout: clips, still-image rows (``.mp4`` holding a JPEG), captions, meta."""
    out = work / "v2d"
    out.mkdir()
    clips = [media["h264.mp4"], media["mpeg4.mp4"], media["img/coffee.jpg"], media["img/rocket.jpg"]] * 2
    with wds.TarWriter(str(out / "00000.tar"), mtime=0) as sink:
        for i, data in enumerate(clips):
            key = f"{i:09d}"
            meta = {"url": f"https://video.example/{key}.mp4", "key": key, "status": "success",
                    "caption": caption(i), "error_message": None, "duration": 1.0}  # fmt: skip
            sink.write({"__key__": key, "mp4": data, "txt": caption(i), "json": meta})
    return ingest(work, "v2d", [{"name": "v2d", "type": "webdataset", "path": str(out)}])


def csv_local(work: Path, media: dict[str, bytes]) -> dict[str, Any]:
    """img2dataset's ``url,caption`` CSV naming local files (one of them missing), written by ``csv``."""
    out = work / "csv-local"
    (out / "img").mkdir(parents=True)
    with open(out / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption", "lang"])
        for i, name in enumerate(PHOTOS):
            (out / "img" / f"{name}.jpg").write_bytes(media[f"img/{name}.jpg"])
            w.writerow([f"img/{name}.jpg", caption(i) + ", 逗号, and a comma", "zh" if i % 2 else "en"])
        w.writerow(["img/gone.jpg", "被删除的文件 a deleted file", "zh"])
    return ingest(work, "csv-local", [{"name": "pairs", "type": "csv", "path": str(out / "pairs.csv")}])


def csv_download(work: Path, base: str, url_csv: Path) -> dict[str, Any]:
    """The same URL list img2dataset read, through ``download`` then ``validate``."""
    download = {"op": "download", "params": {"allow_uris": [base], "timeout_s": 5.0, "retries": 0}}
    source = {"name": "urls", "type": "csv", "path": str(url_csv)}
    return ingest(work, "csv-urls", [source], storage={"allow_uris": [base]}, pipeline=[download, VALIDATE])


def webvid_download(work: Path, base: str) -> dict[str, Any]:
    """A WebVid CSV (``videoid,contentUrl,duration,page_dir,name``) of loopback clips, two of them 404s."""
    out = work / "webvid"
    out.mkdir()
    with open(out / "results_2M_val.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(8):
            clip = ("h264.mp4", "mpeg4.mp4", "missing.mp4")[i % 3]
            text = f'{caption(i)}\n第二行 "quoted", line two'
            w.writerow([1000 + i, f"{base}vid/{clip}", f"PT00H00M0{i}S", f"041_{i}", text])
    download = {"op": "download", "params": {"allow_uris": [base], "timeout_s": 5.0, "retries": 0}}
    source = {"name": "webvid", "type": "csv", "path": str(out)}
    return ingest(work, "webvid", [source], storage={"allow_uris": [base]}, pipeline=[download, VALIDATE])


def interleaved(work: Path, base: str, media: dict[str, bytes], layout: str) -> dict[str, Any]:
    """mmc4 (``text_list`` + ``image_info`` with local ``image_name`` files and ``raw_url``s) or OBELICS
    (``texts``/``images`` with loopback URLs), as JSONL, through ``download`` then ``validate``."""
    out = work / layout
    (out / "img").mkdir(parents=True)
    docs = []
    for d in range(6):
        names = [PHOTOS[(d + k) % len(PHOTOS)] for k in range(2)]
        texts = [caption(d), "第二段：图片之间的文字。", "A closing paragraph in English."]
        if layout == "mmc4":
            (out / "img" / f"{names[0]}.jpg").write_bytes(media[f"img/{names[0]}.jpg"])
            info = [
                {"image_name": f"img/{names[0]}.jpg", "raw_url": f"{base}img/{names[0]}.jpg", "matched_text_index": 0},
                {"raw_url": f"{base}img/{names[1] if d != 5 else 'gone'}.jpg", "matched_text_index": 2},
            ]
            docs.append({"url": f"https://blog.example/{d}", "text_list": texts, "image_info": info,
                         "similarity_matrix": [[0.1, 0.2, 0.3]] * 2})  # fmt: skip
        else:
            images = [None, f"{base}img/{names[0]}.jpg", None, f"{base}img/{names[1] if d != 5 else 'gone'}.jpg", None]
            texts5 = [texts[0], None, texts[1], None, texts[2]]
            meta = json.dumps([{"document_url": f"https://news.example/{d}"}] * 5)
            docs.append({"texts": texts5, "images": images, "metadata": meta, "general_metadata": "{}"})
    path = out / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    download = {"op": "download", "params": {"allow_uris": [base], "timeout_s": 5.0, "retries": 0}}
    source = {"name": layout, "type": "jsonl", "path": str(path), "layout": layout}
    return ingest(work, layout, [source], storage={"allow_uris": [base]}, pipeline=[download, VALIDATE])


def audio_folder(work: Path, media: dict[str, bytes]) -> dict[str, Any]:
    """ffmpeg's containers in a ``local`` folder, each beside a Chinese or English transcript."""
    out = work / "audio"
    out.mkdir()
    for i, ext in enumerate(AUDIO):
        (out / f"tone_{ext}.{ext}").write_bytes(media[f"a.{ext}"])
        (out / f"tone_{ext}.txt").write_text(f"{caption(i)}（{ext}）", encoding="utf-8")
    return ingest(work, "audio", [{"name": "audio", "type": "local", "path": str(out)}])


# ---------------------------------------------------------------- the table


def row(layout: str, tool: str, got: dict[str, Any] | str) -> str:
    if isinstance(got, str):
        return f"| {layout} | {tool} | – | – | {got} | – |"
    rejects = "; ".join(f"{reason} ×{n}" for reason, n in sorted(got["rejects"].items())) or "none"
    balanced = "yes" if got["balanced"] else f"**NO**: {got['audit']}"
    return f"| {layout} | {tool} | {got['inputs']} | {got['samples']} | {rejects} | {balanced} |"


def main() -> int:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foreign-ingest-") as tmp:
        work = Path(tmp)
        media = {f"img/{name}.jpg": photo_bytes(name, size=(256, 192)) for name in PHOTOS}
        made = ffmpeg_media(work)
        media.update(made)
        media.update({f"vid/{k}": v for k, v in made.items() if k.endswith(".mp4")})
        rows: list[tuple[str, str, dict[str, Any] | str]] = []
        notes: list[str] = []
        with serve(media) as base:
            url_csv = work / "urls.csv"
            with open(url_csv, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["url", "caption", "lang"])
                for i, name in enumerate(PHOTOS):
                    w.writerow([f"{base}img/{name}.jpg", caption(i), "zh" if i % 2 else "en"])
                for i in range(3):
                    w.writerow([f"{base}img/missing{i}.jpg", f"不存在的图片 missing image {i}", "zh"])
            i2d, note = img2dataset_shards(work, base, url_csv)
            rows.append(("img2dataset webdataset shards (+ .parquet, _stats.json)", "img2dataset 1.47.0", i2d))
            notes += [note] if note else []
            if isinstance(i2d, dict):
                tars = [{"name": "i2d", "type": "webdataset", "path": str(work / "i2d" / "*.tar")}]
                rows.append(("img2dataset webdataset shards, `*.tar` only", "img2dataset 1.47.0",
                             ingest(work, "i2d-tars", tars)))  # fmt: skip
            tool = f"webdataset {wds.__version__}"
            rows.append(("WebDataset test-data layout (.cls, .txt.gz, .json.gz, .png, .tar.gz)",
                         f"{tool} ShardWriter/TarWriter", webdataset_shards(work, media)))  # fmt: skip
            rows.append(("video2dataset layout (.mp4 clips and JPEG-in-.mp4 stills, .txt, .json)",
                         f"{tool} TarWriter + ffmpeg", video2dataset_shards(work, media)))  # fmt: skip
            rows.append(("img2dataset CSV, local paths", "Python csv", csv_local(work, media)))
            rows.append(("img2dataset CSV, loopback URLs + download (the list img2dataset read)", "Python csv",
                         csv_download(work, base, url_csv)))  # fmt: skip
            rows.append(("WebVid CSV, loopback .mp4 URLs + download", "Python csv", webvid_download(work, base)))
            rows.append(("mmc4 JSONL (image_name + raw_url) + download", "Python json",
                         interleaved(work, base, media, "mmc4")))  # fmt: skip
            rows.append(("OBELICS JSONL (URLs) + download", "Python json", interleaved(work, base, media, "obelics")))
        ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split()[2]
        rows.append((f"audio folder ({', '.join(AUDIO)}) + .txt", f"ffmpeg {ffmpeg}", audio_folder(work, media)))
        print("| layout | tool that wrote it | inputs | samples | rejects (by reason) | audit balanced |")
        print("|---|---|---|---|---|---|")
        for layout, tool, got in rows:
            print(row(layout, tool, got))
        print()
        for note in notes:
            print(f"- {note}")
        for layout, _, got in rows:
            if isinstance(got, dict):
                kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(got["kinds"].items()))
                print(f"- {layout}: samples by kind: {kinds or 'none'}; {got['cjk']} with Chinese text")
        for layout, _, got in rows:
            if isinstance(got, dict) and got["details"]:
                print(f"- {layout}: " + " | ".join(f"{loc}: {d}" for loc, d in sorted(got["details"].items())))
        print(f"- total {time.perf_counter() - start:.1f} s; runs: " + ", ".join(
            f"{got['seconds']:.2f} s" for _, _, got in rows if isinstance(got, dict)))  # fmt: skip
        failed = [layout for layout, _, got in rows if isinstance(got, dict) and not got["balanced"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
