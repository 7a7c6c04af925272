"""``omni view``: browse samples of a run or shard set in a local web page (loopback only).

The index holds each sample's JSON and the byte ranges of its media members, found by one pass over
the tar headers; media are served straight from the shard by range, so nothing is extracted or
copied. Filters: data type, language, a score column with a minimum, and jump to an id.
"""

from __future__ import annotations

import json
import mimetypes
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from shards import storage
from shards.codec import FORMAT
from shards.reader import split_key, unsafe_member_reason
from shards.tarstream import iter_members

MIME = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "mp4": "video/mp4",
    "webm": "video/webm",
}


@dataclass
class IndexedSample:
    doc: dict[str, Any]
    shard: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # member suffix -> (offset, size)

    def summary(self) -> dict[str, Any]:
        d = self.doc
        scores = {k: v for k, v in d.get("columns", {}).items() if isinstance(v, int | float | str | bool)}
        return {
            "id": d["id"],
            "kind": d["kind"],
            "source": d["source"],
            "lang": d.get("meta", {}).get("lang") or scores.get("lang") or "und",
            "scores": scores,
            "meta": d.get("meta", {}),
            "segments": [
                {
                    "modality": s["modality"],
                    "text": s.get("text"),
                    "uri": s.get("uri"),
                    "media": f"/media/{d['id']}/{i}" if "member" in s else None,
                    "meta": s.get("meta", {}),
                }
                for i, s in enumerate(d["segments"])
            ],
        }


def _shards_of(target: str) -> list[str]:
    from pipelines.inspect_shards import _shard_paths

    return _shard_paths(target)[0]


def build_index(target: str) -> dict[str, IndexedSample]:
    """One pass over tar headers: sample JSON plus (offset, size) of every media member."""
    index: dict[str, IndexedSample] = {}
    for shard in _shards_of(target):
        with storage.open_read(shard) as f:
            pending: dict[str, dict[str, tuple[int, int]]] = {}
            for member, data in iter_members(f, want=lambda m: m.isfile() and m.name.endswith(".json")):
                if unsafe_member_reason(member, 1 << 40):
                    continue
                key, ext = split_key(member.name)
                if ext == "json" and data is not None:
                    doc = json.loads(data)
                    if doc.get("format") == FORMAT:
                        index[key] = IndexedSample(doc, shard, pending.pop(key, {}))
                else:
                    target_members = index[key].members if key in index else pending.setdefault(key, {})
                    target_members[ext] = (member.offset_data, member.size)
    return index


PAGE = (Path(__file__).with_name("viewer.html")).read_text(encoding="utf-8")


class Viewer:
    def __init__(self, target: str, page_size: int = 200) -> None:
        self.target = target
        self.index = build_index(target)
        self.page_size = page_size

    def facets(self) -> dict[str, list[str]]:
        summaries = [s.summary() for s in self.index.values()]
        scores = sorted({k for s in summaries for k, v in s["scores"].items() if isinstance(v, int | float)})
        return {
            "kinds": sorted({s["kind"] for s in summaries}),
            "langs": sorted({s["lang"] for s in summaries}),
            "scores": scores,
        }

    def query(self, params: dict[str, str]) -> dict[str, Any]:
        wanted_id = params.get("id", "")
        rows = []
        for sample in self.index.values():
            s = sample.summary()
            if wanted_id and s["id"] != wanted_id:
                continue
            if params.get("kind") and s["kind"] != params["kind"]:
                continue
            if params.get("lang") and s["lang"] != params["lang"]:
                continue
            score, minimum = params.get("score"), params.get("min")
            if score and minimum:
                value = s["scores"].get(score)
                if not isinstance(value, int | float) or value < float(minimum):
                    continue
            rows.append(s)
        return {"total": len(rows), "samples": rows[: self.page_size]}

    def media(self, sample_id: str, index: int) -> tuple[bytes, str] | None:
        sample = self.index.get(sample_id)
        if sample is None or not 0 <= index < len(sample.doc["segments"]):
            return None
        member = sample.doc["segments"][index].get("member")
        if member not in sample.members:
            return None
        offset, size = sample.members[member]
        with storage.open_read(sample.shard) as f:
            f.seek(offset)
            data = f.read(size)
        ext = member.rsplit(".", 1)[-1]
        return data, MIME.get(ext) or mimetypes.guess_type(f"x.{ext}")[0] or "application/octet-stream"


def _handler(viewer: Viewer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # quiet: the page makes many requests
            pass

        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/":
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if url.path == "/api/facets":
                return self._send(200, json.dumps(viewer.facets()).encode(), "application/json")
            if url.path == "/api/samples":
                return self._send(200, json.dumps(viewer.query(params)).encode(), "application/json")
            m = re.fullmatch(r"/media/([0-9a-f]+)/(\d+)", url.path)
            found = viewer.media(m.group(1), int(m.group(2))) if m else None
            if found is None:
                return self._send(404, b"not found", "text/plain")
            data, ctype = found
            rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if rng and (rng.group(1) or rng.group(2)):
                start = int(rng.group(1) or 0)
                end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
                headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Accept-Ranges": "bytes"}
                return self._send(HTTPStatus.PARTIAL_CONTENT, data[start : end + 1], ctype, headers)
            return self._send(200, data, ctype, {"Accept-Ranges": "bytes"})

    return Handler


def serve(target: str, port: int = 8765, block: bool = True) -> ThreadingHTTPServer:
    """Serve the viewer on 127.0.0.1 only; ``port=0`` picks a free one (see ``server.server_port``)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(Viewer(target)))
    if block:
        try:
            server.serve_forever()
        finally:
            server.server_close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
