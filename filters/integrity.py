"""``validate``: decode every inline media segment and reject what cannot be used.

Images are opened header-first so a decompression bomb is rejected by its pixel count before a
single pixel is decoded; then fully decoded (truncation shows only there). Audio is probed and
decoded, video probed and its first seconds decoded, each ffmpeg call under a timeout. What the
checks learn (size, duration, codecs, sample rate) is kept in the segment's metadata.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from PIL import Image

from pipelines.operator import Operator, Resources, register, with_rejections
from shards.schema import dumps_meta, loads_meta, with_segment_meta
from synth.media import DEFAULT_TIMEOUT_S, MediaError, check_audio, check_video

DEFAULT_MAX_PIXELS = 64_000_000


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise MediaError("image exceeds pixel limit", str(e)[:200]) from e
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise MediaError("undecodable image", f"{type(e).__name__}: {e}"[:300]) from e
        width, height = im.size
        if width * height > max_pixels:
            raise MediaError("image exceeds pixel limit", f"{width}x{height} > {max_pixels}")
        if width == 0 or height == 0:
            raise MediaError("undecodable image", f"{width}x{height}")
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            raise MediaError("undecodable image", f"{type(e).__name__}: {e}"[:300]) from e
    return {"width": width, "height": height, "format": (im.format or "").lower(), "mode": im.mode}


@register
class Validate(Operator):
    """Decodes every media segment's header and rejects empty, undecodable or oversized media; records
    sizes and durations in the segment meta.

    Params:
        max_pixels: an image with more pixels is rejected (decompression-bomb limit).
        timeout_s: seconds per ffmpeg/ffprobe call.
        threads: checks in parallel within a batch (ffmpeg and PIL release the GIL).
    """

    name = "validate"
    resources = Resources(cpus=1)

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 4):
        super().__init__(max_pixels=max_pixels, timeout_s=timeout_s, threads=threads)
        self.max_pixels = int(max_pixels)
        self.timeout_s = float(timeout_s)
        self.threads = int(threads)

    def _check_segment(self, seg: dict[str, Any]) -> dict[str, Any]:
        modality, data = seg["modality"], seg["bytes"]
        if modality == "text":
            if seg["text"] is None or not seg["text"].strip():
                raise MediaError("empty text")
            return {}
        if data is None:
            if not seg["uri"]:
                raise MediaError("segment has no payload", modality)
            return {}  # large media by reference: checked where it is decoded
        if len(data) == 0:
            raise MediaError("empty file", modality)
        if modality == "image":
            return check_image(data, self.max_pixels)
        if modality == "audio":
            return check_audio(data, self.timeout_s)
        return check_video(data, self.timeout_s)

    def _check_sample(self, segments: list[dict[str, Any]]) -> tuple[list[str | None], str | None, str | None]:
        metas = []
        for seg in segments:
            try:
                found = self._check_segment(seg)
            except MediaError as e:
                return [], e.reason, f"{seg['modality']}: {e.detail}"[:500]
            metas.append(dumps_meta({**loads_meta(seg["meta"]), **found}))
        if not segments:
            return [], "empty sample", None
        return metas, None, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        # Only media is worth a thread: a text-only row checks in microseconds, less than a hand-off.
        media = [i for i, segs in enumerate(rows) if any(s["modality"] != "text" for s in segs)]
        results: list[Any] = [None] * len(rows)
        if media:
            with ThreadPoolExecutor(min(self.threads, len(media))) as pool:
                for i, found in zip(media, pool.map(self._check_sample, [rows[i] for i in media]), strict=True):
                    results[i] = found
        for i, found in enumerate(results):
            if found is None:
                results[i] = self._check_sample(rows[i])
        metas: list[str | None] = []
        for segs, (found, reason, _) in zip(rows, results, strict=True):
            metas.extend(found if reason is None else [s["meta"] for s in segs])
        batch = with_segment_meta(batch, metas)
        return with_rejections(batch, [r[1] for r in results], [r[2] for r in results])
