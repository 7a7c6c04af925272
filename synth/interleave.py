"""Builders: one registered operator per data type of the paper, each reshaping a sample's segments.

Builders are 1:1 over rows and cheap (no models): they arrange what ``probe``/``keyframes``/
``transcribe``/``caption`` found and mark text to be spoken (``meta.speak``) for the ``tts`` step
that follows them (then ``tts_backcheck``). A builder takes the samples its ``kinds`` (and
optional ``sources``, ``languages``) select, of which a stable hash picks a ``share`` — so one
recipe can route, say, half of the image captions to image-audio-text — and marks what it built
(``meta.built_by``) so later builders leave it alone. Other rows pass through untouched; a
selected sample a builder cannot build is rejected with the reason, one it does not apply to (a
single sentence to interleave, a text too long for a TTS pair) passes through unchanged.

Data types (docs/PAPER.md sections 2-3): image caption, interleaved image-text, ASR pairs
``<audio, transcript>``, TTS pairs ``<text, audio>``, speech-text interleaved (sentences, a prefix
quarter spoken), image-audio-text (question spoken, answer written; or the paper's prefix quarter
of a caption spoken), video-audio-text (keyframes + the video's own audio + transcript + caption).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import pyarrow as pa

from pipelines.operator import Operator, Resources, register, with_rejections
from shards.schema import dumps_meta, loads_meta
from synth.avtools import extract_audio_track
from synth.media import DEFAULT_TIMEOUT_S, MediaError
from synth.ops_media import media_bytes
from synth.rows import is_source_media, make_segment, replace_samples, seg_meta, stable_fraction
from synth.text import split_sentences, word_error_rate

QUESTIONS = (
    "What is in this picture?",
    "Please describe this image.",
    "What can you see in this image?",
    "Describe what this photo shows.",
    "Tell me about this picture.",
    "What does this image show?",
)


class BuildError(ValueError):
    """A selected sample that cannot become this data type."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class NotApplicable(Exception):
    """A selected sample this builder leaves as it is (a one-sentence text cannot be interleaved)."""


class Builder(Operator):
    """Selection, pass-through and rejection shared by every builder; subclasses implement ``build``.

    Params:
        kinds: the sample kinds it builds from (default: the builder's own ``kinds``).
        sources: only samples of these sources (null: all).
        languages: only samples in these languages (``meta.lang``; null: all).
        share: the stable-hash share of the selected samples it takes (the rest pass through).
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    resources = Resources(cpus=1)
    param_ranges = {"share": (0.0, 1.0), "fraction": (0.0, 1.0)}

    def __init__(
        self,
        kinds: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        languages: Sequence[str] | None = None,
        share: float = 1.0,
        **params: Any,
    ) -> None:
        super().__init__(kinds=kinds, sources=sources, languages=languages, share=share, **params)
        self.select_kinds = tuple(kinds or self.kinds)
        self.sources = set(sources) if sources else None
        self.languages = set(languages) if languages else None
        self.share = float(share)

    def selected(self, row: dict[str, Any], meta: dict[str, Any]) -> bool:
        if row["kind"] not in self.select_kinds or "built_by" in meta:
            return False
        if self.sources is not None and row["source"] not in self.sources:
            return False
        lang = meta.get("lang") or row.get("lang")
        if self.languages is not None and lang is not None and lang not in self.languages:
            return False
        return self.share >= 1.0 or stable_fraction(row["id"], self.name) < self.share

    def build(self, row: dict[str, Any], meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """(new segments, new kind, sample-meta additions) or ``BuildError``."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = [c for c in ("id", "source", "kind", "segments", "meta", "lang") if c in batch.column_names]
        rows = batch.select(cols).to_pylist()
        segments, kinds, metas = [], [], []
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        for r, row in enumerate(rows):
            meta = loads_meta(row["meta"])
            if self.selected(row, meta):
                try:
                    segs, kind, extra = self.build(row, meta)
                    segments.append(segs)
                    kinds.append(kind)
                    metas.append(dumps_meta({**meta, **extra, "built_by": self.name}))
                    continue
                except NotApplicable:
                    pass
                except (BuildError, MediaError) as e:
                    reasons[r], details[r] = e.reason, e.detail[:500] or None
            segments.append(row["segments"])
            kinds.append(row["kind"])
            metas.append(row["meta"])
        return with_rejections(replace_samples(batch, segments, kinds, metas), reasons, details)


def _texts(segments: list[dict[str, Any]]) -> list[str]:
    return [s["text"].strip() for s in segments if s["modality"] == "text" and s["text"] and s["text"].strip()]


