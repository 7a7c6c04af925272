"""Media operators: ``probe``, ``normalize_audio``, ``keyframes``. Each is 1:1 over rows.

Long videos are split into clips as *time ranges* in the video segment's metadata (``clips``),
not as re-encoded files: a cut is exact without re-encoding, the source bytes stay as they were, and
the row stays one sample. ``keyframes`` samples every clip at 1 fps (at most 32 frames per clip,
the paper's frame budget), so a long video keeps its 1 fps instead of being thinned to 32 frames.

ASR input: ``transcribe`` decodes any audio to 16 kHz mono in memory (transient), so shards keep
only the original bytes. ``normalize_audio`` is for corpora that should *ship* the ASR-ready copy
too: it adds a 16 kHz mono segment (``role: asr_input``) right after each source audio segment and
keeps the original; ``transcribe`` then reads that copy, and builders drop it unless told to keep it.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from PIL import Image

from pipelines.operator import Operator, Resources, register, with_rejections
from shards import storage
from shards.schema import dumps_meta, loads_meta, with_segment_meta
from synth.avtools import ASR_SAMPLE_RATE, clip_frames, clip_ranges, decode_audio_batch, flac_bytes, wav_bytes
from synth.media import DEFAULT_TIMEOUT_S, MediaError, probe_file, spilled, summarize_probe
from synth.rows import is_source_media, make_segment, replace_samples, seg_meta

DEFAULT_CLIP_SECONDS = 32.0  # at 1 fps a clip then fits the paper's 32-frame budget exactly
FRAME_PIXELS = 602_112  # the paper's per-frame pixel budget (config.json video max_pixels)


def media_bytes(seg: dict[str, Any]) -> bytes:
    """A media segment's payload: inline bytes, or read from its URI (local path or s3://)."""
    if seg["bytes"] is not None:
        return seg["bytes"]
    if seg["uri"]:
        return storage.read_bytes(seg["uri"])
    raise MediaError("segment has no payload", seg["modality"])


def probe_segment(seg: dict[str, Any], timeout_s: float, clip_seconds: float | None) -> dict[str, Any]:
    """What the pipeline needs to know about one media segment, without decoding it."""
    data = media_bytes(seg)
    if seg["modality"] == "image":
        try:
            with Image.open(io.BytesIO(data)) as im:
                return {"width": im.width, "height": im.height, "format": (im.format or "").lower()}
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
            raise MediaError("undecodable image", f"{type(e).__name__}: {e}"[:300]) from e
    with spilled(data) as path:
        info = summarize_probe(probe_file(path, timeout_s))
    want = "audio_codec" if seg["modality"] == "audio" else "video_codec"
    if want not in info:
        raise MediaError(f"no {seg['modality']} stream", str(info.get("container")))
    if seg["modality"] == "video":
        info["has_audio"] = "audio_codec" in info
        if info.get("duration") and clip_seconds and info["duration"] > clip_seconds:
            info["clips"] = [list(r) for r in clip_ranges(info["duration"], clip_seconds)]
    return info


@register
class Probe(Operator):
    """Probes audio and video segments with ffprobe: duration, streams, sample rate, size, into segment meta.

    Params:
        timeout_s: seconds per ffprobe call.
        threads: media probed in parallel within a batch.
        clip_seconds: videos longer than this get ``clips`` time ranges; null disables splitting.
    """

    name = "probe"
    resources = Resources(cpus=1)

    def __init__(
        self, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 4, clip_seconds: float | None = DEFAULT_CLIP_SECONDS
    ) -> None:
        super().__init__(timeout_s=timeout_s, threads=threads, clip_seconds=clip_seconds)
        self.timeout_s, self.threads = float(timeout_s), int(threads)
        self.clip_seconds = float(clip_seconds) if clip_seconds else None

    def _sample(self, segments: list[dict[str, Any]]) -> tuple[list[str | None], str | None, str | None]:
        metas = []
        for i, seg in enumerate(segments):
            if seg["modality"] == "text" or "role" in seg_meta(seg):
                metas.append(seg["meta"])
                continue
            try:
                found = probe_segment(seg, self.timeout_s, self.clip_seconds)
            except MediaError as e:
                return [s["meta"] for s in segments], e.reason, f"segment {i} ({seg['modality']}): {e.detail}"[:500]
            metas.append(dumps_meta({**seg_meta(seg), **found}))
        return metas, None, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(self._sample, rows))
        batch = with_segment_meta(batch, [m for metas, _, _ in results for m in metas])
        return with_rejections(batch, [r for _, r, _ in results], [d for _, _, d in results])


