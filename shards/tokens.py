"""How many positions each segment takes in the model it trains (docs/PAPER.md sections 5-6).

- text: the LLM tokenizer's ids.
- image: Qwen2-VL ``smart_resize`` to 28-px multiples within the pixel cap, then one token per
  28×28 area (14-px patches merged 2×2); plus start and end markers.
- video: frames at 1 fps (t = 0, 1, ... up to the last partial second), at most 32, each an image
  within the per-frame cap; plus start/end.
- audio: 12.5 tokens per second (Whisper's 100 Hz mel, conv stride 2, 4× pooling); plus start/end.

The caps follow the released config (``max_pixels`` 3,211,264 per image, 602,112 per video frame);
docs/PAPER.md notes the model card's smaller 1.8 MP figure, so both are parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shards.schema import loads_meta


def fit_pixels(
    width: int, height: int, max_pixels: int, multiple: int = 28, min_pixels: int = 56 * 56
) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize``: sides snapped to ``multiple`` (14-px patches merged 2×2), aspect
    ratio kept, area within [min_pixels, max_pixels]. Token accounting uses the same rule."""
    h = max(multiple, round(height / multiple) * multiple)
    w = max(multiple, round(width / multiple) * multiple)
    if h * w > max_pixels:
        beta = ((height * width) / max_pixels) ** 0.5
        h = max(multiple, math.floor(height / beta / multiple) * multiple)
        w = max(multiple, math.floor(width / beta / multiple) * multiple)
    elif h * w < min_pixels:
        beta = (min_pixels / (height * width)) ** 0.5
        h = math.ceil(height * beta / multiple) * multiple
        w = math.ceil(width * beta / multiple) * multiple
    return w, h


def grid_frame_count(duration: float, fps: float = 1.0) -> int:
    """Frames on the ``fps`` grid of a clip: one at every t = k/fps inside it (0, 1, ..., ceil(d·fps)-1 s),
    so a last partial second has its frame and every instant is less than 1/fps after one (at least 1).
    The product is rounded first: 0.3 s at 10 fps is 3 steps, not ``ceil(3.0000000000000004)``."""
    return max(1, math.ceil(round(duration * fps, 6)))


def video_frame_count(duration: float, fps: float = 1.0, max_frames: int = 32) -> int:
    """How many frames ``sample_frames`` (and each clip in ``clip_frames``) returns for ``duration``
    seconds: the grid's frames, uniformly thinned to ``max_frames``. Counted here, decoded there."""
    return min(max_frames, grid_frame_count(duration, fps))


MARKERS = 2  # <x_start> ... <x_end> around every media segment
PATCH_AREA = 28 * 28
AUDIO_TOKENS_PER_SECOND = 12.5


@dataclass(frozen=True)
class TokenRules:
    image_max_pixels: int = 3_211_264
    image_min_pixels: int = 3_136
    frame_max_pixels: int = 602_112
    video_fps: float = 1.0
    video_max_frames: int = 32
    audio_tokens_per_second: float = AUDIO_TOKENS_PER_SECOND

    def image(self, width: int, height: int) -> int:
        w, h = fit_pixels(width, height, self.image_max_pixels, min_pixels=self.image_min_pixels)
        return w * h // PATCH_AREA + MARKERS

    def video(self, width: int, height: int, duration: float) -> int:
        w, h = fit_pixels(width, height, self.frame_max_pixels, min_pixels=self.image_min_pixels)
        frames = video_frame_count(duration, self.video_fps, self.video_max_frames)
        return frames * (w * h // PATCH_AREA) + MARKERS

    def audio(self, duration: float) -> int:
        return math.ceil(duration * self.audio_tokens_per_second) + MARKERS


class MissingMediaFacts(ValueError):
    """A media segment without the probed size/duration its count needs (run ``validate`` first)."""


def segment_tokens(seg: Mapping[str, Any], count_text: Callable[[str], int], rules: TokenRules) -> int:
    meta = loads_meta(seg.get("meta"))
    modality = seg["modality"]
    try:
        if modality == "text":
            return count_text(seg["text"] or "")
        if modality == "image":
            return rules.image(int(meta["width"]), int(meta["height"]))
        if modality == "video":
            return rules.video(int(meta["width"]), int(meta["height"]), float(meta["duration"]))
        return rules.audio(float(meta["duration"]))
    except KeyError as e:
        raise MissingMediaFacts(f"{modality} segment has no {e.args[0]} in its meta") from e
