"""SFT builders: conversations (the ``sft_*`` kinds, docs in pipelines/conversations.py) and ASR pairs
reshaped into the paper's audio SFT data (docs/PAPER.md 7.1): spoken questions, voice-controlled
spoken answers, audio question answering (AQA) and speech-to-text translation (S2TT).

They follow the SFT sample layout: every segment's meta has ``role`` (system | user | assistant) and
``turn`` (the message's 0-based index). Text to be spoken is marked ``speak: true`` (with the voice
in the segment's ``voice`` when the builder chose one) for the ``tts`` step that follows them, which
turns it into an audio segment with ``meta.tts = {voice, text}`` and keeps ``role``/``turn``; then
``tts_backcheck``. A spoken assistant answer keeps its text segment first (the words the speech says)
and adds the spoken copy after it, the layout the trainer's chat template reads. The kind is set
from what the sample will hold once spoken: an assistant turn to be spoken → ``sft_audio_generation``,
else by the media (``sft_video``, ``sft_image_audio``, ``sft_image``, ``sft_audio``, ``sft_text``).

AQA and S2TT take ASR samples (an audio clip and its transcript: the ``asr`` kind, from a source or
from ``build_asr``) and never invent an answer: AQA asks what the speaker says (the transcript is
the answer); S2TT needs the translation in the sample's meta (``translation: {LANG: text}``), and a
sample without one is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.operator import register
from synth.interleave import Builder, BuildError, NotApplicable
from synth.rows import is_source_media, make_segment, seg_meta, stable_fraction

SFT_SOURCE_KINDS = ("sft_text", "sft_image", "sft_video", "sft_audio", "sft_image_audio")
AQA_QUESTIONS = (
    "What does the speaker say?",
    "Please transcribe this recording.",
    "What is said in this audio clip?",
    "Write down exactly what you hear.",
)
S2TT_INSTRUCTIONS = (
    "Translate the speech into {language}.",
    "What does the speaker say, in {language}?",
    "Listen and give the {language} translation.",
)
LANGUAGES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "ru": "Russian",
    "ar": "Arabic",
    "hi": "Hindi",
    "pt": "Portuguese",
}
VOICE_PROMPT = "Answer in speech. voice: {voice}"


def _voice_ok(voice: str) -> str:
    from synth.tts import parse_voice

    try:
        parse_voice(voice)
    except ValueError as e:
        raise BuildError("bad voice", str(e)) from e
    return voice


def _pick(voices: Sequence[str], key: str, salt: str) -> str:
    return voices[int(stable_fraction(key, salt) * len(voices))]


def _role(seg: dict[str, Any]) -> tuple[str | None, Any]:
    meta = seg_meta(seg)
    return meta.get("role"), meta.get("turn")


def sft_kind(segments: list[dict[str, Any]]) -> str:
    """The SFT kind of a conversation once its ``speak`` texts are audio (as pipelines/conversations.py)."""
    audio_like = []
    present = set()
    for seg in segments:
        meta = seg_meta(seg)
        modality = "audio" if seg["modality"] == "text" and meta.get("speak") else seg["modality"]
        present.add(modality)
        if modality == "audio":
            audio_like.append(meta.get("role"))
    if "assistant" in audio_like:
        return "sft_audio_generation"
    if "video" in present:
        return "sft_video"
    if {"image", "audio"} <= present:
        return "sft_image_audio"
    if "image" in present:
        return "sft_image"
    if "audio" in present:
        return "sft_audio"
    return "sft_text"


def speak_answers(segments: list[dict[str, Any]], voice: str | None) -> tuple[list[dict[str, Any]], int]:
    """Each assistant turn's text, then the same words marked to be spoken (with ``voice`` when given),
    after the turn's last text segment; the number of turns marked."""
    last_text: dict[Any, int] = {}
    words: dict[Any, list[str]] = {}
    for i, seg in enumerate(segments):
        role, turn = _role(seg)
        if role == "assistant" and seg["modality"] == "text" and (seg["text"] or "").strip():
            last_text[turn] = i
            words.setdefault(turn, []).append(seg["text"].strip())
    out: list[dict[str, Any]] = []
    ends = {i: turn for turn, i in last_text.items()}
    for i, seg in enumerate(segments):
        out.append(seg)
        if i in ends:
            turn = ends[i]
            meta = {"role": "assistant", "turn": turn, "speak": True, **({"voice": voice} if voice else {})}
            out.append(make_segment("text", text=" ".join(words[turn]), meta=meta))
    return out, len(ends)


