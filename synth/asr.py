"""faster-whisper transcription, batched across clips, with VAD, language and segment timestamps.

faster-whisper's ``BatchedInferencePipeline`` batches the VAD chunks of one file, so a batch of
short clips (prompts, TTS sentences) would run one chunk at a time. Here the clips of a whole Arrow
batch are laid end to end (with a little silence between them) and their VAD spans are handed to
one ``transcribe`` call as ``clip_timestamps``: the pipeline then batches chunks from many clips,
and each returned segment is mapped back to its clip by time. Only public faster-whisper API is used.

A transcript also carries the signals of whisper's failure modes, so a pipeline can score and reject
them: the zlib compression ratio whisper itself uses (> 2.4 means a repetitive text), the share of
repeated word n-grams (a loop of one sentence), and the decoder's no-speech probability.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synth.models import whisper_model_dir

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30.0  # whisper's window; a longer span is split
GAP_SAMPLES = SAMPLE_RATE // 10  # silence between clips laid end to end


@dataclass
class Transcript:
    text: str
    language: str
    language_probability: float
    duration: float
    segments: list[dict[str, Any]] = field(default_factory=list)  # {start, end, text}, seconds in the clip
    no_speech_prob: float = 0.0  # the decoder's, weighted by segment duration

    def as_meta(self, model: str) -> dict[str, Any]:
        return {
            "text": self.text,
            "language": self.language,
            "language_probability": round(self.language_probability, 4),
            "segments": self.segments,
            "model": model,
            "guard": self.guard_scores(),
        }

    def guard_scores(self) -> dict[str, float]:
        """The hallucination signals of this transcript (see ``compression_ratio``, ``repeated_ngram_ratio``)."""
        return {
            "compression_ratio": round(compression_ratio(self.text), 4),
            "repeated_ngram_ratio": round(repeated_ngram_ratio(self.text), 4),
            "no_speech_prob": round(self.no_speech_prob, 4),
        }


def compression_ratio(text: str) -> float:
    """Bytes over zlib-compressed bytes, as whisper computes it: loops compress well (whisper flags > 2.4)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams (characters for CJK scripts) that already occurred earlier in the text.

    Speech rarely repeats three words in a row; a decoder caught in a loop repeats whole sentences,
    which drives this toward 1 even for transcripts too short for the compression ratio to notice."""
    units = [c for c in text if _CJK.match(c)] if _CJK.search(text) else re.findall(r"\w+", text.lower())
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def speech_spans(audio: np.ndarray, vad: Any) -> list[tuple[int, int]]:
    """VAD speech regions (sample offsets) merged greedily into spans no longer than whisper's window."""
    from faster_whisper.vad import get_speech_timestamps

    spans: list[tuple[int, int]] = []
    limit = int(CHUNK_SECONDS * SAMPLE_RATE)
    for region in get_speech_timestamps(audio, vad):
        start, end = int(region["start"]), int(region["end"])
        if spans and end - spans[-1][0] <= limit:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


