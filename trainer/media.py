"""Media bytes → model inputs, in the data-loader workers: image patches, video frames, log-mel chunks.

Images are resized with ``synth.media.fit_pixels`` to multiples of 28 px and patchified by
transformers' Qwen2-VL image processor (14-px patches, 2 temporal copies, 2×2 merge order), so the
vision encoder sees exactly what Qwen2-VL's does. Video is frames at 1 fps through the same path.
Audio is decoded to 16 kHz mono by ffmpeg and turned into Whisper log-mel chunks of at most
``chunk_seconds`` each; the number of 12.5 Hz frames a clip becomes is ``audio_frame_count``, which
the model's audio tokenizer reproduces exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from synth.media import MediaError, decode_audio, fit_pixels, sample_frames
from trainer import hf_compat  # noqa: F401  (before transformers)


@dataclass
class VisionSpec:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = 3136
    image_max_pixels: int = 3_211_264
    video_fps: float = 1.0
    video_max_frames: int = 32
    video_max_pixels: int = 602_112

    @classmethod
    def from_model_config(cls, cfg: dict[str, Any]) -> VisionSpec:
        v = cfg["vision"]
        enc = v["config"]
        video = v.get("video", {})
        return cls(
            patch_size=enc.get("patch_size", 14),
            temporal_patch_size=enc.get("temporal_patch_size", 2),
            merge_size=enc.get("spatial_merge_size", 2),
            image_min_pixels=v.get("image_min_pixels", 3136),
            image_max_pixels=v.get("image_max_pixels", 3_211_264),
            video_fps=video.get("fps", 1.0),
            video_max_frames=video.get("max_frames", 32),
            video_max_pixels=video.get("max_pixels", 602_112),
        )


@dataclass
class AudioSpec:
    sample_rate: int = 16_000
    n_mels: int = 128
    hop_length: int = 160
    n_fft: int = 400
    chunk_seconds: int = 30
    downsample: int = 4

    @classmethod
    def from_model_config(cls, cfg: dict[str, Any]) -> AudioSpec:
        a = cfg["audio"]
        return cls(
            sample_rate=a.get("sample_rate", 16_000),
            n_mels=a["encoder"].get("num_mel_bins", 128),
            hop_length=a.get("hop_length", 160),
            n_fft=a.get("n_fft", 400),
            chunk_seconds=a.get("chunk_seconds", 30),
            downsample=a.get("downsample", 4),
        )


def mel_frames(num_samples: int, hop_length: int) -> int:
    """Whisper's feature extractor keeps ``num_samples // hop`` frames."""
    return num_samples // hop_length


def frames_after_encoder(mel: int, downsample: int) -> int:
    """Whisper's stride-2 conv (50 Hz), then the bridge's stride-``downsample`` conv over a zero-padded tail."""
    encoded = (mel + 1) // 2
    return (encoded + downsample - 1) // downsample


def audio_frame_count(num_samples: int, spec: AudioSpec) -> int:
    """12.5 Hz frames (LLM positions) for a clip, summed over its chunks."""
    chunk = spec.chunk_seconds * spec.sample_rate
    total = 0
    for start in range(0, num_samples, chunk):
        total += frames_after_encoder(mel_frames(min(chunk, num_samples - start), spec.hop_length), spec.downsample)
    return total


@dataclass
class AudioClip:
    """Log-mel chunks of one clip, the frames it occupies, and whether the audio head learns it."""

    mels: list[np.ndarray]
    frames: int
    generate: bool = False


@dataclass
class ImageInput:
    """Patches in Qwen2-VL order and their ``(t, h, w)`` grid; ``tokens`` LLM positions after 2×2 merge."""

    patches: np.ndarray
    grid: tuple[int, int, int]
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        t, h, w = self.grid
        self.tokens = t * h * w // 4


class MediaProcessor:
    """Featurizers built from explicit parameters (nothing is downloaded); one per loader worker."""

    def __init__(self, vision: VisionSpec, audio: AudioSpec) -> None:
        from transformers import Qwen2VLImageProcessor, WhisperFeatureExtractor

        self.vision = vision
        self.audio = audio
        self.image_processor = Qwen2VLImageProcessor(
            min_pixels=vision.image_min_pixels,
            max_pixels=max(vision.image_max_pixels, vision.video_max_pixels),
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.merge_size,
        )
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=audio.n_mels,
            sampling_rate=audio.sample_rate,
            hop_length=audio.hop_length,
            chunk_length=audio.chunk_seconds,
            n_fft=audio.n_fft,
        )

    @classmethod
    def from_model_config(cls, cfg: dict[str, Any]) -> MediaProcessor:
        return cls(VisionSpec.from_model_config(cfg), AudioSpec.from_model_config(cfg))

    def _patchify(self, frames: list[Image.Image]) -> list[ImageInput]:
        out = self.image_processor(images=frames, return_tensors="np")
        grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
        sizes = np.cumsum([0] + [t * h * w for t, h, w in grids])
        pv = out["pixel_values"].astype(np.float32, copy=False)
        return [ImageInput(pv[sizes[i] : sizes[i + 1]], grids[i]) for i in range(len(grids))]

    def image(self, data: bytes) -> ImageInput:
        try:
            im = Image.open(io.BytesIO(data))
            im = im.convert("RGB")
        except Exception as e:  # PIL raises many types for broken files
            raise MediaError("undecodable image", str(e)[:200]) from e
        w, h = fit_pixels(im.width, im.height, self.vision.image_max_pixels)
        if (w, h) != im.size:
            im = im.resize((w, h), Image.BICUBIC)
        return self._patchify([im])[0]

    def video(self, data: bytes) -> list[ImageInput]:
        frames = sample_frames(
            data,
            fps=self.vision.video_fps,
            max_frames=self.vision.video_max_frames,
            max_pixels=self.vision.video_max_pixels,
        )
        return self._patchify([Image.fromarray(f) for f in frames])

    def audio_clip(self, data: bytes, generate: bool = False) -> AudioClip:
        return self.waveform_clip(decode_audio(data, self.audio.sample_rate), generate)

    def waveform_clip(self, wave: np.ndarray, generate: bool = False) -> AudioClip:
        spec = self.audio
        if len(wave) < spec.hop_length * 2:
            raise MediaError("audio too short", f"{len(wave)} samples")
        chunk = spec.chunk_seconds * spec.sample_rate
        pieces = [wave[i : i + chunk] for i in range(0, len(wave), chunk)]
        pieces = [p for p in pieces if len(p) >= spec.hop_length * 2] or pieces[:1]
        mels = []
        for piece in pieces:
            feats = self.feature_extractor(
                piece, sampling_rate=spec.sample_rate, padding="longest", return_tensors="np"
            )["input_features"][0]
            mels.append(feats[:, : mel_frames(len(piece), spec.hop_length)].astype(np.float32, copy=False))
        frames = sum(frames_after_encoder(m.shape[1], spec.downsample) for m in mels)
        return AudioClip(mels, frames, generate)
