"""The ``download`` operator: fetch the http(s) media of URL rows (LAION-style lists) into the batch.

A segment with an ``http(s)://`` ``uri`` and no bytes is fetched; on success it holds the bytes and
its meta says where they came from (``url``, ``status``, ``content_type``, ``bytes``, ``ext``), so
the shard is self-contained. A row whose fetch fails is rejected with a reason and a detail naming
the HTTP status or error, so every URL ends in a shard or in the ledger. With ``on_failure: drop`` a
row that has other media (an mmc4/OBELICS document with one dead image among several) keeps going
without the failed segments, and lists them in its own meta (``download_failed``), as OBELICS did.

Bounded by design: a URL (and every redirect hop) must lie under the ``allow_uris`` prefixes the
recipe passes in, so data can never point the downloader at an arbitrary host; each request has a
deadline, the body is streamed and cut past ``max_bytes``, redirects are counted and loops caught,
and retries (connection errors, timeouts, 5xx, 429) are few with exponential backoff. Sites that
opt out with ``X-Robots-Tag: noai`` / ``noimageai`` (for any user agent) are honoured.

Plain ``http.client`` on a thread pool with keep-alive connections reused per host: no extra
dependency, and one TCP handshake per connection instead of one per URL.
"""

from __future__ import annotations

import http.client
import io
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import pyarrow as pa
from PIL import Image

from pipelines.operator import Operator, Resources, register, with_rejections
from shards.codec import sniff_ext
from shards.confine import Confined, UriPolicy
from shards.schema import dumps_meta, loads_meta
from synth.rows import replace_samples, seg_meta

MEDIA = ("image", "audio", "video")
REDIRECTS = (301, 302, 303, 307, 308)
OPT_OUT = {"noai", "noimageai"}
CHUNK = 1 << 16
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
MAX_RETRY_AFTER_S = 30.0  # a Retry-After beyond this is not waited for in full (retries stay few anyway)
# extension by content type, for when the magic bytes say nothing (a format sniff_ext does not know)
CONTENT_EXT = {"image/avif": "avif", "image/bmp": "bmp", "image/tiff": "tif", "audio/mpeg": "mp3", "video/mp4": "mp4"}

REASON_FAILED = "download failed"
REASON_TOO_LARGE = "download too large"
REASON_OPTED_OUT = "opted out (X-Robots-Tag)"
REASON_REDIRECT = "redirect not allowed"
REASON_NOT_ALLOWED = "uri not allowed"