def _caption_of(segments: list[dict[str, Any]], image: dict[str, Any], prefer: str) -> tuple[str, str]:
    """(caption, where it came from) for an image_caption sample: the source's text or the model's."""
    source, model = " ".join(_texts(segments)), seg_meta(image).get("caption", "")
    order = [("source", source), ("model", model)] if prefer == "source" else [("model", model), ("source", source)]
    for origin, text in order:
        if text:
            return text, origin
    raise BuildError("no caption", "no text in the sample and no model caption (run caption first)")


def speech_layout(segments: list[dict[str, Any]], spoken: set[int], keep_images: bool) -> list[dict[str, Any]]:
    """Text segments re-cut into runs of sentences that share a fate (spoken runs marked ``speak``);
    images stay where they were when kept, and break runs."""
    out: list[dict[str, Any]] = []
    run: list[str] = []
    run_spoken = False

    def flush() -> None:
        if run:
            meta = {"sentences": len(run), **({"speak": True} if run_spoken else {})}
            out.append(make_segment("text", text=" ".join(run), meta=meta))
            run.clear()

    index = 0
    for seg in segments:
        if seg["modality"] == "image" and keep_images and is_source_media(seg, "image"):
            flush()
            out.append(seg)
        elif seg["modality"] == "text" and seg["text"]:
            for sentence in split_sentences(seg["text"]):
                if run and (index in spoken) != run_spoken:
                    flush()
                run_spoken = index in spoken
                run.append(sentence)
                index += 1
    flush()
    return out


def spoken_indices(n: int, fraction: float, placement: str, key: str) -> set[int]:
    """Which of ``n`` sentences become speech: ``round(n * fraction)`` of them, at least one, and at
    least one left as text; the first ones (``prefix``, docs/PAPER.md section 3) or a stable random set."""
    k = min(n - 1, max(1, math.floor(n * fraction + 0.5)))
    if placement == "prefix":
        return set(range(k))
    ranked = sorted(range(n), key=lambda i: stable_fraction(f"{key}/{i}", "placement"))
    return set(ranked[:k])


@register
class BuildImageCaption(Builder):
    """``<image, caption>``: the source caption, or the CoCa caption when the source has none
    (``prefer: model`` reverses that).

    Params:
        prefer: ``source`` (the source's caption first) or ``model`` (CoCa's first).
    """

    name = "build_image_caption"
    kinds = ("image", "image_caption")

    def __init__(self, prefer: str = "source", **select: Any) -> None:
        super().__init__(prefer=prefer, **select)
        self.prefer = prefer

    def build(self, row, meta):
        images = [s for s in row["segments"] if is_source_media(s, "image")]
        if not images:
            raise BuildError("no image")
        caption, origin = _caption_of(row["segments"], images[0], self.prefer)
        return [*images, make_segment("text", text=caption, meta={"caption_from": origin})], "image_caption", {}


@register
class BuildInterleavedImageText(Builder):
    """Interleaved image-text documents kept in reading order, empty texts dropped; images without
    any text nearby get their CoCa caption as alt text when ``alt_text`` is set.

    Params:
        alt_text: add CoCa captions as alt text to images with no text beside them.
    """

    name = "build_interleaved_image_text"
    kinds = ("interleaved_image_text",)

    def __init__(self, alt_text: bool = False, **select: Any) -> None:
        super().__init__(alt_text=alt_text, **select)
        self.alt_text = bool(alt_text)

    def build(self, row, meta):
        out: list[dict[str, Any]] = []
        segs = [s for s in row["segments"] if s["modality"] != "text" or (s["text"] or "").strip()]
        for i, seg in enumerate(segs):
            out.append(seg)
            lonely = all(s["modality"] != "text" for s in segs[max(0, i - 1) : i + 2])
            caption = seg_meta(seg).get("caption")
            if self.alt_text and seg["modality"] == "image" and lonely and caption:
                out.append(make_segment("text", text=caption, meta={"caption_from": "model"}))
        if not any(s["modality"] == "image" for s in out) or not any(s["modality"] == "text" for s in out):
            raise BuildError("not interleaved", "needs at least one image and one text")
        return out, "interleaved_image_text", {}


