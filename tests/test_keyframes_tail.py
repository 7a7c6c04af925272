"""Keyframes cover the last partial second of a clip (issue 12).

The rule: the frame on screen at every t = k/fps inside the clip (0, 1, ..., ceil(d)-1 s at 1 fps),
thinned uniformly to ``max_frames`` keeping the last. ffmpeg's ``fps`` filter with ``round=near`` (the
old setting) took the frame from k + 0.5 s and dropped a last partial second of up to half a second:
a 2.4 s clip gave 2 frames, from 0.48 s and 1.48 s, and nothing of 1.5-2.4 s.
Each clip here is red and then blue for its last (partial) second, so a blue last frame proves the tail
is seen; the clips are 64x48 at 10 fps (every duration a whole number of frames) so the file runs in seconds.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipelines.operator import get_operator
from shards.schema import Segment, dumps_meta, loads_meta, make_sample, samples_table
from shards.tokens import PATCH_AREA, TokenRules, fit_pixels, segment_tokens, video_frame_count
from synth.avtools import BITEXACT, clip_frames
from synth.media import probe_file, sample_frames, spilled, summarize_probe

DURATIONS = [0.4, 1.0, 2.4, 3.0, 31.7, 40.0]
# What the old round=near rule gave (frame times as reported; the content came from ~0.48 s later).
BEFORE = {0.4: [0.0], 1.0: [0.0], 2.4: [0.0, 1.0], 3.0: [0.0, 1.0, 2.0]}


def tail_start(duration: float) -> float:
    """Where the clip's last (partial) second begins: the last 1 fps grid time inside it."""
    return float(math.ceil(round(duration, 6)) - 1)


def red_then_blue(duration: float, path: Path, red_s: float | None = None) -> bytes:
    """A Matroska MPEG-4 clip, red for ``red_s`` (default: until ``tail_start``) and blue after it.

    Written to a file, not a pipe: a piped Matroska has no duration, and token accounting needs one."""
    head = tail_start(duration) if red_s is None else red_s
    parts = [f"color=c=red:s=64x48:r=10:d={head}"] if head > 0 else []
    parts.append(f"color=c=blue:s=64x48:r=10:d={round(duration - head, 3)}")
    cmd = ["ffmpeg", "-nostdin", "-v", "error"]
    for p in parts:
        cmd += ["-f", "lavfi", "-i", p]
    cmd += ["-filter_complex", "".join(f"[{i}:v]" for i in range(len(parts))) + f"concat=n={len(parts)}:v=1[v]"]
    cmd += ["-map", "[v]", "-c:v", "mpeg4", "-q:v", "2", *BITEXACT, "-y", str(path)]
    subprocess.run(cmd, capture_output=True, check=True)
    return path.read_bytes()


def is_blue(frame: np.ndarray) -> bool:
    return float(frame[..., 2].mean()) > 128 > float(frame[..., 0].mean())


def expected_times(duration: float, max_frames: int = 32) -> list[float]:
    grid = np.arange(math.ceil(round(duration, 6)))
    if len(grid) > max_frames:
        grid = grid[np.linspace(0, len(grid) - 1, max_frames).round().astype(int)]
    return [float(t) for t in grid]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[float, bytes]:
    d = tmp_path_factory.mktemp("tail")
    return {s: red_then_blue(s, d / f"{s}.mkv") for s in DURATIONS}


@pytest.mark.parametrize("duration", DURATIONS)
def test_last_frame_is_from_the_tail_and_times_are_the_grid(clips: dict[float, bytes], duration: float) -> None:
    frames, times = clip_frames(clips[duration])
    assert list(times) == expected_times(duration)
    assert times[-1] == tail_start(duration) and is_blue(frames[-1])
    assert not any(is_blue(f) for f, t in zip(frames, times, strict=True) if t < tail_start(duration))
    if duration in BEFORE:  # the rule changed exactly where the old one lost the tail
        assert len(times) == len(BEFORE[duration]) + (duration == 2.4)
    pipeline_frames = sample_frames(clips[duration])
    assert np.array_equal(pipeline_frames, frames), "pipeline and trainer decode the same frames"


