"""One Sample → one token sequence with modality placeholders and a loss mask, per the paper's data types.

Images become ``<img_start> <img_pad>×N <img_end>`` (N = merged 2×2 patches), video
``<video_start>`` + one image span per frame + ``<video_end>``, audio input
``<audio_start> <audio_pad>×N <audio_end>`` and audio to generate
``<audiogen_start> <audio_pad>×N <audiogen_end>`` (N = 12.5 Hz frames). Media spans never carry text
loss. Which text carries loss depends on the data type (docs/PAPER.md §2.3, §3; [A] §3.3.1): ASR and INTLV
learn the text, TTS and pure audio learn the audio (audio head), ITTS learns audio and every text
segment but the first, captions/interleaved/video/omni data learn their text.

ITTS is built from the same speech-text interleaved samples as INTLV, as the paper defines it: each
spoken segment is preceded by its own words (``meta.tts.text`` or ``meta.asr.text``), so the
sequence reads text_1, audio_1, text_2, ... and the audio head learns to speak the text just read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.confine import Confined, UriPolicy, confine_local
from synth.media import MediaError
from trainer.media import AudioClip, ImageInput, MediaProcessor
from trainer.model import TAGS
from trainer.tokenizer import SpecialIds

IGNORE = -100


class SkipSample(ValueError):
    """A sample that yields no training sequence; the message is the reason counted in the loader stats.

    ``detail`` (which uri, which shard) is for the log line only: counters stay keyed by few reasons."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Format:
    tag: str
    prompt: str | None = None
    text_loss: str = "all"  # all | all_but_first | none
    audio: str = "input"  # input | generate
    video_audio: bool = False  # no audio segment: use the video's own audio track
    speech_after_text: bool = False  # each audio segment follows its own words (ITTS: text_i, audio_i)


ASR_PROMPT = "将语音转录为文本:"  # the released base-model ASR prompt (docs/PAPER.md §8)
OMNI_IMAGE_PROMPT = (
    "Please listen to the following audio describing the content of the image. Your task is to supplement "
    "additional information by combining the audio with the image upon completion of listening"
)

FORMATS: dict[str, Format] = {
    "text": Format("text"),
    "caption": Format("image"),
    "interleaved": Format("image"),
    "asr": Format("audio", prompt=ASR_PROMPT),
    "tts": Format("audio", text_loss="none", audio="generate"),
    "intlv": Format("audio"),
    "itts": Format("audio", text_loss="all_but_first", audio="generate", speech_after_text=True),
    "pure_audio": Format("audio", text_loss="none", audio="generate"),
    "image_audio_text": Format("omni", prompt=OMNI_IMAGE_PROMPT),
    "video_caption": Format("video"),
    "video_audio_text": Format("omni", video_audio=True),
}

FORMAT_OF_KIND = {
    "text": "text",
    "image_caption": "caption",
    "ocr": "caption",
    "interleaved_image_text": "interleaved",
    "asr": "asr",
    "tts": "tts",
    "speech_text_interleaved": "intlv",
    "audio": "pure_audio",
    "image_audio_text": "image_audio_text",
    "video_caption": "video_caption",
    "video_audio_text": "video_audio_text",
}