@register
class NormalizeAudio(Operator):
    """Adds a 16 kHz mono copy (``role: asr_input``) after every source audio segment; the original stays.

    Params:
        format: the copy's container, ``wav`` or ``flac``.
        timeout_s: seconds per ffmpeg call.
    """

    name = "normalize_audio"
    resources = Resources(cpus=1)

    def __init__(self, format: str = "wav", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:  # noqa: A002
        super().__init__(format=format, timeout_s=timeout_s)
        if format not in ("wav", "flac"):
            raise ValueError(f"normalize_audio format must be wav or flac, not {format!r}")
        self.format, self.timeout_s = format, float(timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        targets = [
            (r, i)
            for r, segs in enumerate(rows)
            for i, seg in enumerate(segs)
            if is_source_media(seg, "audio") and not _has_copy(segs, i)
        ]
        decoded = decode_audio_batch([media_bytes(rows[r][i]) for r, i in targets], ASR_SAMPLE_RATE, self.timeout_s)
        copies: dict[tuple[int, int], dict[str, Any]] = {}
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        for (r, i), audio in zip(targets, decoded, strict=True):
            if isinstance(audio, MediaError):
                reasons[r], details[r] = audio.reason, f"segment {i}: {audio.detail}"[:500]
                continue
            encode = flac_bytes if self.format == "flac" else wav_bytes
            data = encode(audio, ASR_SAMPLE_RATE)
            meta = {"role": "asr_input", "ext": self.format, "sample_rate": ASR_SAMPLE_RATE, "channels": 1}
            copies[(r, i)] = make_segment("audio", data=data, meta={**meta, "duration": round(len(audio) / 16e3, 3)})
        out = []
        for r, segs in enumerate(rows):
            new: list[dict[str, Any]] = []
            for i, seg in enumerate(segs):
                new.append(seg)
                if (r, i) in copies and reasons[r] is None:
                    new.append(copies[(r, i)])
            out.append(new)
        return with_rejections(replace_samples(batch, out), reasons, details)


def _has_copy(segments: list[dict[str, Any]], i: int) -> bool:
    return i + 1 < len(segments) and seg_meta(segments[i + 1]).get("role") == "asr_input"


def jpeg(frame: Any, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@register
class Keyframes(Operator):
    """Adds each source video's keyframes as image segments (``role: keyframe``, ``t``, ``clip``) after it.

    Clips come from ``probe``'s ``clips``; without them the whole video is one clip. A keyframe's ``t``
    is when it is on screen: t = 0, 1, ... up to the clip's last partial second (``clip_frames``), the
    frames ``count_tokens`` charges for the video.

    Params:
        fps: keyframes per second of video.
        max_frames: at most this many keyframes per clip.
        max_pixels: a larger frame is scaled down to this many pixels.
        jpeg_quality: JPEG quality of the stored keyframes.
        timeout_s: seconds per ffmpeg call.
        threads: videos decoded in parallel within a batch.
    """

    name = "keyframes"
    resources = Resources(cpus=1)

    def __init__(
        self,
        fps: float = 1.0,
        max_frames: int = 32,
        max_pixels: int = FRAME_PIXELS,
        jpeg_quality: int = 90,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        threads: int = 2,
    ) -> None:
        super().__init__(
            fps=fps,
            max_frames=max_frames,
            max_pixels=max_pixels,
            jpeg_quality=jpeg_quality,
            timeout_s=timeout_s,
            threads=threads,
        )
        self.fps, self.max_frames, self.max_pixels = float(fps), int(max_frames), int(max_pixels)
        self.jpeg_quality, self.timeout_s, self.threads = int(jpeg_quality), float(timeout_s), int(threads)

    def _video(self, seg: dict[str, Any]) -> list[dict[str, Any]]:
        meta = seg_meta(seg)
        clips = meta.get("clips") or [[0.0, None]]
        data = media_bytes(seg)
        out = []
        for c, (start, end) in enumerate(clips):
            frames, times = clip_frames(data, start, end, self.fps, self.max_frames, self.max_pixels, self.timeout_s)
            for frame, t in zip(frames, times, strict=True):
                h, w = frame.shape[:2]
                info = {"role": "keyframe", "t": float(t), "clip": c, "width": w, "height": h, "ext": "jpg"}
                out.append(make_segment("image", data=jpeg(frame, self.jpeg_quality), meta=info))
        return out

    def _sample(self, segments: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None, str | None]:
        if any(seg_meta(s).get("role") == "keyframe" for s in segments):
            return segments, None, None  # already done (a re-run, or a source that ships frames)
        out: list[dict[str, Any]] = []
        for i, seg in enumerate(segments):
            out.append(seg)
            if is_source_media(seg, "video"):
                try:
                    frames = self._video(seg)
                except MediaError as e:
                    return segments, e.reason, f"segment {i} (video): {e.detail}"[:500]
                out.extend(frames)
                out[-len(frames) - 1] = {
                    **seg,
                    "meta": dumps_meta({**loads_meta(seg["meta"]), "keyframes": len(frames)}),
                }
        return out, None, None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch["segments"].to_pylist()
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(self._sample, rows))
        batch = replace_samples(batch, [segs for segs, _, _ in results])
        return with_rejections(batch, [r for _, r, _ in results], [d for _, _, d in results])
