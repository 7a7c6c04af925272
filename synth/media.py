"""Probe and check media with ffmpeg/ffprobe (through ffmpeg-python), with a timeout on every call.

Bytes are spilled to a temporary file because MP4s with the index at the end cannot be probed from
a pipe. A hostile file can make ffmpeg spin; the timeout turns that into a reject, not a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import ffmpeg
import numpy as np

from shards.tokens import fit_pixels, grid_frame_count, video_frame_count  # noqa: F401 - frame rules live with token rules

DEFAULT_TIMEOUT_S = 30.0
_TMP_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
# Names ``tempfile`` makes (``tmp`` + 8 random characters) under the directories it uses here.
_TMP_NAME = re.compile(
    "(?:" + "|".join(re.escape(d.rstrip("/")) for d in sorted({"/dev/shm", tempfile.gettempdir()})) + ")"
    r"/tmp[a-z0-9_]{8}"
)
# swscale flags for every frame we take from a video: the C code path, so frames (and the keyframe
# JPEGs written from them) are the same bytes on every CPU, not only on this one.
SCALE_FLAGS = "bicubic+accurate_rnd+bitexact"


def scrub_tmp_paths(text: str) -> str:
    """``text`` with temporary file names replaced by ``<tmp>``: ffmpeg quotes its input path in
    errors, and a random name in a reject detail would make two runs write different ledgers."""
    return _TMP_NAME.sub("<tmp>", text)


def tool_error(stderr: bytes, limit: int = 300) -> str:
    """The tail of a tool's stderr for a reject detail, scrubbed before it is cut (a cut name cannot be)."""
    return scrub_tmp_paths(stderr.decode("utf-8", "replace").strip())[-limit:]


class MediaError(ValueError):
    """Media that cannot be used; ``reason`` is the short reject reason, ``detail`` goes to the ledger
    (with temporary file names scrubbed, so it is the same in every run)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        detail = scrub_tmp_paths(detail)
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def spilled(data: bytes, suffix: str = "") -> Iterator[str]:
    fd, path = tempfile.mkstemp(suffix=suffix, dir=_TMP_DIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path
    finally:
        os.unlink(path)


def probe_file(path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    # ffmpeg-python 0.2's probe() has no timeout: its kwargs become ffprobe flags (``-timeout`` is a
    # network option in microseconds) and it waits forever, so ffprobe runs here under a real timeout.
    cmd = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise MediaError("media probe timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("unreadable media", tool_error(proc.stderr))
    try:
        return json.loads(proc.stdout.decode("utf-8", "replace"))
    except json.JSONDecodeError as e:
        raise MediaError("unreadable media", f"ffprobe output: {e}") from e


def summarize_probe(info: dict[str, Any]) -> dict[str, Any]:
    """The fields the pipeline and the token accounting need from ffprobe's answer."""
    fmt = info.get("format", {})
    out: dict[str, Any] = {"container": fmt.get("format_name")}
    if fmt.get("duration") not in (None, "N/A"):
        out["duration"] = round(float(fmt["duration"]), 3)
    for s in info.get("streams", []):
        if s.get("codec_type") == "video" and "video_codec" not in out:
            out.update(video_codec=s.get("codec_name"), width=s.get("width"), height=s.get("height"))
            rate = s.get("avg_frame_rate") or "0/0"
            num, _, den = rate.partition("/")
            if den and float(den):
                out["fps"] = round(float(num) / float(den), 3)
        elif s.get("codec_type") == "audio" and "audio_codec" not in out:
            out.update(
                audio_codec=s.get("codec_name"),
                sample_rate=int(s.get("sample_rate", 0) or 0),
                channels=s.get("channels"),
            )
    return out