@dataclass
class Example:
    sample_id: str
    tag: int
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    spans: list[tuple[int, int, str, int]] = field(default_factory=list)  # start, end, "image"|"audio", index
    images: list[ImageInput] = field(default_factory=list)
    audios: list[AudioClip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def learns_something(self) -> bool:
        return any(lab != IGNORE for lab in self.labels[1:]) or any(a.generate for a in self.audios)

    def _put(self, ids: list[int], trainable: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if trainable else [IGNORE] * len(ids))

    def add_image(self, image: ImageInput, sp: SpecialIds) -> None:
        start = len(self.ids)
        self._put([sp.img_start] + [sp.img_pad] * image.tokens + [sp.img_end], False)
        self.spans.append((start, len(self.ids), "image", len(self.images)))
        self.images.append(image)

    def add_audio(self, clip: AudioClip, sp: SpecialIds) -> None:
        start = len(self.ids)
        if clip.generate:
            self._put([sp.audiogen_start] + [sp.audio_pad] * clip.frames, False)
            self._put([sp.audiogen_end], True)  # the text head learns where speech ends
        else:
            self._put([sp.audio_start] + [sp.audio_pad] * clip.frames + [sp.audio_end], False)
        self.spans.append((start, len(self.ids), "audio", len(self.audios)))
        self.audios.append(clip)

    def truncated(self, limit: int) -> Example:
        """The first ``limit`` tokens, never cutting through a media span."""
        if len(self.ids) <= limit:
            return self
        cut = limit
        while inside := [start for start, end, _, _ in self.spans if start < cut < end]:
            cut = min(inside)  # a frame's span sits inside its video's span: back off to the outermost
        spans = [s for s in self.spans if s[1] <= cut]
        return Example(
            self.sample_id,
            self.tag,
            self.ids[:cut],
            self.labels[:cut],
            spans,
            [self.images[i] for _, _, kind, i in spans if kind == "image"],
            [self.audios[i] for _, _, kind, i in spans if kind == "audio"],
        )


def media_bytes(seg: dict[str, Any], uris: UriPolicy | None) -> bytes:
    """Inline bytes, or what the segment's ``uri`` names when ``uris`` allows it (a shard is data, not a
    licence to read ``/etc/passwd`` or to fetch an internal URL); no policy allows no uri."""
    if seg.get("bytes") is not None:
        return bytes(seg["bytes"])
    uri = seg.get("uri")
    if uri:
        if uris is None:
            raise SkipSample("uri not allowed", f"{str(uri)[:200]} (no allowed prefixes)")
        try:
            target = confine_local(uri, uris, "path outside allowed roots")
        except Confined as e:  # outside the roots, or a fifo / device that would block or never end
            raise SkipSample("uri not allowed", f"{e.reason}: {e.detail}") from e
        try:
            return storage.read_bytes(target)  # the normalised form that was checked, not the raw string
        except (OSError, ValueError) as e:
            raise SkipSample("uri unreadable", f"{target[:200]}: {type(e).__name__}") from e
    raise SkipSample(f"{seg['modality']} segment without bytes or uri")


def spoken_words(seg: dict[str, Any]) -> str | None:
    """The words an audio segment speaks: what the tts step said (``meta.tts.text``), else what the
    transcribe step heard (``meta.asr.text``); None when neither is known."""
    meta = seg.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    if not isinstance(meta, dict):
        return None
    for key in ("tts", "asr"):
        info = meta.get(key)
        text = info.get("text") if isinstance(info, dict) else None
        if isinstance(text, str) and text.strip():
            return text
    return None


def build_example(
    sample: dict[str, Any],
    fmt_name: str | None,
    tokenizer: Any,
    sp: SpecialIds,
    media: MediaProcessor,
    uris: UriPolicy | None = None,
) -> Example:
    """The training sequence of one decoded Sample row; raises SkipSample with a reason.

    Segments given by ``uri`` are read only under the prefixes ``uris`` allows."""
    name = fmt_name or FORMAT_OF_KIND.get(sample["kind"])
    if name is None:
        raise SkipSample(f"no training format for kind {sample['kind']}")
    fmt = FORMATS[name]
    ex = Example(sample["id"], TAGS.index(fmt.tag))
    encode = tokenizer.encode
    if fmt.prompt:
        ex._put(encode(fmt.prompt, add_special_tokens=False), False)
    segments = sample["segments"]
    has_audio = any(s["modality"] == "audio" for s in segments)
    texts_seen = 0

    def put_text(text: str) -> None:
        nonlocal texts_seen
        trainable = fmt.text_loss == "all" or (fmt.text_loss == "all_but_first" and texts_seen > 0)
        ex._put(encode(text, add_special_tokens=False), trainable)
        texts_seen += 1

    if fmt.speech_after_text and not any(spoken_words(s) for s in segments if s["modality"] == "audio"):
        raise SkipSample("no speech with its own text")
    try:
        for seg in segments:
            modality = seg["modality"]
            if modality == "text":
                text = seg.get("text") or ""
                if text.strip():
                    put_text(text)
            elif modality == "audio" and fmt.speech_after_text:
                words = spoken_words(seg)
                if words is None:  # speech whose words are unknown is read, not spoken
                    ex.add_audio(media.audio_clip(media_bytes(seg, uris)), sp)
                    continue
                put_text(words)
                ex.add_audio(media.audio_clip(media_bytes(seg, uris), generate=True), sp)
            elif modality == "image":
                ex.add_image(media.image(media_bytes(seg, uris)), sp)
            elif modality == "audio":
                ex.add_audio(media.audio_clip(media_bytes(seg, uris), generate=fmt.audio == "generate"), sp)
            elif modality == "video":
                data = media_bytes(seg, uris)
                start = len(ex.ids)
                ex._put([sp.video_start], False)
                for frame in media.video(data):
                    ex.add_image(frame, sp)
                ex._put([sp.video_end], False)
                ex.spans.append((start, len(ex.ids), "video", -1))
                if fmt.video_audio and not has_audio:
                    try:
                        ex.add_audio(media.audio_clip(data), sp)
                    except MediaError:
                        pass  # a silent video is still a video
    except MediaError as e:
        raise SkipSample(e.reason) from e
    ex._put([sp.eos], fmt.text_loss != "none")
    if ex.labels:
        ex.labels[0] = IGNORE  # the first token is never predicted across a pack boundary
    if not ex.learns_something():
        raise SkipSample("nothing to learn")
    return ex