def _too_long(segments: list[dict[str, Any]], role: str, max_chars: int) -> bool:
    return any(_role(s)[0] == role and s["modality"] == "text" and len(s["text"] or "") > max_chars for s in segments)


@register
class BuildSpokenQuestions(Builder):
    """Spoken questions (PAPER.md 7.1): every user turn's text of a conversation is marked to be spoken
    by the ``tts`` step, in one voice per sample drawn from ``voices`` by a stable hash of the sample id
    (many voices over the corpus); the answers stay text (``sft_audio``, ``sft_image_audio``) or, with
    ``spoken_answers``, are spoken too (``sft_audio_generation``: in the voice the sample names, else
    one drawn from ``voices``). Role and turn stay on every segment. A conversation with no user text,
    or a turn longer than ``max_chars``, is left as it is.

    Params:
        voices: ``piper:...``/``espeak:...`` voices to draw from, one per sample (null: the ``tts`` step's
            own choice per clip).
        spoken_answers: speak the assistant turns too (the sample becomes ``sft_audio_generation``).
        max_chars: a conversation with a turn to speak longer than this stays text.
    """

    name = "build_spoken_questions"
    kinds = ("sft_text", "sft_image", "sft_video")

    def __init__(
        self,
        voices: Sequence[str] | None = None,
        spoken_answers: bool = False,
        max_chars: int = 600,
        **select: Any,
    ) -> None:
        super().__init__(
            voices=list(voices) if voices else None, spoken_answers=spoken_answers, max_chars=max_chars, **select
        )
        self.voices = [_voice_ok(v) for v in voices or ()]
        self.spoken_answers = bool(spoken_answers)
        self.max_chars = int(max_chars)

    def build(self, row, meta):
        segs = row["segments"]
        users = [i for i, s in enumerate(segs) if _role(s)[0] == "user" and s["modality"] == "text" and s["text"]]
        if not users:
            raise NotApplicable  # nothing to speak (the question already is audio, or only media)
        roles = ("user", "assistant") if self.spoken_answers else ("user",)
        if any(_too_long(segs, r, self.max_chars) for r in roles):
            raise NotApplicable  # stays a text conversation: one clip should be one utterance
        voice = _pick(self.voices, row["id"], "question_voice") if self.voices else None
        out = list(segs)
        for i in users:
            m = {**seg_meta(segs[i]), "speak": True, **({"voice": voice} if voice else {})}
            out[i] = make_segment("text", text=segs[i]["text"], meta=m)
        extra: dict[str, Any] = {"spoken": "questions"}
        if voice:
            extra["question_voice"] = voice
        if self.spoken_answers:
            named = meta.get("voice")
            answer_voice = (
                _voice_ok(named) if named else _pick(self.voices, row["id"], "answer_voice") if self.voices else None
            )
            out, n = speak_answers(out, answer_voice)
            if n:
                extra["spoken"] = "questions_and_answers"
                if answer_voice:
                    extra["answer_voice"] = answer_voice
        return out, sft_kind(out), extra