@register
class BuildASR(Builder):
    """``<audio, transcript>``: the source transcript when there is one (its WER against whisper is
    kept as ``asr_ref_wer``; above ``max_ref_wer`` the pair is rejected), else whisper's transcript.

    Params:
        max_ref_wer: reject a pair whose source transcript is further than this WER from whisper's (null:
            only scored).
        keep_normalized: keep ``normalize_audio``'s 16 kHz copy in the sample too.
    """

    name = "build_asr"
    kinds = ("audio", "asr")

    def __init__(self, max_ref_wer: float | None = None, keep_normalized: bool = False, **select: Any) -> None:
        super().__init__(max_ref_wer=max_ref_wer, keep_normalized=keep_normalized, **select)
        self.max_ref_wer = None if max_ref_wer is None else float(max_ref_wer)
        self.keep_normalized = bool(keep_normalized)

    def build(self, row, meta):
        segs = row["segments"]
        audio = next((s for s in segs if is_source_media(s, "audio")), None)
        if audio is None:
            raise BuildError("no audio")
        asr = seg_meta(audio).get("asr")
        if asr is None:
            raise BuildError("no transcript", "run transcribe before build_asr")
        extra: dict[str, Any] = {}
        reference = " ".join(_texts(segs))
        if reference:
            wer = round(word_error_rate(reference, asr["text"]), 4)
            extra["asr_ref_wer"] = wer
            if self.max_ref_wer is not None and wer > self.max_ref_wer:
                raise BuildError(
                    "transcript disagrees with asr", f"wer={wer} > {self.max_ref_wer} heard={asr['text']!r}"
                )
            text, origin = reference, "source"
        elif asr["text"].strip():
            text, origin = asr["text"].strip(), "asr"
        else:
            raise BuildError("no speech", "whisper heard nothing and the sample has no transcript")
        media = [audio]
        if self.keep_normalized:
            media += [s for s in segs if seg_meta(s).get("role") == "asr_input"]
        return [*media, make_segment("text", text=text, meta={"transcript_from": origin})], "asr", extra


@register
class BuildTTS(Builder):
    """``<text, audio>``: the text, then the same text marked to be spoken by the ``tts`` step.
    Texts longer than ``max_chars`` stay text samples (a TTS pair should be one utterance).

    Params:
        max_chars: longer texts are left as text samples.
    """

    name = "build_tts"
    kinds = ("text",)

    def __init__(self, max_chars: int = 600, **select: Any) -> None:
        super().__init__(max_chars=max_chars, **select)
        self.max_chars = int(max_chars)

    def build(self, row, meta):
        text = " ".join(_texts(row["segments"]))
        if not text:
            raise BuildError("empty text")
        if len(text) > self.max_chars:
            raise NotApplicable  # stays a text sample: a TTS pair should be one utterance
        speak = make_segment("text", text=text, meta={"speak": True, "sentences": len(split_sentences(text))})
        return [make_segment("text", text=text), speak], "tts", {}