class Transcriber:
    """A CTranslate2 whisper model (a local directory) and how to run it on many clips at once."""

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        compute_type: str = "default",
        cpu_threads: int = 0,
        batch_size: int = 8,
        beam_size: int = 1,
        timestamps: bool = True,
        language: str | None = None,
    ) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel
        from faster_whisper.vad import VadOptions

        self.model_dir = whisper_model_dir(model)
        if device == "auto":
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        if compute_type == "default":
            compute_type = "float16" if device == "cuda" else "int8"
        self.model = WhisperModel(self.model_dir, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
        self.pipeline = BatchedInferencePipeline(self.model)
        self.vad = VadOptions(max_speech_duration_s=CHUNK_SECONDS, min_silence_duration_ms=160)
        self.batch_size = batch_size
        self.beam_size = beam_size
        self.timestamps = timestamps
        self.language = language
        self.multilingual = bool(self.model.model.is_multilingual)

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        if not self.multilingual:
            return "en", 1.0
        if self.language:
            return self.language, 1.0
        language, probability, _ = self.model.detect_language(audio, vad_filter=True)
        return language, float(probability)

    def transcribe_many(
        self, clips: Sequence[np.ndarray], languages: Sequence[tuple[str, float]] | None = None
    ) -> list[Transcript]:
        """One transcript per 16 kHz mono float32 clip, in order; clips of one language share batches.

        ``languages`` gives each clip's (language, probability) when a caller detected it already
        (with another model); otherwise this model detects it."""
        if languages is None:
            languages = [self.detect_language(a) if len(a) else ("", 0.0) for a in clips]
        out: list[Transcript | None] = [None] * len(clips)
        for language in sorted({lang for lang, _ in languages if lang}):
            members = [i for i, (lang, _) in enumerate(languages) if lang == language]
            for i, tr in zip(members, self._transcribe_group([clips[i] for i in members], language), strict=True):
                tr.language_probability = languages[i][1]
                out[i] = tr
        for i, clip in enumerate(clips):
            if out[i] is None:
                out[i] = Transcript("", "", 0.0, len(clip) / SAMPLE_RATE)
        return [t for t in out if t is not None]

    def _transcribe_group(self, clips: Sequence[np.ndarray], language: str) -> list[Transcript]:
        pieces: list[np.ndarray] = []
        offsets: list[int] = []
        spans: list[dict[str, float]] = []
        position = 0
        for audio in clips:
            offsets.append(position)
            for start, end in speech_spans(audio, self.vad):
                spans.append({"start": (position + start) / SAMPLE_RATE, "end": (position + end) / SAMPLE_RATE})
            pieces += [audio, np.zeros(GAP_SAMPLES, np.float32)]
            position += len(audio) + GAP_SAMPLES
        found: list[list[dict[str, Any]]] = [[] for _ in clips]
        no_speech = [[0.0, 0.0] for _ in clips]  # duration-weighted sum, duration
        if spans:
            segments, _ = self.pipeline.transcribe(
                np.concatenate(pieces),
                language=language,
                clip_timestamps=spans,
                batch_size=self.batch_size,
                beam_size=self.beam_size,
                without_timestamps=not self.timestamps,
            )
            starts = np.asarray(offsets) / SAMPLE_RATE
            for seg in segments:
                # by midpoint: segment times are rounded to 3 decimals, a clip's offset is not
                k = int(np.searchsorted(starts, (seg.start + seg.end) / 2, side="right")) - 1
                text = seg.text.strip()
                weight = max(seg.end - seg.start, 1e-3)
                no_speech[k][0] += float(seg.no_speech_prob) * weight
                no_speech[k][1] += weight
                if text:
                    length = len(clips[k]) / SAMPLE_RATE
                    start, end = max(0.0, seg.start - starts[k]), min(length, seg.end - starts[k])
                    found[k].append({"start": round(float(start), 3), "end": round(float(end), 3), "text": text})
        return [
            Transcript(
                " ".join(s["text"] for s in segs),
                language,
                1.0,
                round(len(audio) / SAMPLE_RATE, 3),
                segs,
                ns / total if total else 0.0,
            )
            for audio, segs, (ns, total) in zip(clips, found, no_speech, strict=True)
        ]


def decode_channels(data: bytes, timeout_s: float, distinct_below: float = 0.98) -> list[np.ndarray] | Any:
    """The channels of a file as 16 kHz float32 clips (at most two), or a ``MediaError``.

    A file whose channels carry the same signal (mono, or a stereo mix of one source; correlation at or
    above ``distinct_below``) gives one clip, their mean, so only files with distinct channels split."""
    import subprocess

    from synth.media import MediaError, tool_error

    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", "pipe:0", "-map", "0:a:0", "-ac", "2", "-ar", str(SAMPLE_RATE)]
    try:
        proc = subprocess.run(cmd + ["-f", "f32le", "pipe:1"], input=data, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return MediaError("media decode timed out", f"{timeout_s}s")
    if proc.returncode != 0:
        return MediaError("undecodable media", tool_error(proc.stderr))
    pcm = np.frombuffer(proc.stdout, np.float32)
    left, right = pcm[0::2].copy(), pcm[1::2].copy()
    if not len(left) or left.std() == 0 or right.std() == 0:
        return [left + right]  # one channel silent: the other one, unchanged
    if float(np.corrcoef(left, right)[0, 1]) >= distinct_below:
        return [((left + right) / 2).astype(np.float32)]
    return [left, right]