@register
class BuildVoiceControl(Builder):
    """Audio generation with voice control through the system prompt (PAPER.md 7.1): the voice the
    conversation's system prompt names (sample meta ``voice``, from ``voice: piper:NAME`` in the prompt)
    speaks every assistant turn; a conversation that names none gets one drawn from ``voices`` by a
    stable hash of its id, written into its system prompt as ``voice: NAME`` (a system message is added
    first when it has none, and the turns after it move up by one; a voice from the record's ``voice``
    field is written into the prompt the same way). Each assistant turn keeps its text
    and gets a spoken copy marked with that voice, which the ``tts`` step must use (no fallback voice),
    so ``meta.tts.voice`` of every spoken answer is the prompt's voice. A conversation with no voice
    named and no ``voices`` is left as it is.

    Params:
        voices: voices to assign to conversations whose system prompt names none (null: only those that
            name one are built).
        prompt: the system prompt added when a conversation has none (``{voice}`` is the voice).
        max_chars: a conversation with an answer longer than this stays as it is.
    """

    name = "build_voice_control"
    kinds = SFT_SOURCE_KINDS

    def __init__(
        self, voices: Sequence[str] | None = None, prompt: str = VOICE_PROMPT, max_chars: int = 600, **select: Any
    ) -> None:
        super().__init__(voices=list(voices) if voices else None, prompt=prompt, max_chars=max_chars, **select)
        if "{voice}" not in prompt:
            raise ValueError("prompt must hold {voice}")
        self.voices = [_voice_ok(v) for v in voices or ()]
        self.prompt = prompt
        self.max_chars = int(max_chars)

    def build(self, row, meta):
        from pipelines.conversations import VOICE_IN_PROMPT

        segs = list(row["segments"])
        if not any(_role(s)[0] == "assistant" and s["modality"] == "text" and s["text"] for s in segs):
            raise NotApplicable  # no answer in words to speak
        if _too_long(segs, "assistant", self.max_chars):
            raise NotApplicable
        voice = meta.get("voice")
        extra: dict[str, Any] = {}
        if voice:
            voice = _voice_ok(str(voice))
        elif self.voices:
            voice = _pick(self.voices, row["id"], "control_voice")
        else:
            raise NotApplicable  # no voice to control
        system = next((i for i, s in enumerate(segs) if _role(s)[0] == "system" and s["modality"] == "text"), None)
        if system is not None:
            text = (segs[system]["text"] or "").rstrip()
            named = VOICE_IN_PROMPT.search(text)
            if named and named[1].rstrip(".") != voice:  # a voice the source could not take, or another one
                raise BuildError("bad voice", f"system prompt names {named[1]!r}, the sample {voice!r}")
            if not named:  # the prompt is what selects the voice: it must say so
                sep = "\n" if text else ""
                segs[system] = make_segment("text", text=f"{text}{sep}voice: {voice}", meta=seg_meta(segs[system]))
        else:
            segs = [_shifted(s) for s in segs]
            head = make_segment("text", text=self.prompt.format(voice=voice), meta={"role": "system", "turn": 0})
            segs.insert(0, head)
            extra["turns"] = int(meta.get("turns") or 0) + 1
        out, _ = speak_answers(segs, voice)
        return out, "sft_audio_generation", {**extra, "voice": voice, "spoken": "answers"}


def _shifted(seg: dict[str, Any]) -> dict[str, Any]:
    meta = seg_meta(seg)
    if isinstance(meta.get("turn"), int):
        meta["turn"] += 1
    return make_segment(seg["modality"], text=seg["text"], data=seg["bytes"], uri=seg["uri"], meta=meta)


