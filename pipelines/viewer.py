"""``omni view``: browse samples of a run or shard set in a local web page (loopback only).

The index holds each sample's JSON and the byte ranges of its media members, found by one pass over
the tar headers; media are served straight from the shard by range, so nothing is extracted or
copied. Filters: data type, language, a score column with a minimum, text search (case-insensitive,
over the text segments; any script), an id or a prefix of one; results come in pages
(``offset``/``limit``), and ``/api/random`` picks one matching sample (``seed`` makes it repeatable).
Each sample shows its token count (the ``tokens`` that ``count_tokens`` writes into segment meta).

Shards are untrusted input (anyone can write a tar): the page builds every element with DOM calls
and ``textContent`` (never HTML from sample strings), loads only ``/media/...`` URLs the server
made, and every response carries a strict Content-Security-Policy. A segment ``uri`` is shown as
text, never fetched: the browser would otherwise request any address a shard names. Requests must
name this server in ``Host`` (a DNS-rebinding page would name its own host). Members that are not
our JSON are skipped and counted; shards whose size differs from the shard-set manifest are listed
as damaged and not indexed.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from shards import storage
from shards.codec import FORMAT
from shards.reader import split_key, unsafe_member_reason
from shards.tarstream import TarCorrupt, iter_members
from shards.verify import shard_damage

# Only these types are ever served: a member named ``x.html`` or ``x.js`` must not become a page or a
# script of this origin, so anything else is an opaque download (with nosniff).
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
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SAFE_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")  # keys that may appear in a /media/ URL
MAX_JSON_MEMBER = 16 << 20
MAX_PAGE = 1000  # samples in one response
MAX_QUERY = 200  # characters of a search, an id prefix or a seed
MAX_SEARCH_CHARS = 200_000  # characters of one sample's text that a search looks at
ASSETS = {
    "/": ("viewer.html", "text/html; charset=utf-8"),
    "/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any, limit: int = 100_000) -> str:
    """Any JSON value as a bounded string (shards may hold numbers, lists or nulls where we expect text)."""
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return s[:limit]


@dataclass
class IndexedSample:
    doc: dict[str, Any]
    shard: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # member suffix -> (offset, size)
    key: str = ""

    def summary(self) -> dict[str, Any]:
        """The page's view of the sample: plain strings and numbers only, whatever the shard held."""
        d = self.doc
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        columns = d.get("columns") if isinstance(d.get("columns"), dict) else {}
        scores = {_text(k, 200): v for k, v in columns.items() if isinstance(v, int | float | str | bool)}
        scores = {k: (_text(v, 1000) if isinstance(v, str) else v) for k, v in scores.items()}
        lang = meta.get("lang") or columns.get("lang") or "und"
        segments = []
        for i, s in enumerate(d["segments"]):
            s = s if isinstance(s, dict) else {}
            member = s.get("member")
            served = isinstance(member, str) and member in self.members and SAFE_KEY.fullmatch(self.key)
            seg_meta = s.get("meta") if isinstance(s.get("meta"), dict) else {}
            segments.append(
                {
                    "modality": _text(s.get("modality", "?"), 40),
                    "text": _text(s["text"]) if s.get("text") is not None else None,
                    "uri": _text(s["uri"], 2000) if s.get("uri") is not None else None,
                    "media": f"/media/{self.key}/{i}" if served else None,
                    "tokens": seg_meta["tokens"] if _number(seg_meta.get("tokens")) else None,
                    "meta": seg_meta,
                }
            )
        counted = [s["tokens"] for s in segments if s["tokens"] is not None]
        return {
            "id": _text(d["id"], 200),
            "kind": _text(d["kind"], 200),
            "source": _text(d["source"], 200),
            "lang": _text(lang, 100),
            "tokens": sum(counted) if counted else None,
            "scores": scores,
            "meta": meta,
            "segments": segments,
        }


def _doc_problem(doc: Any) -> str | None:
    """Why a JSON member cannot be shown as one of our samples, or None."""
    if not isinstance(doc, dict):
        return "json member is not an object"
    if doc.get("format") != FORMAT:
        return "not an omnicorpus sample"
    if any(k not in doc for k in ("id", "kind", "source", "segments")) or not isinstance(doc["segments"], list):
        return "sample json lacks fields"
    return None


@dataclass
class Index:
    samples: dict[str, IndexedSample] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason -> members not shown
    damaged: list[dict[str, str]] = field(default_factory=list)  # {"shard", "reason"}