class DownloadError(Exception):
    """Why one URL did not come back; ``reason`` is the ledger reason, ``status`` the last HTTP status."""

    def __init__(
        self, reason: str, detail: str, status: int | None = None, retry: bool = False, wait_s: float = 0.0
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.status, self.retry, self.wait_s = reason, detail, status, retry, wait_s


@dataclass
class Fetched:
    data: bytes
    status: int
    content_type: str
    final_url: str
    attempts: int


def is_url(uri: str | None) -> bool:
    return isinstance(uri, str) and uri[:8].lower().startswith(("http://", "https://"))


def opted_out(values: list[str]) -> str | None:
    """The ``X-Robots-Tag`` value that opts out of AI use, if any.

    Every form counts, ``noai``, ``googlebot: noai`` and ``otherbot: noimageai`` alike: a site that
    says no to one crawler's AI use is taken to say no to ours too."""
    for value in values:
        if OPT_OUT & {t for t in re.split(r"[\s,:;]+", value.lower()) if t}:
            return value
    return None


class _Connections:
    """Keep-alive connections per (scheme, host, port), handed to one thread at a time."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._idle: dict[tuple[str, str, int], queue.SimpleQueue[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def take(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        with self._lock:
            idle = self._idle.setdefault(key, queue.SimpleQueue())
        try:
            return idle.get_nowait()
        except queue.Empty:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            return cls(host, port, timeout=self.timeout_s)

    def give(self, scheme: str, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        self._idle[(scheme, host, port)].put(conn)

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                while not idle.empty():
                    idle.get_nowait().close()
            self._idle.clear()


@register
class Download(Operator):
    """Fetches http(s) media segments (images, audio, video) that have a ``uri`` and no bytes.

    Params:
        allow_uris: the URL prefixes it may fetch (normally the recipe's ``storage.allow_uris``); every
            redirect hop is checked too.
        concurrency: parallel requests per batch.
        timeout_s: seconds per request, connect to last byte.
        retries: retries after an error, a 5xx or a 429.
        backoff_s: delay ``backoff_s * 2**n`` before retry n+1.
        max_redirects: redirects followed per URL.
        max_bytes: a larger response is rejected (``download too large``).
        resize: ``{max_pixels: N, quality: 90}``: images larger than N pixels are scaled down and stored
            as JPEG.
        user_agent: the User-Agent header sent.
        on_failure: ``reject``: the row; ``drop``: only the failed segments, while at least one media
            segment came back.
    """

    name = "download"
    resources = Resources(cpus=1)
    param_ranges = {
        "concurrency": (1, 1024),
        "timeout_s": (0.001, None),
        "retries": (0, 10),
        "backoff_s": (0, 60),
        "max_redirects": (0, 30),
        "max_bytes": (1, None),
    }

    def __init__(
        self,
        allow_uris: list[str],
        concurrency: int = 32,
        timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_redirects: int = 5,
        max_bytes: int = 64_000_000,
        resize: dict[str, int] | None = None,
        user_agent: str = "omnicorpus-download/1",
        on_failure: str = "reject",
    ) -> None:
        super().__init__(
            allow_uris=allow_uris,
            concurrency=concurrency,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            max_redirects=max_redirects,
            max_bytes=max_bytes,
            resize=resize,
            user_agent=user_agent,
            on_failure=on_failure,
        )
        if on_failure not in ("reject", "drop"):
            raise ValueError(f"download on_failure must be 'reject' or 'drop', got {on_failure!r}")
        self.drop_failed = on_failure == "drop"
        bad = [u for u in allow_uris if not is_url(u)]
        if bad:
            raise ValueError(f"download allow_uris must be http(s) prefixes, not {bad[0]!r}")
        self.policy = UriPolicy(list(allow_uris))
        self.concurrency, self.timeout_s, self.retries = int(concurrency), float(timeout_s), int(retries)
        self.backoff_s, self.max_redirects, self.max_bytes = float(backoff_s), int(max_redirects), int(max_bytes)
        self.user_agent = user_agent
        self.resize_pixels, self.jpeg_quality = None, 90
        if resize is not None:
            unknown = set(resize) - {"max_pixels", "quality"}
            if unknown or "max_pixels" not in resize:
                raise ValueError(f"download resize takes max_pixels (required) and quality, got {sorted(resize)}")
            self.resize_pixels, self.jpeg_quality = int(resize["max_pixels"]), int(resize.get("quality", 90))
            if self.resize_pixels < 1 or not 1 <= self.jpeg_quality <= 100:
                raise ValueError("download resize needs max_pixels >= 1 and quality in [1, 100]")

    # -- one URL ---------------------------------------------------------------------------------

    def _check(self, url: str, reason: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, request target) of an allowed URL; raises DownloadError otherwise."""
        try:
            self.policy.check(url)
        except Confined as e:
            raise DownloadError(reason, e.detail or url[:200]) from None
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
            raise DownloadError(reason, url[:200])
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise DownloadError(reason, f"bad port: {url[:200]}") from None
        try:
            host = parts.hostname.encode("idna").decode("ascii")  # an internationalised name, as DNS spells it
        except UnicodeError:
            raise DownloadError(reason, f"bad host: {url[:200]}") from None
        # URL lists hold raw spaces and non-ASCII paths; HTTP wants them percent-encoded (existing escapes kept)
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=URL_SAFE)
        return parts.scheme.lower(), host, port, target

    def _get_once(self, url: str, pool: _Connections) -> Fetched:
        """One attempt: follow allowed redirects, stream the body under the size cap and the deadline."""
        deadline = time.monotonic() + self.timeout_s
        seen = {url}
        for _hop in range(self.max_redirects + 1):
            scheme, host, port, target = self._check(url, REASON_NOT_ALLOWED if len(seen) == 1 else REASON_REDIRECT)
            conn = pool.take(scheme, host, port)
            reused = conn.sock is not None
            headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
            try:
                _wait_at_most(conn, deadline)
                try:
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    if not reused:
                        raise
                    conn.close()  # the server closed an idle keep-alive connection: reconnect once
                    conn.request("GET", target, headers=headers)
                    resp = conn.getresponse()
                status = resp.status
                if status in REDIRECTS:
                    location = resp.getheader("Location")
                    resp.read(CHUNK)  # redirect bodies are small; a large one just closes the connection
                    if not location:
                        raise DownloadError(REASON_FAILED, f"HTTP {status} without Location", status)
                    url = urljoin(url, location.strip())
                    if url in seen:
                        raise DownloadError(REASON_FAILED, "redirect loop", status)
                    seen.add(url)
                    self._keep(resp, conn, pool, scheme, host, port)
                    continue
                robots = opted_out(resp.headers.get_all("X-Robots-Tag") or [])
                if robots is not None:
                    raise DownloadError(REASON_OPTED_OUT, robots[:200], status)
                if status >= 500 or status == 429:
                    after = (resp.getheader("Retry-After") or "").strip()
                    wait = min(float(after), MAX_RETRY_AFTER_S) if after.isdigit() else 0.0
                    raise DownloadError(REASON_FAILED, f"HTTP {status}", status, retry=True, wait_s=wait)
                if status != 200:
                    raise DownloadError(REASON_FAILED, f"HTTP {status}", status)
                length = resp.getheader("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise DownloadError(REASON_TOO_LARGE, f"{length} bytes > {self.max_bytes}", status)
                data = self._body(resp, conn, deadline, status)
                content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
                self._keep(resp, conn, pool, scheme, host, port)
                return Fetched(data, status, content_type, url, 1)
            except DownloadError:
                conn.close()
                raise
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                conn.close()
                detail = "timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"[:200]
                raise DownloadError(REASON_FAILED, detail, retry=True) from None
        raise DownloadError(REASON_FAILED, f"too many redirects (> {self.max_redirects})")

    def _body(
        self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float, status: int
    ) -> bytes:
        """The body, streamed: cut past ``max_bytes``, and each read waits only for what is left of the deadline."""
        buf = bytearray()
        while True:
            _wait_at_most(conn, deadline)
            chunk = resp.read1(CHUNK)
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > self.max_bytes:
                raise DownloadError(REASON_TOO_LARGE, f"over {self.max_bytes} bytes", status)
            if time.monotonic() > deadline:
                raise TimeoutError

    @staticmethod
    def _keep(
        resp: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        pool: _Connections,
        scheme: str,
        host: str,
        port: int,
    ) -> None:
        """Return a connection whose response was read to the end; close any other."""
        if resp.isclosed() and not resp.will_close:
            pool.give(scheme, host, port, conn)
        else:
            conn.close()

    def fetch(self, url: str, pool: _Connections) -> Fetched:
        """``url``'s body, retried with exponential backoff on connection errors, timeouts, 5xx and 429."""
        for attempt in range(self.retries + 1):
            try:
                got = self._get_once(url, pool)
                got.attempts = attempt + 1
                return got
            except DownloadError as e:
                if not e.retry or attempt == self.retries:
                    if e.retry and self.retries:
                        e.detail = f"{e.detail} after {attempt + 1} attempts"
                    raise
                time.sleep(max(self.backoff_s * 2**attempt, e.wait_s))  # Retry-After, when the server sent one
        raise AssertionError("unreachable")

    # -- one segment, one batch -------------------------------------------------------------------

    def _resized(self, data: bytes) -> tuple[bytes, dict[str, Any]]:
        """Images over ``max_pixels`` scaled down (aspect kept) and stored as JPEG; others untouched."""
        assert self.resize_pixels is not None
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h <= self.resize_pixels:
                    return data, {"width": w, "height": h}
                scale = (self.resize_pixels / (w * h)) ** 0.5
                size = (max(1, int(w * scale)), max(1, int(h * scale)))
                im.draft("RGB", size)  # JPEG: decode at a reduced scale, far cheaper than full size
                small = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise DownloadError("undecodable image", f"{type(e).__name__}: {e}"[:200]) from None
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=self.jpeg_quality)
        return out.getvalue(), {"width": size[0], "height": size[1], "resized_from": [w, h]}

    def _segment(self, seg: dict[str, Any], pool: _Connections) -> dict[str, Any]:
        """The segment with its bytes, or raises DownloadError (its meta then carries the status)."""
        url = seg["uri"]
        got = self.fetch(url, pool)
        data, extra = got.data, {}
        if not data:
            raise DownloadError(REASON_FAILED, "empty body", got.status)
        if self.resize_pixels is not None and seg["modality"] == "image":
            data, extra = self._resized(data)
        ext = sniff_ext(seg["modality"], data)
        if ext in ("img", "audio", "video"):
            ext = CONTENT_EXT.get(got.content_type, ext)
        meta = {
            **seg_meta(seg),
            "url": url,
            "status": got.status,
            "content_type": got.content_type,
            "bytes": len(data),
            "ext": ext,
            **extra,
        }
        if got.final_url != url:
            meta["final_url"] = got.final_url
        if got.attempts > 1:
            meta["attempts"] = got.attempts
        return {**seg, "bytes": data, "uri": None, "meta": _dumps(meta)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        targets = [
            (r, i)
            for r, segs in enumerate(rows)
            for i, seg in enumerate(segs)
            if seg["modality"] in MEDIA and seg["bytes"] is None and is_url(seg["uri"])
        ]
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        if not targets:
            return with_rejections(batch, reasons, details)
        pool = _Connections(self.timeout_s)

        def one(target: tuple[int, int]) -> dict[str, Any] | DownloadError:
            r, i = target
            try:
                return self._segment(rows[r][i], pool)
            except DownloadError as e:
                return e
            except Exception as e:  # noqa: BLE001 - one odd URL must not fail the other rows of the batch
                return DownloadError(REASON_FAILED, f"{type(e).__name__}: {e}"[:200])

        try:
            with ThreadPoolExecutor(min(self.concurrency, len(targets))) as threads:
                results = list(threads.map(one, targets))
        finally:
            pool.close()
        out: list[list[dict[str, Any]]] = [list(segs) for segs in rows]
        failed: dict[int, list[tuple[int, DownloadError]]] = {}
        for (r, i), got in zip(targets, results, strict=True):
            seg = rows[r][i]
            if isinstance(got, DownloadError):
                out[r][i] = {**seg, "meta": _dumps({**seg_meta(seg), "url": seg["uri"], "status": got.status})}
                failed.setdefault(r, []).append((i, got))
            else:
                out[r][i] = got
        metas = batch["meta"].to_pylist()
        for r, errors in failed.items():
            dropped = {i for i, _ in errors}
            kept = [seg for i, seg in enumerate(out[r]) if i not in dropped]
            if self.drop_failed and any(seg["modality"] in MEDIA for seg in kept):
                out[r] = kept
                record = [
                    _drop_none({"segment": i, "url": rows[r][i]["uri"], "reason": e.reason, "status": e.status})
                    for i, e in errors
                ]
                metas[r] = dumps_meta({**loads_meta(metas[r]), "download_failed": record})
            else:
                i, first = errors[0]
                reasons[r], details[r] = first.reason, f"{first.detail} ({rows[r][i]['uri']})"[:500]
        table = replace_samples(batch, out, metas=metas if self.drop_failed else None)
        return with_rejections(table, reasons, details)


def _wait_at_most(conn: http.client.HTTPConnection, deadline: float) -> None:
    """Socket timeout = what is left of the request's deadline, so redirects and slow bodies cannot stretch it."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    conn.timeout = left
    if conn.sock is not None:
        conn.sock.settimeout(left)


def _drop_none(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if v is not None}


def _dumps(meta: dict[str, Any]) -> str | None:
    return dumps_meta(_drop_none(meta))