class _FromASR(Builder):
    """An ASR pair (the source audio and its transcript) → a two-turn audio conversation."""

    kinds = ("asr",)

    def selected(self, row: dict[str, Any], meta: dict[str, Any]) -> bool:
        if meta.get("built_by") not in (None, "build_asr"):  # build_asr's pairs are ASR samples too
            return False
        return super().selected(row, {k: v for k, v in meta.items() if k != "built_by"})

    def pair(self, row: dict[str, Any]) -> tuple[dict[str, Any], str]:
        segs = row["segments"]
        audio = next((s for s in segs if is_source_media(s, "audio")), None)
        if audio is None:
            raise BuildError("no audio")
        words = " ".join(s["text"].strip() for s in segs if s["modality"] == "text" and (s["text"] or "").strip())
        if not words:
            words = str((seg_meta(audio).get("asr") or {}).get("text") or "").strip()
        if not words:
            raise BuildError("no transcript", "an ASR sample with no transcript text (run transcribe or build_asr)")
        return audio, words

    def conversation(
        self, row: dict[str, Any], audio: dict[str, Any], question: str, answer: str, answer_meta: dict[str, Any]
    ) -> list[dict[str, Any]]:
        user = {"role": "user", "turn": 0}
        a = seg_meta(audio)
        a.update(user)
        return [
            make_segment("audio", data=audio["bytes"], uri=audio["uri"], meta=a),
            make_segment("text", text=question, meta=dict(user)),
            make_segment("text", text=answer, meta={"role": "assistant", "turn": 1, **answer_meta}),
        ]


@register
class BuildAQA(_FromASR):
    """Audio question answering from ASR pairs: the user turn is the clip and a question about it whose
    answer the pair holds (what the speaker says); the assistant answers with the transcript.
    ``sft_audio`` with ``meta.sft_task: aqa``.

    Params:
        questions: the questions to choose from (a stable hash of the sample id picks one); each must be
            answered by the transcript.
    """

    name = "build_aqa"

    def __init__(self, questions: Sequence[str] = AQA_QUESTIONS, **select: Any) -> None:
        super().__init__(questions=list(questions), **select)
        if not questions:
            raise ValueError("questions must not be empty")
        self.questions = list(questions)

    def build(self, row, meta):
        audio, words = self.pair(row)
        question = _pick(self.questions, row["id"], "aqa")
        segs = self.conversation(row, audio, question, words, {"answer_from": "transcript"})
        return segs, "sft_audio", {"sft_task": "aqa", "turns": 2, "format": "aqa", "category": None}


@register
class BuildS2TT(_FromASR):
    """Speech-to-text translation from ASR pairs that carry a translation (sample meta ``translation:
    {LANG: text}``, e.g. from a parallel corpus): the user turn is the clip and an instruction to
    translate into that language, the assistant's answer the translation. A sample without one (or
    without the ``target`` language) is left as it is: no translation is ever made up. ``sft_audio``
    with ``meta.sft_task: s2tt``.

    Params:
        target: the translation language to use (null: the first the sample has, by name).
        instructions: instruction templates (``{language}`` is the language's English name), one picked
            by a stable hash of the sample id.
    """

    name = "build_s2tt"

    def __init__(
        self, target: str | None = None, instructions: Sequence[str] = S2TT_INSTRUCTIONS, **select: Any
    ) -> None:
        super().__init__(target=target, instructions=list(instructions), **select)
        if not instructions:
            raise ValueError("instructions must not be empty")
        self.target = target
        self.instructions = list(instructions)

    def build(self, row, meta):
        translations = meta.get("translation")
        if not isinstance(translations, dict) or not translations:
            raise NotApplicable  # no translation: stays an ASR pair
        lang = self.target if self.target is not None else sorted(translations)[0]
        text = translations.get(lang)
        if text is None:
            raise NotApplicable
        if not isinstance(text, str) or not text.strip():
            raise BuildError("bad translation", f"translation.{lang} is not a non-empty string")
        audio, words = self.pair(row)
        language = LANGUAGES.get(str(lang).lower(), str(lang))
        instruction = _pick(self.instructions, row["id"], "s2tt").format(language=language)
        answer_meta = {"answer_from": f"translation.{lang}", "lang": str(lang)}
        segs = self.conversation(row, audio, instruction, text.strip(), answer_meta)
        extra = {"sft_task": "s2tt", "turns": 2, "format": "s2tt", "category": None, "target_lang": str(lang)}
        return segs, "sft_audio", {**extra, "transcript": words}
