"""The audio stages' clip loader on real recorded speech in shards: shapes that line up (Whisper mel,
24 kHz target mel and waveform at one frame rate), transcripts that belong to their clip, hostile
samples counted as skips, an exact resume, and the stage configs that select the audio tasks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.demo_data import asterisk_prompts, espeak, piper_speech
from shards.manifest import write_shardset_manifest
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter
from trainer.audio_data import collate_clips, make_clip_loader
from trainer.data import resolve_entry
from trainer.stages import StageError, load_model_config, load_stage

SOURCE = "audio-data-test"


def _ffmpeg_tone(seconds: float) -> bytes:
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-f", "wav", "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def clips_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[tuple[Path, str]]]:
    prompts = asterisk_prompts(limit=6)
    rows = [
        make_sample(SOURCE, "asr", [Segment("audio", bytes=w.read_bytes()), Segment("text", text=t)], f"asr/{i}")
        for i, (w, t) in enumerate(prompts[:4])
    ]
    (a, a_text), (_, b_text) = prompts[4], prompts[5]
    rows.append(  # interleaved: the clip's own words come from its meta, not from the neighbouring text
        make_sample(
            SOURCE,
            "speech_text_interleaved",
            [
                Segment("audio", bytes=a.read_bytes(), meta={"tts": {"text": a_text}}),
                Segment("text", text=b_text),
            ],
            "intlv/0",
        )
    )
    root = tmp_path_factory.mktemp("clips")
    spoken = [  # Mandarin (espeak-ng) and a neural English voice (piper) beside the recorded prompts
        (espeak("今天天气很好，我们去公园散步。", "cmn", root / "zh.wav"), "今天天气很好，我们去公园散步。"),
        (piper_speech("The library opens at nine.", root / "en.wav"), "The library opens at nine."),
    ]
    rows += [
        make_sample(SOURCE, "asr", [Segment("audio", bytes=w.read_bytes()), Segment("text", text=t)], f"tts/{i}")
        for i, (w, t) in enumerate(spoken)
    ]
    prompts = prompts + spoken
    rows.append(
        make_sample(SOURCE, "asr", [Segment("audio", bytes=b"RIFF not a wav"), Segment("text", text="x")], "bad")
    )
    rows.append(
        make_sample(SOURCE, "asr", [Segment("audio", bytes=_ffmpeg_tone(0.1)), Segment("text", text="y")], "short")
    )
    rows.append(make_sample(SOURCE, "asr", [Segment("text", text="a transcript without its audio")], "noaudio"))
    written = ShardWriter(str(root / "shards"), "clips", max_samples=3).write_all(rows)
    return write_shardset_manifest(str(root / "shards"), written), prompts


def _loader(manifest: str, max_seconds: float = 30.0, state=None, batch: int = 2):
    entry = resolve_entry({"name": "speech", "manifest": manifest, "kinds": ["asr", "speech_text_interleaved"]})
    return make_clip_loader([entry], load_model_config("tiny"), max_seconds, batch, 5, 0, 1, 0, state)


def test_clips_line_up_and_keep_their_own_words(clips_manifest) -> None:
    manifest, prompts = clips_manifest
    words = {t for _, t in prompts}
    it = iter(_loader(manifest))
    seen: dict[str, str] = {}
    for _ in range(5):
        b = next(it)
        n, t = b["whisper_mel"].shape[0], b["whisper_mel"].shape[-1]
        assert (
            b["whisper_mel"].shape[1] == 128 and b["target_mel"].shape == (n, 80, t) and b["wave"].shape == (n, t * 240)
        )
        assert int(b["mel_len"].max()) == t and torch.equal(b["wave_len"], b["mel_len"] * 240)
        for i in range(n):  # padding: zeros in the Whisper mel and the wave, log(1e-5) in the target mel
            m = int(b["mel_len"][i])
            assert torch.all(b["target_mel"][i, :, m:] == float(np.log(1e-5))) and torch.all(
                b["wave"][i, m * 240 :] == 0
            )
            assert float(b["wave"][i, : m * 240].abs().max()) > 0.01, "real speech, not silence"
        for ids, text in zip(b["meta"]["sample_ids"], b["text"], strict=True):
            seen[ids[0]] = text
        assert b["meta"]["tokens"] == int(((b["mel_len"] + 7) // 8).sum())
    assert set(seen.values()) == words - {prompts[5][1]}, "every clip with its own words (the neighbour's are not)"
    skipped = b["meta"]["state"]["skipped"]
    assert skipped == {"undecodable media": 1, "audio too short": 1, "no audio segment": 1}


def test_a_clip_cut_at_max_seconds_drops_its_transcript(clips_manifest) -> None:
    b = next(iter(_loader(clips_manifest[0], max_seconds=1.0, batch=3)))
    assert int(b["mel_len"].max()) <= 100 and b["text"] == ["", "", ""]


def test_the_clip_loader_resumes_exactly(clips_manifest) -> None:
    manifest = clips_manifest[0]
    it = iter(_loader(manifest))
    first = next(it)
    rest = [next(it) for _ in range(3)]
    resumed = iter(
        _loader(
            manifest, state={"world": 1, "num_workers": 1, "microbatches": 1, "workers": {"0": first["meta"]["state"]}}
        )
    )
    for want in rest:
        got = next(resumed)
        assert got["meta"]["sample_ids"] == want["meta"]["sample_ids"]
        assert torch.equal(got["target_mel"], want["target_mel"])


def test_collate_pads_to_the_longest_clip() -> None:
    clips = [
        {
            "id": str(n),
            "whisper_mel": np.ones((128, n), np.float32),
            "target_mel": np.zeros((80, n), np.float32),
            "wave": np.ones(n * 240, np.float32),
            "text": str(n),
        }
        for n in (3, 7)
    ]
    b = collate_clips([(c, {"worker": 0}) for c in clips])
    assert b["whisper_mel"].shape == (2, 128, 7) and b["mel_len"].tolist() == [3, 7] and b["meta"]["samples"] == 2


def test_stage_configs_select_the_audio_tasks(tmp_path: Path) -> None:
    s = load_stage(Path(__file__).resolve().parents[1] / "conf" / "stages" / "0.2-flow-decoder.yaml")
    assert (s.task, s.is_audio, s.audio_tokenizer_from) == ("flow_decoder", True, "0.1")
    assert s.audio_tokenizer_weights() == Path(s.output) / "0.1" / "final" / "model.pt"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "stage: '0.1'\nmodel: tiny\ntask: audio_tokeniser\nlr: 1e-3\nmixture: [{manifest: x}]\nbudget: {steps: 1}\n"
    )
    with pytest.raises(StageError, match="task must be llm or one of audio_tokenizer, flow_decoder, vocoder"):
        load_stage(bad)
    bad.write_text(
        "stage: '0.1'\nmodel: tiny\ntask: vocoder\ntask_args: [1]\nlr: 1\nmixture: [{a: x}]\nbudget: {steps: 1}\n"
    )
    with pytest.raises(StageError, match="task_args must be a mapping"):
        load_stage(bad)
