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

SFT conversations (the ``sft_*`` kinds: every segment's meta has ``role`` system | user | assistant and
``turn``, the message's index; a spoken assistant answer is an audio segment with role assistant) use
the released chat template. Baichuan-Omni-1.5 ``web_demo/constants.py`` has ``role_prefix = {'system':
'<B_SYS>', 'user': '<C_Q>', 'assistant': '<C_A>', 'audiogen': '<audiotext_start_baichuan>'}`` and
``preprocess_messages`` writes, per message, ``role_prefix['audiogen']`` *before* ``role_prefix[role]``
for an assistant turn in speech mode, then the content; the prompt ends ``<audiotext_start_baichuan><C_A>``
(speech) or ``<C_A>`` (text). A user turn's content is its media spans and query in order
(``vision_s2s_gradio_demo_cosy_multiturn.py``: images, video, audio, then the text). Text generation
stops at ``<|endoftext|>``, or in speech mode also at ``<audiogen_start_baichuan>``, after which the
audio head speaks the text so far and ``<audiogen_end_baichuan>`` hands back to text
(``generate_response``); ``processor_omni.py`` marks loss spans with ``<trainable_start>…<trainable_end>``
but the release ships no SFT data, so which tokens are inside is ours, read from that loop:

    [<B_SYS> system text]                                              no loss
    <C_Q> user text / <img_start> pad×N <img_end> / <audio_start> pad×N <audio_end> / video   no loss
    <C_A> answer text <|endoftext|>                                    loss on the answer and the eos
    <audiotext_start_baichuan> <C_A> words <audiogen_start> pad×N <audiogen_end> <|endoftext|>
          loss on the words, <audiogen_start>, <audiogen_end> and the eos; the audio head learns the
          frames (the clip is generated); markers and every media placeholder carry no text loss

The eos after each answer is what the model must emit to end its turn (the demo strips it from the
history it replays; training keeps it so every turn learns to stop). The spoken words are the turn's
text segments, else the clip's ``meta.tts.text``. A user's audio is input only. The voice the system
prompt names (sample meta ``voice``) travels on the example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.confine import Confined, UriPolicy, confine_local
from shards.schema import SFT_KINDS
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
    chat: bool = False  # an SFT conversation in the released chat template (loss on assistant turns only)


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
    "sft_text": Format("text", chat=True),
    "sft_image": Format("image", chat=True),
    "sft_video": Format("video", chat=True),
    "sft_audio": Format("audio", chat=True),
    "sft_image_audio": Format("omni", chat=True),
    "sft_audio_generation": Format("audio", chat=True),  # the audio head's loss is logged as audio_gen
}

CHAT_ROLES = ("system", "user", "assistant")

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
    **{kind: kind for kind in SFT_KINDS},
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
    voice: str | None = None  # the voice an SFT system prompt names (sample meta ``voice``)

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

    def add_audio(self, clip: AudioClip, sp: SpecialIds, learn_start: bool = False) -> None:
        """``learn_start``: the text head learns to emit ``<audiogen_start>`` (a spoken chat answer)."""
        start = len(self.ids)
        if clip.generate:
            self._put([sp.audiogen_start], learn_start)
            self._put([sp.audio_pad] * clip.frames, False)
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
            self.voice,
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


def _meta(meta: Any) -> dict[str, Any]:
    """A segment's or sample's meta as a dict (a shard row holds JSON text); {} when unreadable."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return {}
    return meta if isinstance(meta, dict) else {}


def spoken_words(seg: dict[str, Any]) -> str | None:
    """The words an audio segment speaks: what the tts step said (``meta.tts.text``), else what the
    transcribe step heard (``meta.asr.text``); None when neither is known."""
    meta = _meta(seg.get("meta"))
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
    if fmt.chat:
        return _build_chat(ex, sample, tokenizer, sp, media, uris)
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


def conversation(segments: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The messages of an SFT sample, in order: ``(role, segments)``. Consecutive segments with the same
    ``role`` and ``turn`` form one message; raises SkipSample when a segment has no known role."""
    messages: list[tuple[str, list[dict[str, Any]]]] = []
    previous: tuple[str, Any] | None = None
    for i, seg in enumerate(segments):
        meta = _meta(seg.get("meta"))
        role = meta.get("role")
        if role not in CHAT_ROLES:
            raise SkipSample("sft segment without a role", f"segment {i}: role {str(role)[:40]!r}")
        turn = meta.get("turn")
        key = (role, turn if isinstance(turn, int) and not isinstance(turn, bool) else None)
        if key != previous:
            messages.append((role, []))
            previous = key
        messages[-1][1].append(seg)
    return messages


def _build_chat(
    ex: Example,
    sample: dict[str, Any],
    tokenizer: Any,
    sp: SpecialIds,
    media: MediaProcessor,
    uris: UriPolicy | None,
) -> Example:
    """An SFT conversation in the released chat template (module docstring): loss on assistant turns only."""
    voice = _meta(sample.get("meta")).get("voice")
    ex.voice = voice if isinstance(voice, str) and voice.strip() else None
    messages = conversation(sample["segments"])

    def put_text(text: str | None, trainable: bool) -> None:
        if text and text.strip():
            ex._put(tokenizer.encode(text, add_special_tokens=False), trainable)

    def put_input(seg: dict[str, Any]) -> None:
        modality = seg["modality"]
        if modality == "text":
            put_text(seg.get("text"), False)
        elif modality == "image":
            ex.add_image(media.image(media_bytes(seg, uris)), sp)
        elif modality == "audio":
            ex.add_audio(media.audio_clip(media_bytes(seg, uris)), sp)
        elif modality == "video":
            start = len(ex.ids)
            ex._put([sp.video_start], False)
            for frame in media.video(media_bytes(seg, uris)):
                ex.add_image(frame, sp)
            ex._put([sp.video_end], False)
            ex.spans.append((start, len(ex.ids), "video", -1))

    try:
        for role, segs in messages:
            if role != "assistant":
                ex._put([sp.b_sys if role == "system" else sp.c_q], False)
                for seg in segs:
                    put_input(seg)
                continue
            if any(s["modality"] in ("image", "video") for s in segs):
                raise SkipSample("sft assistant turn with an image or video")
            spoken = any(s["modality"] == "audio" for s in segs)
            has_text = any(s["modality"] == "text" and (s.get("text") or "").strip() for s in segs)
            ex._put([sp.audiotext_start, sp.c_a] if spoken else [sp.c_a], False)
            for seg in segs:
                if seg["modality"] == "text":
                    put_text(seg.get("text"), True)
                    continue
                if not has_text:  # the words the clip says, when the turn has no text of its own
                    put_text(spoken_words(seg), True)
                clip = media.audio_clip(media_bytes(seg, uris), generate=True)
                ex.add_audio(clip, sp, learn_start=True)
            ex._put([sp.eos], True)  # the answer ends its turn
    except MediaError as e:
        raise SkipSample(e.reason) from e
    if not messages or messages[-1][0] != "assistant":
        ex._put([sp.eos], False)  # every example ends with eos; a trailing question teaches nothing
    if ex.labels:
        ex.labels[0] = IGNORE
    if not ex.learns_something():
        raise SkipSample("nothing to learn")
    return ex
