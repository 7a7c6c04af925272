"""ffmpeg work the content-creating operators share: batched audio decode, audio-track extraction,
timed keyframes of one clip, clip ranges for long videos, and WAV/FLAC encoding.

Every ffmpeg call runs under a timeout (``MediaError`` on expiry), as in ``synth.media``. Every
output that ends up in a shard is bit-exact (``BITEXACT``: no random Matroska UIDs, no library
version strings; swscale's exact C path for frames), so two runs write the same bytes.
ffmpeg's start-up costs ~0.15 s here, as much as whisper tiny needs for a short prompt, so audio is
decoded many files per process; a batch that fails is retried file by file to find the bad one.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
import wave
from collections.abc import Iterator, Sequence

import numpy as np

from synth.media import (
    _TMP_DIR,
    DEFAULT_TIMEOUT_S,
    MediaError,
    decode_audio,
    fit_grid,
    fit_pixels,
    grid_frames_stream,
    probe_file,
    summarize_probe,
    thin_index,
    tool_error,
)

ASR_SAMPLE_RATE = 16_000
MAX_INPUTS_PER_PROCESS = 32
# Output options for every file ffmpeg writes into a shard: muxers write no random ids (Matroska's
# segment and track UIDs), no creation time and no library version ("Lavf59.27.100" becomes "Lavf").
BITEXACT = ["-fflags", "+bitexact", "-flags:a", "+bitexact", "-flags:v", "+bitexact"]


@contextlib.contextmanager
def _scratch_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir=_TMP_DIR) as d:
        yield d


def _run(cmd: list[str], timeout_s: float, what: str = "media decode") -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise MediaError(f"{what} timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("undecodable media", tool_error(proc.stderr))
    return proc


def decode_audio_batch(
    items: Sequence[bytes], sample_rate: int = ASR_SAMPLE_RATE, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[np.ndarray | MediaError]:
    """``decode_audio`` for many files (audio, or a video's first audio track) with few ffmpeg processes.

    Returns one mono float32 array or one ``MediaError`` per item, in order."""
    out: list[np.ndarray | MediaError] = []
    for lo in range(0, len(items), MAX_INPUTS_PER_PROCESS):
        out.extend(_decode_group(items[lo : lo + MAX_INPUTS_PER_PROCESS], sample_rate, timeout_s))
    return out


def _decode_group(items: Sequence[bytes], sample_rate: int, timeout_s: float) -> list[np.ndarray | MediaError]:
    if len(items) == 1:
        return [_decode_one(items[0], sample_rate, timeout_s)]
    with _scratch_dir() as d:
        cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error"]
        outputs = []
        for i, data in enumerate(items):
            path = os.path.join(d, f"in{i}")
            with open(path, "wb") as f:
                f.write(data)
            cmd += ["-i", path]
        for i in range(len(items)):
            outputs.append(os.path.join(d, f"out{i}.f32"))
            cmd += ["-map", f"{i}:a:0", "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), outputs[-1]]
        try:
            _run(cmd, timeout_s)
        except MediaError:  # one bad (or hostile) file fails the process: find it file by file
            return [_decode_one(data, sample_rate, timeout_s) for data in items]
        return [np.fromfile(path, dtype=np.float32) for path in outputs]


def _decode_one(data: bytes, sample_rate: int, timeout_s: float) -> np.ndarray | MediaError:
    try:
        return decode_audio(data, sample_rate, timeout_s)
    except MediaError as e:
        return e


def extract_audio_track(data: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """A video's first audio track, stream-copied (not re-encoded) into a Matroska audio file.

    Bit-exact: without it the muxer draws random segment and track UIDs and every run differs."""
    with _scratch_dir() as d:
        src, dst = os.path.join(d, "in"), os.path.join(d, "audio.mka")
        with open(src, "wb") as f:
            f.write(data)
        cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", src, "-map", "0:a:0", "-c:a", "copy", *BITEXACT, dst]
        _run(cmd, timeout_s)
        with open(dst, "rb") as f:
            return f.read()


def clip_ranges(duration: float, clip_seconds: float | None) -> list[tuple[float, float]]:
    """[start, end) ranges that cover ``duration`` in clips of at most ``clip_seconds``.

    A short last piece (under a quarter clip) joins the clip before it, so no clip is a sliver."""
    if not clip_seconds or duration <= clip_seconds:
        return [(0.0, round(duration, 3))]
    n = int(np.ceil(duration / clip_seconds))
    if n > 1 and duration - (n - 1) * clip_seconds < clip_seconds / 4:
        n -= 1
    bounds = [min(i * clip_seconds, duration) for i in range(n)] + [duration]
    return [(round(a, 3), round(b, 3)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def clip_frames(
    data: bytes,
    start: float = 0.0,
    end: float | None = None,
    fps: float = 1.0,
    max_frames: int = 32,
    max_pixels: int = 602_112,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB frames ``[n, h, w, 3]``, their times in seconds) of ``[start, end)`` at ``fps``.

    Like ``synth.media.sample_frames`` (1 fps, at most ``max_frames``, each within ``max_pixels``)
    for one clip of a long video: the frame on screen at start + k/fps for every such time in the clip,
    its last partial second included, so clips of whole seconds tile the video's own 1 fps grid. The
    times say where each frame sits in the whole video."""
    with _scratch_dir() as d:
        path = os.path.join(d, "in")
        with open(path, "wb") as f:
            f.write(data)
        info = summarize_probe(probe_file(path, timeout_s))
        if "video_codec" not in info:
            raise MediaError("no video stream", str(info.get("container")))
        width, height = fit_pixels(int(info["width"]), int(info["height"]), max_pixels)
        seek = {"ss": start} if start else {}
        if end is not None:
            seek["t"] = max(end - start, 1.0 / fps)
        stop = end if end is not None else info.get("duration")
        span = None if stop is None else max(stop - start, 0.0)
        proc = _run(grid_frames_stream(path, width, height, fps, **seek).compile(), timeout_s)
    frames = np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, height, width, 3)
    if len(frames) == 0:
        raise MediaError("no frames decoded", f"clip {start}-{end}")
    frames = fit_grid(frames, span, fps)
    index = thin_index(len(frames), max_frames)
    return frames[index], np.round(start + index / fps, 3)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float32 in [-1, 1] → 16-bit PCM WAV (what every decoder reads, no ffmpeg needed)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def flac_bytes(samples: np.ndarray, sample_rate: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """Mono float32 → 16-bit FLAC (lossless, about half a WAV); bit-exact, so no ffmpeg version in it."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-i", "-"]
    cmd += ["-sample_fmt", "s16", *BITEXACT, "-f", "flac", "-"]
    try:
        proc = subprocess.run(
            cmd, input=np.ascontiguousarray(samples, "<f4").tobytes(), capture_output=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        raise MediaError("media encode timed out", f"{timeout_s}s") from e
    if proc.returncode != 0:
        raise MediaError("audio encode failed", tool_error(proc.stderr))
    return proc.stdout
