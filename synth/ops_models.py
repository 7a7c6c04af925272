"""Model-holding operators: ``transcribe``, ``caption``, ``tts``, ``tts_backcheck``.

Each loads its model in ``setup()`` (once per Ray actor), runs a whole Arrow batch through one
batched call, and writes results into segment metadata (see ``synth.rows``). Model paths come from
params (local paths only); the defaults are the real small models PyPI packages ship. Each has a
``*_gpu`` twin that asks Ray for one GPU (resources are declared per class, so the recipe chooses
by name); the models move to CUDA by themselves when one is visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from pipelines.operator import Operator, Resources, Threshold, register, with_rejections
from shards.schema import dumps_meta
from synth.avtools import ASR_SAMPLE_RATE, decode_audio_batch, wav_bytes
from synth.media import DEFAULT_TIMEOUT_S, MediaError
from synth.ops_media import media_bytes
from synth.rows import is_source_media, replace_samples, seg_meta, with_meta
from synth.text import word_error_rate


def gpu_twin(cls: type[Operator]) -> type[Operator]:
    """Register ``<name>_gpu``: the same operator asking Ray for one GPU per actor."""
    twin = type(f"{cls.__name__}GPU", (cls,), {"name": f"{cls.name}_gpu", "resources": Resources(cpus=1, gpus=1)})
    register(twin)
    return cls


def _model_label(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "data") else p.name


# ---------------------------------------------------------------- transcribe


@gpu_twin
@register
class Transcribe(Operator):
    """Whisper transcripts of audio segments and of videos' audio tracks, into ``meta.asr``.

    The multilingual ``model`` detects the spoken language of every clip (``meta.lang``, ``meta.lang_prob``
    and ``asr.language``), because an English-only whisper calls everything English. Speech detected as
    English goes to ``english_model`` (``"tiny.en"``: the packaged one; a path; ``null``: ``model`` itself),
    the rest to ``model`` (``"base"``, the default, or a local CTranslate2 whisper directory).
    A detection under ``min_language_probability`` is unsure: the clip never goes to the English-only
    model, and its ``meta.lang`` is ``und`` (``asr.language`` keeps whisper's guess and probability).
    A language outside ``languages`` (a list; ``null`` allows all) is rejected as
    ``language not supported by model``. Mandarin transcripts are written in ``chinese_script``
    (``simplified``, the paper's corpus; ``traditional``; ``null``: as whisper wrote them, which mixes both).
    Every transcript is scored for whisper's loops (``asr.guard``)
    and rejected as ``hallucinated transcript`` above ``max_compression_ratio``, ``max_repeated_ngram_ratio``
    or ``max_no_speech_prob`` (``null`` only scores). ``channels: split`` transcribes the two channels of
    a stereo file with distinct content apart (``asr.channels``: one transcript each, left then right).
    A video without an audio track gets no transcript; undecodable audio rejects the sample.

    Params:
        model: the multilingual whisper: ``base`` (the packaged one, the default) or a local CTranslate2
            whisper directory.
        english_model: for speech detected as English: ``tiny.en`` (packaged), a path, or null (``model``).
        languages: the languages kept; another is rejected as ``language not supported by model`` (null: all).
        min_language_probability: a detection less sure than this is ``und`` and stays off the English model.
        chinese_script: Mandarin transcripts in ``simplified`` or ``traditional`` characters (null: as
            whisper wrote them).
        max_compression_ratio: a transcript compressing better than this (a loop) is ``hallucinated
            transcript`` (null: only scored).
        max_repeated_ngram_ratio: the share of repeated n-grams above which a transcript is ``hallucinated
            transcript`` (null: only scored).
        max_no_speech_prob: whisper's no-speech probability above which a transcript is ``hallucinated
            transcript`` (null: only scored).
        channels: ``mix`` (one transcript) or ``split`` (a stereo file's channels apart).
        batch_size: clips decoded per model call.
        beam_size: whisper's beam width (1: greedy).
        timestamps: keep per-segment start and end times in ``asr.segments``.
        language: force this language and skip detection.
        compute_type: CTranslate2 compute type (``default``, ``int8``, ``float16``...).
        cpu_threads: CTranslate2 threads (0: its default).
        timeout_s: seconds per audio decode.
        overwrite: transcribe segments that already have ``meta.asr``.
    """

    name = "transcribe"
    stateful = True
    resources = Resources(cpus=1)
    param_ranges = {
        "max_compression_ratio": (0, None),
        "max_repeated_ngram_ratio": (0, 1),
        "max_no_speech_prob": (0, 1),
        "min_language_probability": (0, 1),
    }

    def __init__(
        self,
        model: str | None = None,
        english_model: str | None = "tiny.en",
        languages: list[str] | None = None,
        min_language_probability: float | None = 0.5,
        chinese_script: Literal["simplified", "traditional"] | None = "simplified",
        max_compression_ratio: float | None = 2.4,
        max_repeated_ngram_ratio: float | None = 0.5,
        max_no_speech_prob: float | None = 0.8,
        channels: Literal["mix", "split"] = "mix",
        batch_size: int = 8,
        beam_size: int = 1,
        timestamps: bool = True,
        language: str | None = None,
        compute_type: str = "default",
        cpu_threads: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        overwrite: bool = False,
    ) -> None:
        if channels not in ("mix", "split"):
            raise ValueError(f"channels must be 'mix' or 'split', got {channels!r}")
        if chinese_script not in ("simplified", "traditional", None):
            raise ValueError(f"chinese_script must be 'simplified', 'traditional' or null, got {chinese_script!r}")
        super().__init__(
            model=model,
            english_model=english_model,
            languages=languages,
            min_language_probability=min_language_probability,
            chinese_script=chinese_script,
            max_compression_ratio=max_compression_ratio,
            max_repeated_ngram_ratio=max_repeated_ngram_ratio,
            max_no_speech_prob=max_no_speech_prob,
            channels=channels,
            batch_size=batch_size,
            beam_size=beam_size,
            timestamps=timestamps,
            language=language,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            timeout_s=timeout_s,
            overwrite=overwrite,
        )
        self.timeout_s, self.overwrite = float(timeout_s), bool(overwrite)
        self.languages = None if languages is None else {str(lang) for lang in languages}
        self.min_language_probability = float(min_language_probability or 0.0)
        self.chinese: Any = None
        self.limits = {
            "compression_ratio": max_compression_ratio,
            "repeated_ngram_ratio": max_repeated_ngram_ratio,
            "no_speech_prob": max_no_speech_prob,
        }
        self.transcriber: Any = None
        self.english: Any = None

    def setup(self) -> None:
        from synth.asr import Transcriber
        from synth.models import whisper_model_dir, whisper_multilingual_dir

        p = self.params
        common = {
            "compute_type": p["compute_type"],
            "cpu_threads": int(p["cpu_threads"]),
            "batch_size": int(p["batch_size"]),
            "beam_size": int(p["beam_size"]),
            "timestamps": bool(p["timestamps"]),
            "language": p["language"],
        }
        self.transcriber = Transcriber(whisper_multilingual_dir(p["model"]), **common)
        english = p["english_model"]
        english_dir = None if english is None else whisper_model_dir(None if english == "tiny.en" else english)
        self.english = self.transcriber
        if english_dir is not None and english_dir != self.transcriber.model_dir:
            self.english = Transcriber(english_dir, **common)
        self.label = _model_label(self.transcriber.model_dir)
        self.english_label = _model_label(self.english.model_dir)
        if p["chinese_script"]:
            from opencc import OpenCC

            self.chinese = OpenCC("t2s" if p["chinese_script"] == "simplified" else "s2t")

    def _targets(self, rows: list[list[dict[str, Any]]]) -> list[tuple[int, int, int]]:
        """(row, segment to annotate, segment to read audio from) for every segment that needs a transcript."""
        out = []
        for r, segs in enumerate(rows):
            for i, seg in enumerate(segs):
                meta = seg_meta(seg)
                if "asr" in meta and not self.overwrite:
                    continue
                if is_source_media(seg, "audio"):
                    nxt = i + 1 < len(segs) and seg_meta(segs[i + 1]).get("role") == "asr_input"
                    out.append((r, i, i + 1 if nxt else i))
                elif is_source_media(seg, "video") and meta.get("has_audio", True):
                    out.append((r, i, i))
        return out

    def _decode(self, items: list[bytes]) -> list[list[Any] | MediaError]:
        """Per item, the clips to transcribe: the mono mix, or each distinct channel with ``channels: split``."""
        if self.params["channels"] == "mix":
            return [
                a if isinstance(a, MediaError) else [a]
                for a in decode_audio_batch(items, ASR_SAMPLE_RATE, self.timeout_s)
            ]
        from synth.asr import decode_channels

        return [decode_channels(data, self.timeout_s) for data in items]

    def transcribe_clips(self, clips: Sequence[Any]) -> list[tuple[Any, str] | str]:
        """Per clip, (transcript, model label), or why its language is not supported: detect, then route.

        Detection always uses the multilingual model: an English-only one reports English for anything."""
        detected = [self.transcriber.detect_language(a) if len(a) else ("", 0.0) for a in clips]
        allowed = sorted(self.languages or ())
        out: list[tuple[Any, str] | str] = [
            f"detected {lang!r} (p={prob:.2f}); languages: {allowed}" for lang, prob in detected
        ]
        sure = [prob >= self.min_language_probability for _, prob in detected]
        english = [i for i, (lang, _) in enumerate(detected) if lang == "en" and sure[i] and self._allowed(lang)]
        routed = set(english)
        other = [i for i, (lang, _) in enumerate(detected) if i not in routed and self._allowed(lang)]
        for members, transcriber, label in (
            (english, self.english, self.english_label),
            (other, self.transcriber, self.label),
        ):
            found = transcriber.transcribe_many([clips[i] for i in members], [detected[i] for i in members])
            for i, tr in zip(members, found, strict=True):
                out[i] = (self._script(tr), label)
        return out

    def _script(self, tr: Any) -> Any:
        """``tr`` with its Mandarin text in ``chinese_script``: whisper writes simplified and traditional alike."""
        if self.chinese is None or tr.language != "zh":
            return tr
        tr.text = self.chinese.convert(tr.text)
        tr.segments = [{**s, "text": self.chinese.convert(s["text"])} for s in tr.segments]
        return tr

    def _allowed(self, language: str) -> bool:
        return not language or self.languages is None or language in self.languages

    def _guard(self, tr: Any) -> str | None:
        """Why ``tr`` looks like a whisper loop (the first score over its limit), or None."""
        scores = tr.guard_scores()
        for key, limit in self.limits.items():
            if limit is not None and tr.text and scores[key] > float(limit):
                return f"{key}={scores[key]} > {limit}"
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.transcriber is None:
            self.setup()
        rows = batch["segments"].to_pylist()
        targets = self._targets(rows)
        decoded = self._decode([media_bytes(rows[r][src]) for r, _, src in targets])
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        good = []
        for (r, i, _), audio in zip(targets, decoded, strict=True):
            if isinstance(audio, MediaError):
                if rows[r][i]["modality"] == "video" and "has_audio" not in seg_meta(rows[r][i]):
                    continue  # an unprobed video may simply have no audio track
                reasons[r], details[r] = audio.reason, f"segment {i}: {audio.detail}"[:500]
            else:
                good.append((r, i, audio))
        results = iter(self.transcribe_clips([clip for _, _, clips in good for clip in clips]))
        for r, i, clips in good:
            found = [next(results) for _ in clips]
            metas = []
            for c, res in enumerate(found):
                if isinstance(res, str):
                    if reasons[r] is None:
                        reasons[r], details[r] = "language not supported by model", f"segment {i} channel {c}: {res}"
                    continue
                tr, label = res
                metas.append(tr.as_meta(label))
                why = self._guard(tr)
                if why and reasons[r] is None:
                    reasons[r], details[r] = "hallucinated transcript", f"segment {i}: {why} heard={tr.text[:200]!r}"
            if len(metas) != len(clips):
                continue
            best = max(metas, key=lambda m: m["language_probability"])
            asr = (
                metas[0]
                if len(metas) == 1
                else {
                    "text": "\n".join(m["text"] for m in metas),
                    "language": best["language"],
                    "language_probability": best["language_probability"],
                    "channels": metas,
                }
            )
            lang = best["language"] or None  # no speech: no language
            prob = best["language_probability"] if lang else None
            if lang and prob < self.min_language_probability:
                lang = "und"  # whisper's guess stays in asr.language; a language filter must not trust it
            rows[r][i] = with_meta(rows[r][i], asr=asr, lang=lang, lang_prob=prob)
        return with_rejections(replace_samples(batch, rows), reasons, details)


# ---------------------------------------------------------------- caption


@gpu_twin
@register
class Caption(Operator):
    """CoCa captions of images and video keyframes, into ``meta.caption``.

    Sampled captions are seeded per image by ``seed`` and ``<sample id>/<segment index>``, so they
    repeat in every run. Undecodable images reject the sample.

    Params:
        config: an open_clip architecture name or a config .json.
        checkpoint: the CoCa weights (a local file).
        batch_size: images captioned per call.
        generation_type: ``beam_search``, ``top_k`` or ``top_p``.
        seq_len: the longest caption, in tokens.
        num_beams: beams for ``beam_search``.
        top_k: candidates per token for ``top_k`` sampling.
        seed: the seed of sampled captions.
        threads: torch CPU threads while captioning (the one CPU the step reserves; captions do not
            depend on it).
        overwrite: caption images that already have ``meta.caption``.
    """

    name = "caption"
    stateful = True
    resources = Resources(cpus=1)

    def __init__(
        self,
        config: str = "coca_ViT-B-32",
        checkpoint: str | None = None,
        batch_size: int = 16,
        generation_type: str = "beam_search",
        seq_len: int = 30,
        num_beams: int = 6,
        top_k: int = 1,
        seed: int = 0,
        threads: int = 1,
        overwrite: bool = False,
    ) -> None:
        super().__init__(
            config=config,
            checkpoint=checkpoint,
            batch_size=batch_size,
            generation_type=generation_type,
            seq_len=seq_len,
            num_beams=num_beams,
            top_k=top_k,
            seed=seed,
            threads=threads,
            overwrite=overwrite,
        )
        if not checkpoint:
            raise ValueError("caption needs a local CoCa checkpoint path (no weights are downloaded)")
        self.overwrite = bool(overwrite)
        self.captioner: Any = None

    def setup(self) -> None:
        from synth.caption import Captioner

        p = self.params
        self.captioner = Captioner(
            p["config"],
            p["checkpoint"],
            batch_size=int(p["batch_size"]),
            generation_type=p["generation_type"],
            seq_len=int(p["seq_len"]),
            num_beams=int(p["num_beams"]),
            top_k=int(p["top_k"]),
            seed=int(p["seed"]),
            threads=int(p["threads"]) or None,
        )
        self.label = Path(p["checkpoint"]).name

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.captioner is None:
            self.setup()
        from synth.caption import to_pil

        rows = batch["segments"].to_pylist()
        ids = batch["id"].to_pylist()
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        targets, images = [], []
        for r, segs in enumerate(rows):
            for i, seg in enumerate(segs):
                if seg["modality"] != "image" or ("caption" in seg_meta(seg) and not self.overwrite):
                    continue
                try:
                    images.append(to_pil(media_bytes(seg)))
                    targets.append((r, i))
                except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
                    reasons[r], details[r] = "undecodable image", f"segment {i}: {type(e).__name__}: {e}"[:500]
        keep = [k for k, (r, _) in enumerate(targets) if reasons[r] is None]
        keys = [f"{ids[targets[k][0]]}/{targets[k][1]}" for k in keep]
        captions = self.captioner.caption([images[k] for k in keep], keys)
        for k, text in zip(keep, captions, strict=True):
            r, i = targets[k]
            rows[r][i] = with_meta(rows[r][i], caption=text, caption_model=self.label)
        return with_rejections(replace_samples(batch, rows), reasons, details)


# ---------------------------------------------------------------- tts


@register
class TTS(Operator):
    """Speaks every text segment a builder marked ``speak``: it becomes an audio segment (WAV) with
    ``meta.tts = {voice, text}``, in the same place.

    The voice of a clip is a hash of the sample id and segment index, unless the segment names its
    own (``meta.voice``, e.g. the voice a system prompt asks for): then that voice speaks it, with no
    fallback (a clip it cannot speak rejects the sample), and ``meta.tts.voice`` is that voice.

    Params:
        voices: ``piper:...`` / ``espeak:...`` voices to choose from (default the packaged piper voice).
        fallback: the voice used when one fails (null: reject instead).
        length_scale: speaking rate (above 1: slower; null: the voice's own).
        threads: ONNX Runtime threads per piper voice (its output depends on the count, so it is fixed,
            not the machine's core count).
    """

    name = "tts"
    stateful = True
    resources = Resources(cpus=1)

    def __init__(
        self,
        voices: Sequence[str] | None = None,
        fallback: str | None = "espeak:en-us",
        length_scale: float | None = None,
        threads: int = 1,
    ) -> None:
        from synth.tts import DEFAULT_VOICES, parse_voice

        voices = list(voices or DEFAULT_VOICES)
        for v in [*voices, *([fallback] if fallback else [])]:
            parse_voice(v)
        super().__init__(voices=voices, fallback=fallback, length_scale=length_scale, threads=threads)
        self.speaker: Any = None

    def setup(self) -> None:
        from synth.tts import Speaker

        p = self.params
        self.speaker = Speaker(p["voices"], p["fallback"], p["length_scale"], int(p["threads"]))
        self.speaker.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.speaker is None:
            self.setup()
        from synth.tts import TTSError

        rows = batch["segments"].to_pylist()
        ids = batch["id"].to_pylist()
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        for r, segs in enumerate(rows):
            for i, seg in enumerate(segs):
                meta = seg_meta(seg)
                if seg["modality"] != "text" or not meta.get("speak"):
                    continue
                named = meta.get("voice")  # a builder's choice (a voice-control prompt's): that voice only
                try:
                    speech = self.speaker.speak(seg["text"], key=f"{ids[r]}/{i}", voice=named)
                except TTSError as e:
                    reasons[r], details[r] = "tts failed", f"segment {i}: {e}"[:500]
                    break
                rest = {k: v for k, v in meta.items() if k not in ("speak", "voice")}
                info = {"voice": speech.voice, "text": seg["text"]}
                audio_meta = {**rest, "tts": info, "ext": "wav", "sample_rate": speech.sample_rate}
                audio_meta["duration"] = round(speech.duration, 3)
                segs[i] = {
                    "modality": "audio",
                    "text": None,
                    "bytes": wav_bytes(speech.samples, speech.sample_rate),
                    "uri": None,
                    "meta": dumps_meta(audio_meta),
                }
        return with_rejections(replace_samples(batch, rows), reasons, details)


@gpu_twin
@register
class TTSBackcheck(Operator):
    """The paper's ASR back-check: transcribe every synthesized clip, score it by WER against the text
    it speaks (``meta.tts.backcheck`` and a ``tts_wer`` column: the worst clip of the sample), and
    reject samples above ``max_wer`` (``null`` only scores, for tuning the threshold from a histogram).

    Params:
        max_wer: a sample whose worst clip's WER is above this is rejected (null: only scored).
        model: the whisper that listens (as ``transcribe``'s ``model``).
        batch_size: clips decoded per model call.
        beam_size: whisper's beam width (1: greedy).
        compute_type: CTranslate2 compute type (``default``, ``int8``, ``float16``...).
        cpu_threads: CTranslate2 threads (0: its default).
        timeout_s: seconds per audio decode.
    """

    name = "tts_backcheck"
    stateful = True
    resources = Resources(cpus=1)

    def __init__(
        self,
        max_wer: float | None = 0.1,
        model: str | None = None,
        batch_size: int = 8,
        beam_size: int = 1,
        compute_type: str = "default",
        cpu_threads: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(
            max_wer=max_wer,
            model=model,
            batch_size=batch_size,
            beam_size=beam_size,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            timeout_s=timeout_s,
        )
        self.max_wer = None if max_wer is None else float(max_wer)
        self.timeout_s = float(timeout_s)
        self.transcriber: Any = None

    def setup(self) -> None:
        from synth.asr import Transcriber

        p = self.params
        self.transcriber = Transcriber(
            p["model"],
            compute_type=p["compute_type"],
            cpu_threads=int(p["cpu_threads"]),
            batch_size=int(p["batch_size"]),
            beam_size=int(p["beam_size"]),
            timestamps=False,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.transcriber is None:
            self.setup()
        rows = batch["segments"].to_pylist()
        targets = [
            (r, i)
            for r, segs in enumerate(rows)
            for i, seg in enumerate(segs)
            if seg["modality"] == "audio" and "tts" in seg_meta(seg)
        ]
        decoded = decode_audio_batch([rows[r][i]["bytes"] for r, i in targets], ASR_SAMPLE_RATE, self.timeout_s)
        worst: list[float | None] = [None] * len(rows)
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        good = []
        for (r, i), audio in zip(targets, decoded, strict=True):
            if isinstance(audio, MediaError):
                reasons[r], details[r] = audio.reason, f"segment {i}: {audio.detail}"[:500]
            else:
                good.append((r, i, audio))
        for (r, i, _), tr in zip(good, self.transcriber.transcribe_many([a for _, _, a in good]), strict=True):
            meta = seg_meta(rows[r][i])
            wer = round(word_error_rate(meta["tts"]["text"], tr.text), 4)
            rows[r][i] = with_meta(rows[r][i], tts={**meta["tts"], "backcheck": {"text": tr.text, "wer": wer}})
            if worst[r] is None or wer > worst[r]:
                worst[r] = wer
                if self.max_wer is not None and wer > self.max_wer and reasons[r] in (None, "tts back-check failed"):
                    reasons[r] = "tts back-check failed"
                    details[r] = (
                        f"wer={wer} > {self.max_wer} segment {i} voice={meta['tts']['voice']} heard={tr.text!r}"[:500]
                    )
        out = replace_samples(batch, rows).append_column("tts_wer", pa.array(worst, pa.float64()))
        return with_rejections(out, reasons, details)

    def score_columns(self) -> list[str]:
        return ["tts_wer"]

    def thresholds(self) -> list[Threshold]:
        return [] if self.max_wer is None else [Threshold("tts_wer", "max", self.max_wer, "tts back-check failed")]
