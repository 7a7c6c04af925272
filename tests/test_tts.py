"""TTS: piper (a real neural voice from PyPI) checked by real whisper; espeak-ng fallback, voices, back-check."""

from __future__ import annotations

import pytest

from pipelines.operator import get_operator, split_rejected
from shards.schema import dumps_meta, loads_meta, make_sample, samples_table
from synth.avtools import decode_audio_batch, wav_bytes
from synth.rows import make_segment
from synth.text import word_error_rate
from synth.tts import Speaker, pick, voice_list

SENTENCE = "Please enter your password followed by the pound key."


@pytest.fixture(scope="module")
def transcriber():
    from synth.asr import Transcriber

    return Transcriber()


def test_piper_speech_is_understood_by_whisper(transcriber) -> None:
    speaker = Speaker(["piper:joe"], fallback=None)
    speech = speaker.speak(SENTENCE, key="a")
    assert speech.voice == "piper:joe" and speech.sample_rate == 22050 and 1.5 < speech.duration < 8
    again = speaker.speak(SENTENCE, key="b")
    assert (again.samples == speech.samples).all()  # deterministic: noise scales are 0
    [audio] = decode_audio_batch([wav_bytes(speech.samples, speech.sample_rate)])
    [heard] = transcriber.transcribe_many([audio])
    assert word_error_rate(SENTENCE, heard.text) <= 0.1, heard.text


def test_espeak_fallback_and_voice_lists() -> None:
    speaker = Speaker(["piper:/nonexistent/voice.onnx"], fallback="espeak:en-gb+f3")
    speech = speaker.speak("Hello there.", key="x")
    assert speech.voice == "espeak:en-gb+f3" and speech.duration > 0.3
    voices = voice_list(44)
    assert len(set(voices)) == 44 and voices[0] == "piper:joe"
    chosen = [pick(voices, f"sample-{i}") for i in range(2000)]
    assert chosen == [pick(voices, f"sample-{i}") for i in range(2000)]  # stable
    assert len(set(chosen)) == 44  # and every voice gets used
    with pytest.raises(ValueError):
        Speaker(["festival:kal"])


def test_tts_op_and_backcheck_reject_above_threshold() -> None:
    def sample(locator: str, text: str):
        segs = [make_segment("text", text=text), make_segment("text", text=text, meta={"speak": True})]
        row = make_sample("t", "tts", [], locator)
        return {**row, "segments": segs}

    table = samples_table([sample("good", SENTENCE), sample("bad", "All circuits are busy now.")])
    tts = get_operator("tts")(voices=["piper:joe"])
    spoken = tts(table).drop_columns(["reason", "detail"])
    segs = spoken["segments"].to_pylist()
    assert [s["modality"] for s in segs[0]] == ["text", "audio"]
    assert loads_meta(segs[0][1]["meta"])["tts"] == {"voice": "piper:joe", "text": SENTENCE}
    # the "bad" clip claims to say something it does not: the back-check must catch it
    meta = loads_meta(segs[1][1]["meta"])
    segs[1][1]["meta"] = dumps_meta({**meta, "tts": {**meta["tts"], "text": "The weather is lovely in Spain today."}})
    from synth.rows import replace_samples

    check = get_operator("tts_backcheck")(max_wer=0.1)
    kept, rejected = split_rejected(check(replace_samples(spoken, segs)))
    assert kept["tts_wer"].to_pylist()[0] <= 0.1
    assert loads_meta(kept["segments"].to_pylist()[0][1]["meta"])["tts"]["backcheck"]["wer"] <= 0.1
    assert rejected["reason"].to_pylist() == ["tts back-check failed"]
    assert rejected["detail"].to_pylist()[0].startswith("wer=") and rejected["tts_wer"].to_pylist()[0] > 0.5