def test_token_accounting_counts_the_frames_sample_frames_returns(clips: dict[float, bytes]) -> None:
    rules = TokenRules()
    for duration, data in clips.items():
        with spilled(data) as path:
            info = summarize_probe(probe_file(path))
        assert info["duration"] == duration
        frames = sample_frames(data, max_pixels=rules.frame_max_pixels)
        assert len(frames) == video_frame_count(info["duration"]) == min(32, math.ceil(duration))
        meta = dumps_meta({k: info[k] for k in ("width", "height", "duration")})
        tokens = segment_tokens({"modality": "video", "meta": meta}, len, rules)
        w, h = fit_pixels(info["width"], info["height"], rules.frame_max_pixels, min_pixels=rules.image_min_pixels)
        assert frames.shape[1:3] == (h, w) and tokens == len(frames) * (w * h // PATCH_AREA) + 2


def test_a_clip_of_a_long_video_keeps_its_tail_and_whole_video_times(clips: dict[float, bytes]) -> None:
    """[32, 40) of the 40 s clip: its own grid, 32..39, in whole-video time; 39 is in the blue tail."""
    frames, times = clip_frames(clips[40.0], 32.0, 40.0)
    assert list(times) == [float(t) for t in range(32, 40)]
    assert is_blue(frames[-1]) and not any(is_blue(f) for f in frames[:-1])
    frames, times = clip_frames(clips[31.7], 30.0, None)  # an open-ended last clip: 30, 31 (31.0-31.7 blue)
    assert list(times) == [30.0, 31.0] and is_blue(frames[-1]) and not is_blue(frames[0])


def test_keyframes_operator_is_bit_exact_and_ends_in_the_tail(clips: dict[float, bytes]) -> None:
    sample = make_sample("t", "video", [Segment("video", bytes=clips[2.4])], locator="tail.mkv")
    table = get_operator("probe")()(samples_table([sample])).drop_columns(["reason", "detail"])
    runs = [get_operator("keyframes")()(table)["segments"].to_pylist()[0] for _ in range(2)]
    assert runs[0] == runs[1], "two runs write the same JPEG bytes"
    metas = [loads_meta(s["meta"]) for s in runs[0][1:]]
    assert [m["t"] for m in metas] == [0.0, 1.0, 2.0] and loads_meta(runs[0][0]["meta"])["keyframes"] == 3
    assert np.array_equal(clip_frames(clips[2.4])[0], clip_frames(clips[2.4])[0])


def test_a_frame_is_the_one_on_screen_at_its_time(tmp_path: Path) -> None:
    """Blue from 1.4 s: t=1 must be red. round=near labelled the frame from 1.48 s (blue) as t=1."""
    data = red_then_blue(3.0, tmp_path / "c.mkv", red_s=1.4)
    frames, times = clip_frames(data)
    assert list(times) == [0.0, 1.0, 2.0] and [is_blue(f) for f in frames] == [False, False, True]


def test_a_video_track_shorter_than_the_file_holds_its_last_frame(tmp_path: Path) -> None:
    """2 s of picture in a 3.4 s file (longer audio): accounting charges 4 frames, so 4 come back."""
    path = tmp_path / "av.mkv"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=blue:s=64x48:r=10:d=2"]
    cmd += ["-f", "lavfi", "-i", "sine=d=3.4", "-c:v", "mpeg4", "-c:a", "flac", *BITEXACT, "-y", str(path)]
    subprocess.run(cmd, capture_output=True, check=True)
    frames = sample_frames(path.read_bytes())
    assert len(frames) == video_frame_count(3.4) == 4 and np.array_equal(frames[3], frames[1])