def _shards_of(target: str, index: Index) -> list[tuple[str, dict[str, Any] | None]]:
    """(shard path, its shard-set manifest entry or None) for a run, a shard folder or one tar.

    An unreadable manifest is reported as damage and the folder's tars are shown unchecked."""
    from pipelines.inspect_shards import _shard_paths

    try:
        paths, manifest = _shard_paths(target)
        entries = manifest["shards"] if manifest is not None else None
        if entries is not None and not all(isinstance(e, dict) for e in entries):
            raise TypeError("a shard entry is not an object")
    except (ValueError, KeyError, TypeError) as e:
        index.damaged.append({"shard": f"{target} (manifest)", "reason": f"unreadable manifest: {str(e)[:200]}"})
        for directory in (storage.join(target, "shards"), target):
            tars = storage.listdir(directory, ".tar")
            if tars:
                return [(p, None) for p in tars]
        return []
    if entries is None:
        return [(p, None) for p in paths]
    return list(zip(paths, entries, strict=True))


def _index_shard(shard: str, index: Index) -> None:
    with storage.open_read(shard) as f:
        pending: dict[str, dict[str, tuple[int, int]]] = {}

        def want(m: Any) -> bool:
            return m.isfile() and m.name.endswith(".json") and m.size <= MAX_JSON_MEMBER

        for member, data in iter_members(f, want=want):
            if unsafe_member_reason(member, 1 << 40):
                index.skipped["unsafe tar member"] += 1
                continue
            key, ext = split_key(member.name)
            if ext == "json":
                if data is None:
                    index.skipped["json member too large"] += 1
                    continue
                try:
                    doc = json.loads(data, parse_constant=lambda _: None)  # NaN would break the page's JSON
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    index.skipped["bad json member"] += 1
                    continue
                problem = _doc_problem(doc)
                if problem:
                    index.skipped[problem] += 1
                    continue
                index.samples[key] = IndexedSample(doc, shard, pending.pop(key, {}), key)
            else:
                target_members = index.samples[key].members if key in index.samples else pending.setdefault(key, {})
                target_members[ext] = (member.offset_data, member.size)


def build_index(target: str) -> Index:
    """One pass over tar headers: sample JSON plus (offset, size) of every media member.

    A shard the manifest disagrees with (size) is reported and not read; a shard that breaks while
    being read is reported, and the whole members before the break stay indexed."""
    index = Index()
    for shard, entry in _shards_of(target, index):
        where = entry.get("path", "") if entry else ""
        if not isinstance(where, str) or where.startswith("/") or ".." in where.split("/") or "://" in where:
            index.damaged.append({"shard": _text(where, 300), "reason": "path leaves the shard folder"})
            continue
        damage = shard_damage(shard, entry) if entry else None
        if damage:
            index.damaged.append({"shard": shard, "reason": damage})
            continue
        try:
            _index_shard(shard, index)
        except (TarCorrupt, OSError) as e:
            index.damaged.append({"shard": shard, "reason": f"unreadable: {str(e)[:200]}"})
    return index


def _asset(name: str) -> bytes:
    return Path(__file__).with_name(name).read_bytes()


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        return min(max(int(value), low), high) if value else default
    except ValueError:
        return default