class _SentenceSpeech(Builder):
    """Shared by the speech-text and prefix-mode image-audio-text builders: split, choose, mark.

    Params:
        fraction: the share of sentences spoken (the paper's 1/4), in (0, 1).
        placement: ``prefix`` (the first sentences) or ``random`` (a stable random set).
        min_sentences: texts with fewer sentences are left as they are (at least 2).
    """

    def __init__(self, fraction: float = 0.25, placement: str = "prefix", min_sentences: int = 2, **params: Any):
        super().__init__(fraction=fraction, placement=placement, min_sentences=min_sentences, **params)
        if not 0 < float(fraction) < 1:
            raise ValueError(f"fraction must be in (0, 1), not {fraction}")
        if placement not in ("prefix", "random"):
            raise ValueError(f"placement must be prefix or random, not {placement!r}")
        self.fraction, self.placement, self.min_sentences = float(fraction), placement, max(2, int(min_sentences))

    def speech_segments(
        self, segments: list[dict[str, Any]], key: str, keep_images: bool
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        n = sum(len(split_sentences(t)) for t in _texts(segments))
        if n < self.min_sentences:
            raise NotApplicable  # stays as it is: nothing to interleave
        spoken = spoken_indices(n, self.fraction, self.placement, key)
        stats = {"sentences": n, "spoken_sentences": len(spoken), "placement": self.placement}
        return speech_layout(segments, spoken, keep_images), stats


@register
class BuildSpeechTextInterleaved(_SentenceSpeech):
    """Text split into sentences; ``fraction`` of them (the paper's 1/4) marked to be spoken — the
    first ones (``placement: prefix``) or a stable random set (``random``); the rest stay text.
    Images are dropped unless ``keep_images`` (the sample then is the paper's image-audio-text).

    Params:
        keep_images: keep an interleaved document's images (the sample becomes image-audio-text).
    """

    name = "build_speech_text_interleaved"
    kinds = ("text", "interleaved_image_text")

    def __init__(self, keep_images: bool = False, **params: Any) -> None:
        super().__init__(keep_images=keep_images, **params)
        self.keep_images = bool(keep_images)

    def build(self, row, meta):
        segs = row["segments"]
        out, stats = self.speech_segments(segs, row["id"], self.keep_images)
        kind = "image_audio_text" if any(s["modality"] == "image" for s in out) else "speech_text_interleaved"
        return out, kind, stats


@register
class BuildImageAudioText(_SentenceSpeech):
    """Image + speech + text. ``mode: question`` (default): a question about the image is spoken and
    the caption is the written answer. ``mode: prefix``: the paper's section-3 recipe — the caption's
    first quarter of sentences is spoken and the rest written (single-sentence captions fall back to
    ``question``).

    Params:
        mode: ``question`` (a spoken question, the caption as answer) or ``prefix`` (part of the caption spoken).
        questions: the questions to choose from (a stable hash of the sample id picks one).
        prefer: ``source`` (the source's caption first) or ``model`` (CoCa's first).
    """

    name = "build_image_audio_text"
    kinds = ("image_caption",)

    def __init__(self, mode: str = "question", questions: Sequence[str] = QUESTIONS, prefer: str = "source", **params):
        super().__init__(mode=mode, questions=list(questions), prefer=prefer, **params)
        if mode not in ("question", "prefix"):
            raise ValueError(f"mode must be question or prefix, not {mode!r}")
        self.mode, self.questions, self.prefer = mode, list(questions), prefer

    def build(self, row, meta):
        images = [s for s in row["segments"] if is_source_media(s, "image")]
        if not images:
            raise BuildError("no image")
        caption, origin = _caption_of(row["segments"], images[0], self.prefer)
        if self.mode == "prefix" and len(split_sentences(caption)) >= self.min_sentences:
            layout = [*images, make_segment("text", text=caption)]
            speech, stats = self.speech_segments(layout, row["id"], keep_images=True)
            return speech, "image_audio_text", {**stats, "mode": "prefix", "caption_from": origin}
        question = self.questions[int(stable_fraction(row["id"], "question") * len(self.questions))]
        segs = [
            *images,
            make_segment("text", text=question, meta={"speak": True, "role": "question"}),
            make_segment("text", text=caption, meta={"role": "answer", "caption_from": origin}),
        ]
        return segs, "image_audio_text", {"mode": "question"}


@register
class BuildVideoAudioText(Builder):
    """Keyframes + the video's own audio track (stream-copied, as the paper takes it) + whisper's
    transcript + a caption (the source's text, else the CoCa caption of each clip's middle keyframe).

    A video without sound becomes ``video_caption`` (keyframes + caption). Needs ``keyframes`` (and
    ``transcribe``, ``caption``) first.

    Params:
        keep_video: keep the source video segment too.
        timeout_s: seconds per ffmpeg call (the audio track's copy).
    """

    name = "build_video_audio_text"
    kinds = ("video", "video_caption", "video_audio_text")

    def __init__(self, keep_video: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, **select: Any) -> None:
        super().__init__(keep_video=keep_video, timeout_s=timeout_s, **select)
        self.keep_video, self.timeout_s = bool(keep_video), float(timeout_s)

    def build(self, row, meta):
        segs = row["segments"]
        video = next((s for s in segs if is_source_media(s, "video")), None)
        if video is None:
            raise BuildError("no video")
        frames = [s for s in segs if seg_meta(s).get("role") == "keyframe"]
        if not frames:
            raise BuildError("no keyframes", "run keyframes before build_video_audio_text")
        vmeta = seg_meta(video)
        caption, origin = " ".join(_texts(segs)), "source"
        if not caption:
            caption, origin = _clip_captions(frames), "model"
        if not caption:
            raise BuildError("no caption", "no text in the sample and no keyframe captions (run caption first)")
        out = ([video] if self.keep_video else []) + frames
        asr = vmeta.get("asr")
        if not vmeta.get("has_audio", asr is not None) or asr is None:
            out.append(make_segment("text", text=caption, meta={"role": "caption", "caption_from": origin}))
            return out, "video_caption", {}
        audio_meta = {
            "ext": "mka",
            "from_video": True,
            "duration": vmeta.get("duration"),
            "audio_codec": vmeta.get("audio_codec"),
        }
        out.append(make_segment("audio", data=extract_audio_track(media_bytes(video), self.timeout_s), meta=audio_meta))
        if asr["text"].strip():
            tmeta = {"role": "transcript", "language": asr["language"], "segments": asr["segments"]}
            out.append(make_segment("text", text=asr["text"].strip(), meta=tmeta))
        out.append(make_segment("text", text=caption, meta={"role": "caption", "caption_from": origin}))
        return out, "video_audio_text", {}


def _clip_captions(frames: list[dict[str, Any]]) -> str:
    by_clip: dict[int, list[dict[str, Any]]] = {}
    for f in frames:
        by_clip.setdefault(seg_meta(f).get("clip", 0), []).append(f)
    captions = []
    for clip in sorted(by_clip):
        middle = by_clip[clip][len(by_clip[clip]) // 2]
        text = seg_meta(middle).get("caption", "")
        if text and text not in captions:
            captions.append(text)
    return " ".join(captions)
