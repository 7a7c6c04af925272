"""``media_quality``: resolution, aspect ratio, duration, sample rate and silence as score columns.

Sizes and durations come from the segment metadata ``validate`` writes (no decoding twice), else
from the image header or ffprobe. Silence needs the samples: audio is decoded to 16 kHz mono and
cut into 50 ms frames; ``audio_silence`` is the fraction of frames quieter than
``silence_db`` dBFS. Per sample, the worst segment counts: the smallest image side, the most
extreme aspect ratio, the shortest clip, the lowest sample rate, the most silent clip.

Pair with ``keep`` (``preset: media``, or your own thresholds).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from filters.segments import put_column
from pipelines.operator import Operator, Resources, register
from shards.schema import loads_meta
from synth.media import DEFAULT_TIMEOUT_S, MediaError, decode_audio, probe_file, spilled, summarize_probe

COLUMNS = {
    "image_min_side": pa.int64(),
    "image_aspect": pa.float64(),
    "audio_duration": pa.float64(),
    "audio_sample_rate": pa.int64(),
    "audio_silence": pa.float64(),
    "video_duration": pa.float64(),
    "video_min_side": pa.int64(),
}
MEDIA_THRESHOLDS: list[dict[str, Any]] = [
    {"column": "image_min_side", "min": 64, "reason": "image too small"},
    {"column": "image_aspect", "max": 4.0, "reason": "extreme aspect ratio"},
    {"column": "audio_duration", "min": 0.5, "max": 3600, "reason": "audio duration out of range"},
    {"column": "audio_sample_rate", "min": 8000, "reason": "audio sample rate too low"},
    {"column": "audio_silence", "max": 0.9, "reason": "mostly silent audio"},
    {"column": "video_duration", "min": 0.5, "max": 7200, "reason": "video duration out of range"},
    {"column": "video_min_side", "min": 64, "reason": "video too small"},
]
FRAME_S = 0.05
ANALYSIS_RATE = 16_000


def image_size(data: bytes, meta: dict[str, Any]) -> tuple[int, int]:
    if meta.get("width") and meta.get("height"):
        return int(meta["width"]), int(meta["height"])
    return Image.open(io.BytesIO(data)).size  # header only


def stream_info(data: bytes, meta: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    if meta.get("duration"):
        return meta
    with spilled(data) as path:
        return summarize_probe(probe_file(path, timeout_s))


def silence_fraction(pcm: np.ndarray, silence_db: float, rate: int = ANALYSIS_RATE) -> float:
    frame = int(rate * FRAME_S)
    n = len(pcm) // frame
    if n == 0:
        return 1.0
    frames = pcm[: n * frame].reshape(n, frame).astype(np.float64)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    level_db = 20 * np.log10(np.maximum(rms, 1e-10))
    return float(np.mean(level_db < silence_db))


@register
class MediaQuality(Operator):
    """Score step: resolution, aspect ratio, duration, sample rate and silence of a sample's media.

    Params:
        silence: decode audio to measure its silent fraction (``audio_silence``).
        silence_db: a 50 ms frame quieter than this (dBFS) counts as silent.
        timeout_s: seconds per ffmpeg/ffprobe call.
        threads: media checked in parallel within a batch.
    """

    name = "media_quality"
    resources = Resources(cpus=1)

    def __init__(
        self, silence: bool = True, silence_db: float = -45.0, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 4
    ) -> None:
        super().__init__(silence=silence, silence_db=silence_db, timeout_s=timeout_s, threads=threads)
        self.silence = bool(silence)
        self.silence_db = float(silence_db)
        self.timeout_s = float(timeout_s)
        self.threads = int(threads)

    def _sample(self, segments: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def worst(name: str, value: Any, pick) -> None:
            if value is not None:
                out[name] = value if name not in out else pick(out[name], value)

        for seg in segments:
            data, meta = seg.get("bytes"), loads_meta(seg.get("meta"))
            if seg["modality"] == "text" or (data is None and not meta):
                continue
            try:
                if seg["modality"] == "image":
                    w, h = image_size(data, meta) if data is not None else (meta.get("width"), meta.get("height"))
                    if w and h:
                        worst("image_min_side", min(w, h), min)
                        worst("image_aspect", max(w, h) / max(min(w, h), 1), max)
                elif seg["modality"] == "audio":
                    info = stream_info(data, meta, self.timeout_s) if data is not None else meta
                    worst("audio_duration", info.get("duration"), min)
                    worst("audio_sample_rate", info.get("sample_rate"), min)
                    if self.silence and data is not None:
                        pcm = decode_audio(data, ANALYSIS_RATE, self.timeout_s)
                        worst("audio_silence", silence_fraction(pcm, self.silence_db), max)
                elif seg["modality"] == "video":
                    info = stream_info(data, meta, self.timeout_s) if data is not None else meta
                    worst("video_duration", info.get("duration"), min)
                    if info.get("width") and info.get("height"):
                        worst("video_min_side", min(info["width"], info["height"]), min)
            except (MediaError, OSError, ValueError, Image.DecompressionBombError):
                continue  # unreadable media is validate's business; the score stays null
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(self._sample, rows))
        for name, type_ in COLUMNS.items():
            batch = put_column(batch, name, pa.array([r.get(name) for r in results], type_))
        return batch

    def score_columns(self) -> list[str]:
        return list(COLUMNS)