class Viewer:
    def __init__(self, target: str, page_size: int = 200) -> None:
        self.target = target
        built = build_index(target)
        self.index = built.samples
        self.skipped = dict(built.skipped)
        self.damaged = built.damaged
        self.summaries = {k: s.summary() for k, s in self.index.items()}
        # what a search looks at: the text segments, case-folded (so "STRASSE" finds "Straße")
        self.haystacks = {
            k: "\n".join(seg["text"] for seg in s["segments"] if seg["text"])[:MAX_SEARCH_CHARS].casefold()
            for k, s in self.summaries.items()
        }
        self.page_size = page_size

    def facets(self) -> dict[str, Any]:
        summaries = self.summaries.values()
        numeric = {k for s in summaries for k, v in s["scores"].items() if _number(v)}
        scores = sorted(numeric)
        return {
            "kinds": sorted({s["kind"] for s in summaries}),
            "langs": sorted({s["lang"] for s in summaries}),
            "scores": scores,
            "total": len(self.summaries),
            "page_size": self.page_size,
            **self.damage(),
        }

    def damage(self) -> dict[str, Any]:
        return {"damaged": self.damaged, "skipped": self.skipped}

    def _matching(self, params: dict[str, str], by_id: bool = True) -> tuple[list[dict[str, Any]], str | None]:
        """The samples the filters let through, in shard order, and how an ``id`` matched: ``exact``,
        ``prefix`` (one sample starts with it), ``ambiguous`` (several do) or ``none``."""
        score = params.get("score")
        try:
            minimum = float(params["min"]) if params.get("min") else None
        except ValueError:
            minimum = None
        needle = params.get("q", "")[:MAX_QUERY].strip().casefold()
        rows = []
        for key, s in self.summaries.items():
            if params.get("kind") and s["kind"] != params["kind"]:
                continue
            if params.get("lang") and s["lang"] != params["lang"]:
                continue
            if score and minimum is not None:
                value = s["scores"].get(score)
                if not _number(value) or value < minimum:
                    continue
            if needle and needle not in self.haystacks[key]:
                continue
            rows.append(s)
        wanted_id = params.get("id", "")[:MAX_QUERY].strip() if by_id else ""
        if not wanted_id:
            return rows, None
        exact = [s for s in rows if s["id"] == wanted_id]
        if exact:
            return exact, "exact"
        prefix = wanted_id.lower()
        rows = [s for s in rows if s["id"].lower().startswith(prefix)]
        return rows, {0: "none", 1: "prefix"}.get(len(rows), "ambiguous")

    def query(self, params: dict[str, str]) -> dict[str, Any]:
        rows, id_match = self._matching(params)
        offset = _int(params.get("offset"), 0, 0, max(len(rows) - 1, 0))
        limit = _int(params.get("limit"), self.page_size, 1, MAX_PAGE)
        out = {"total": len(rows), "offset": offset, "limit": limit, "samples": rows[offset : offset + limit]}
        if id_match is not None:
            out["id_match"] = id_match
        return out

    def random_sample(self, params: dict[str, str]) -> dict[str, Any]:
        """One sample the filters (not ``id``) let through, chosen at random; the same ``seed`` (any
        string) always chooses the same one."""
        rows, _ = self._matching(params, by_id=False)
        seed = params.get("seed")
        rng = random.Random(seed[:MAX_QUERY]) if seed else random.Random()
        chosen = [rng.choice(rows)] if rows else []
        return {"total": len(rows), "offset": 0, "limit": 1, "samples": chosen, "random": True}

    def media(self, key: str, index: int) -> tuple[str, int, int, str] | None:
        """(shard, offset, size, content type) of a served member, or None."""
        sample = self.index.get(key)
        if sample is None or not 0 <= index < len(sample.doc["segments"]):
            return None
        seg = sample.doc["segments"][index]
        member = seg.get("member") if isinstance(seg, dict) else None
        if not isinstance(member, str) or member not in sample.members:
            return None
        offset, size = sample.members[member]
        ext = member.rsplit(".", 1)[-1].lower()
        return sample.shard, offset, size, MIME.get(ext, "application/octet-stream")


def _handler(viewer: Viewer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:  # quiet: the page makes many requests
            pass

        def end_headers(self) -> None:  # every response, errors included, carries the policy
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            super().end_headers()

        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, doc: Any) -> None:
            self._send(200, json.dumps(doc).encode(), "application/json")

        def _host_ok(self) -> bool:
            """Only this server's loopback names: a DNS-rebinding page sends its own host name."""
            port = self.server.server_address[1]
            allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
            return (self.headers.get("Host") or "").strip().lower() in allowed

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self._host_ok():
                return self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain; charset=utf-8")
            url = urlparse(self.path)
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path in ASSETS:
                name, ctype = ASSETS[url.path]
                return self._send(200, _asset(name), ctype)
            if url.path == "/api/facets":
                return self._json(viewer.facets())
            if url.path == "/api/damage":
                return self._json(viewer.damage())
            if url.path == "/api/samples":
                return self._json(viewer.query(params))
            if url.path == "/api/random":
                return self._json(viewer.random_sample(params))
            m = re.fullmatch(r"/media/([0-9A-Za-z_-]{1,128})/(\d{1,6})", url.path)
            found = viewer.media(m.group(1), int(m.group(2))) if m else None
            if found is None:
                return self._send(404, b"not found\n", "text/plain; charset=utf-8")
            shard, offset, size, ctype = found
            start, end = 0, size - 1
            rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            partial = bool(rng and (rng.group(1) or rng.group(2)))
            if partial:
                if rng.group(1):
                    start = int(rng.group(1))
                    end = min(int(rng.group(2)) if rng.group(2) else size - 1, size - 1)
                else:  # bytes=-N: the last N bytes
                    start = max(0, size - int(rng.group(2)))
                if start > end:
                    return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
            try:
                with storage.open_read(shard) as f:
                    f.seek(offset + start)
                    data = f.read(end - start + 1)
            except OSError:
                return self._send(404, b"not found\n", "text/plain; charset=utf-8")
            headers = {"Accept-Ranges": "bytes"}
            if partial:
                headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{size}"
                return self._send(HTTPStatus.PARTIAL_CONTENT, data, ctype, headers)
            return self._send(200, data, ctype, headers)

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