def decode_check(path: str, args: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Decode (part of) the file to nowhere; ffmpeg's first error becomes a MediaError."""
    stream = ffmpeg.input(path).output("-", format="null", **args).global_args("-xerror", "-v", "error")
    try:
        proc = subprocess.run(stream.compile(), capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise MediaError("media decode timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("undecodable media", tool_error(proc.stderr))


def check_audio(data: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Probe + full decode of an audio clip; returns its summary or raises MediaError."""
    with spilled(data) as path:
        info = summarize_probe(probe_file(path, timeout_s))
        if "audio_codec" not in info:
            raise MediaError("no audio stream", str(info.get("container")))
        if not info.get("duration"):
            raise MediaError("zero-length audio")
        decode_check(path, {"map": "0:a:0"}, timeout_s)
    return info


def check_video(data: bytes, timeout_s: float = DEFAULT_TIMEOUT_S, decode_seconds: float = 2.0) -> dict[str, Any]:
    """Probe a video and decode its first seconds (a full decode is the enrichment stage's job)."""
    with spilled(data) as path:
        info = summarize_probe(probe_file(path, timeout_s))
        if "video_codec" not in info:
            raise MediaError("no video stream", str(info.get("container")))
        if not info.get("duration"):
            raise MediaError("zero-length video")
        decode_check(path, {"map": "0:v:0", "t": decode_seconds}, timeout_s)
    return info


def decode_audio(data: bytes, sample_rate: int = 16_000, timeout_s: float = DEFAULT_TIMEOUT_S) -> np.ndarray:
    """Any audio (or a video's first audio track) → mono float32 PCM at ``sample_rate``."""
    with spilled(data) as path:
        stream = ffmpeg.input(path).output("-", format="f32le", acodec="pcm_f32le", ac=1, ar=sample_rate, map="0:a:0")
        try:
            proc = subprocess.run(
                stream.global_args("-v", "error").compile(), capture_output=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise MediaError("media decode timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("undecodable media", tool_error(proc.stderr))
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def grid_frames_stream(path: str, width: int, height: int, fps: float, **seek: float) -> Any:
    """ffmpeg graph for the frame on screen at every t = k/fps (``round=up``: a frame's time rounds up
    onto the grid, so t=k gets the last frame shown at or before k). ``round=near`` took the frame from
    k + 0.5/fps and dropped a last partial second of up to half a step; frames keep the exact IDCTs."""
    return (
        ffmpeg.input(path, flags="+bitexact", **seek)  # decoders' exact IDCTs (MPEG-4, MJPEG)
        .filter("fps", fps=fps, start_time=0, round="up")
        .filter("scale", width, height, flags=SCALE_FLAGS)
        .output("-", format="rawvideo", pix_fmt="rgb24")
        .global_args("-nostdin", "-v", "error")
    )


def fit_grid(frames: np.ndarray, span: float | None, fps: float) -> np.ndarray:
    """``frames`` cut or held to ``grid_frame_count(span)``, the count token accounting charges.

    ffmpeg ends the grid where the video stream ends; the probed duration (the container's, rounded to
    ms) can differ by a step. Past the stream's end its last frame stays on screen, so it is repeated."""
    if span is None or len(frames) == 0:
        return frames
    n = grid_frame_count(span, fps)
    if len(frames) < n:
        return np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
    return frames[:n]


def thin_index(n: int, max_frames: int) -> np.ndarray:
    """Indices of at most ``max_frames`` of ``n`` grid frames, uniform and keeping the first and the last."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(int)


def sample_frames(
    data: bytes,
    fps: float = 1.0,
    max_frames: int = 32,
    max_pixels: int = 602_112,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Frames at ``fps`` (uniformly thinned to ``max_frames``) as uint8 RGB ``[n, h, w, 3]``.

    Defaults follow the paper: 1 fps, at most 32 frames, each within the per-frame pixel budget. The
    frames are those on screen at t = 0, 1, ..., ceil(d)-1 s, so the last partial second is seen and
    ``n == video_frame_count(duration)``, what ``count_tokens`` charged for this video."""
    with spilled(data) as path:
        info = summarize_probe(probe_file(path, timeout_s))
        if "video_codec" not in info:
            raise MediaError("no video stream", str(info.get("container")))
        width, height = fit_pixels(int(info["width"]), int(info["height"]), max_pixels)
        stream = grid_frames_stream(path, width, height, fps)
        try:
            proc = subprocess.run(stream.compile(), capture_output=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise MediaError("media decode timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("undecodable media", tool_error(proc.stderr))
    frames = np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, height, width, 3)
    if len(frames) == 0:
        raise MediaError("no frames decoded", "video shorter than its first frame interval")
    frames = fit_grid(frames, info.get("duration"), fps)
    return frames[thin_index(len(frames), max_frames)]
