"""Deterministic bytes: every media step writes the same bytes in every run, and the whole demo recipe
(every synth step: keyframes, whisper, CoCa top-k captions, the Matroska audio track, piper TTS) run
twice writes byte-identical shards and the same rejects ledger. Kill/resume byte-identity rests on it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.demo import demo_tokenizer, synth_demo_recipe
from pipelines.demo_data import (
    NARRATION,
    PHOTOS,
    build_demo_sources,
    build_sft_sources,
    build_synth_sources,
    photo_bytes,
    piper_speech,
    slideshow,
)
from pipelines.executor import run_recipe
from pipelines.operator import get_operator
from pipelines.recipe import recipe_from_dict
from shards.reader import iter_samples
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.avtools import extract_audio_track, flac_bytes
from synth.caption import Captioner, sample_seed
from synth.media import MediaError, decode_audio, probe_file, spilled
from synth.openclip_models import save_tiny_model


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def narrated_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A short H.264 + AAC slideshow of real photographs narrated by piper (what the demo's video is)."""
    d = tmp_path_factory.mktemp("narrated")
    for name in ("astronaut", "coffee"):
        (d / f"{name}.jpg").write_bytes(photo_bytes(name, size=(160, 120)))
    speech = piper_speech(NARRATION.split(".")[0] + ".", d / "speech.wav")
    return slideshow([d / "astronaut.jpg", d / "coffee.jpg"], speech, d / "video.mp4", 1.0).read_bytes()


# ---------------------------------------------------------------- one step at a time


def test_audio_track_is_the_same_bytes_every_time(narrated_video: bytes) -> None:
    # Matroska's muxer draws random segment and track UIDs unless told to be bit-exact
    first, second = extract_audio_track(narrated_video), extract_audio_track(narrated_video)
    assert sha(first) == sha(second)
    assert b"Lavf5" not in first and b"Lavf6" not in first  # no ffmpeg version: the same on every install
    assert len(decode_audio(first)) > 8000  # still the narration


def test_flac_is_the_same_bytes_every_time(narrated_video: bytes) -> None:
    audio = decode_audio(narrated_video)
    first, second = flac_bytes(audio, 16_000), flac_bytes(audio, 16_000)
    assert sha(first) == sha(second) and b"Lavf5" not in first
    assert np.abs(decode_audio(first) - np.clip(audio, -1, 1)).max() < 1e-4  # lossless up to 16-bit


def test_slideshow_source_is_the_same_bytes_every_time(narrated_video: bytes, tmp_path: Path) -> None:
    # the demo's video sources: x264 writes its thread count (by default 1.5x the cores) into the stream
    images = []
    for name in ("astronaut", "coffee"):
        images.append(tmp_path / f"{name}.jpg")
        images[-1].write_bytes(photo_bytes(name, size=(160, 120)))
    speech = piper_speech(NARRATION.split(".")[0] + ".", tmp_path / "speech.wav")
    again = slideshow(images, speech, tmp_path / "again.mp4", 1.0).read_bytes()
    assert sha(again) == sha(narrated_video)
    assert b"threads=1 " in again and b"Lavf5" not in again


def test_demo_sources_are_the_same_bytes_every_build(demo_sources: dict[str, str], tmp_path: Path) -> None:
    """Sample ids hash the inputs, so ``omni demo`` on two machines needs the same source bytes."""
    again = build_demo_sources(tmp_path / "again")

    def files(paths: dict[str, str]) -> dict[str, str]:
        root = Path(paths["docs"]).parent
        return {str(p.relative_to(root)): sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}

    first, second = files(demo_sources), files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_media_ops_write_the_same_bytes_twice(narrated_video: bytes) -> None:
    """keyframes (JPEGs of swscale frames) and normalize_audio's FLAC copy, through the operators."""
    sample = make_sample(
        "t",
        "video",
        [Segment("video", bytes=narrated_video), Segment("audio", bytes=piper_wav_bytes())],
        "v",
    )
    steps = [
        ("probe", {}),
        ("keyframes", {"max_frames": 4}),
        ("normalize_audio", {"format": "flac"}),
    ]

    def run() -> list[dict[str, Any]]:
        table = samples_table([sample])
        for name, params in steps:
            table = get_operator(name)(**params)(table).drop_columns(["reason", "detail"])
        return table["segments"].to_pylist()[0]

    first, second = run(), run()
    roles = [(s["modality"], loads_meta(s["meta"]).get("role"), loads_meta(s["meta"]).get("ext")) for s in first]
    assert ("image", "keyframe", "jpg") in roles and ("audio", "asr_input", "flac") in roles
    assert [sha(s["bytes"] or b"") for s in first] == [sha(s["bytes"] or b"") for s in second]


_PIPER_WAV: list[bytes] = []


def piper_wav_bytes() -> bytes:
    if not _PIPER_WAV:
        from synth.avtools import wav_bytes
        from synth.tts import Speaker

        speech = Speaker(["piper:joe"], fallback=None).speak("Bread starts with flour.", key="k")
        _PIPER_WAV.append(wav_bytes(speech.samples, speech.sample_rate))
    return _PIPER_WAV[0]


def test_piper_runs_on_a_fixed_thread_count() -> None:
    """ONNX Runtime's default is the machine's core count, and piper's WAVs change with it (2 vs 3
    threads differ here), so the count is fixed: the same text is the same WAV on any machine."""
    from synth.tts import Speaker

    speaker = Speaker(["piper:joe"], fallback=None)
    backend = speaker.backend("piper:joe")
    assert backend.voice.session.get_session_options().intra_op_num_threads == 1
    a = speaker.speak("The platform clock is always right.", key="x")
    b = speaker.speak("The platform clock is always right.", key="x")
    assert sha(a.samples.tobytes()) == sha(b.samples.tobytes())


def test_sampled_captions_are_seeded_per_image(tmp_path: Path) -> None:
    """A top-k caption depends on its image's key only: not on its batch neighbours, the batch size,
    the order, or the global torch RNG (which it leaves as it found it)."""
    import torch

    coca = save_tiny_model(tmp_path, coca=True)
    images = [photo_bytes(n, size=(96, 80)) for n in list(PHOTOS)[:4]]
    keys = [f"sample-{i}/0" for i in range(4)]
    captioner = Captioner(*coca, batch_size=3, generation_type="top_k", top_k=50, seq_len=12)
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    together = captioner.caption(images, keys)
    assert torch.equal(torch.rand(3), expected_draw)
    alone = [captioner.caption([im], [k])[0] for im, k in zip(images, keys, strict=True)]
    reversed_ = captioner.caption(images[::-1], keys[::-1])[::-1]
    assert together == alone == reversed_
    other_seed = Captioner(*coca, generation_type="top_k", top_k=50, seq_len=12, seed=1).caption(images, keys)
    assert other_seed != together  # the seed matters: this is sampling, not greedy decoding
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b")


def test_reject_details_carry_no_temporary_file_names() -> None:
    with spilled(b"\x00not a video at all" * 64) as path:
        with pytest.raises(MediaError) as e:
            probe_file(path)
    assert path not in e.value.detail and "<tmp>" in e.value.detail
    assert MediaError("x", "/dev/shm/tmpab_cd123/in3: bad").detail == "<tmp>/in3: bad"


# ---------------------------------------------------------------- the whole demo recipe, twice


@pytest.fixture(scope="module")
def synth_demo_sources(demo_sources: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``omni demo``'s sources: the demo sources, the synth/ ones and the tiny tokenizer."""
    root = tmp_path_factory.mktemp("synth_demo")
    sources = {**demo_sources, **build_synth_sources(root / "synth")}
    shutil.copytree(demo_sources["media"], root / "sft" / "media")  # the chats use the demo's media
    sources.update(build_sft_sources(root / "sft"))
    sources["tokenizer"] = demo_tokenizer(root / "tokenizer", sources)
    return sources


def shard_hashes(run: Path) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in sorted((run / "shards").glob("*.tar"))}


def ledger_rows(run: Path) -> list[dict[str, Any]]:
    rows = [r for p in sorted((run / "rejects").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["unit"], r["id"]))


def segment_differences(a: Path, b: Path) -> Iterator[str]:
    """Which samples and segments of two versions of a shard differ, and in what."""
    left = {s["id"]: s for s in iter_samples(str(a))}
    right = {s["id"]: s for s in iter_samples(str(b))}
    for key in sorted(left.keys() ^ right.keys()):
        yield f"  {key}: only in {'first' if key in left else 'second'} run"
    for key in sorted(left.keys() & right.keys()):
        x, y = left[key], right[key]
        if x == y:
            continue
        top = sorted(k for k in x if k != "segments" and x[k] != y.get(k))
        if top:
            yield f"  {key} ({x['kind']}): sample fields {top}"
        if len(x["segments"]) != len(y["segments"]):
            yield f"  {key}: {len(x['segments'])} vs {len(y['segments'])} segments"
        for i, (s, t) in enumerate(zip(x["segments"], y["segments"], strict=False)):
            if s != t:
                fields = sorted(k for k in s if s[k] != t.get(k))
                ms, mt = loads_meta(s["meta"]), loads_meta(t["meta"])
                meta_keys = sorted(k for k in ms.keys() | mt.keys() if ms.get(k) != mt.get(k))
                yield f"  {key} ({x['kind']}) segment {i} ({s['modality']}): {fields} {meta_keys or ''}".rstrip()


def compare_runs(a: Path, b: Path) -> list[str]:
    problems = []
    ha, hb = shard_hashes(a), shard_hashes(b)
    if ha.keys() != hb.keys():
        problems.append(f"shard names differ: {sorted(ha.keys() ^ hb.keys())}")
    for name in sorted(ha.keys() & hb.keys()):
        if ha[name] != hb[name]:
            problems.append(f"{name}: sha256 {ha[name][:12]} != {hb[name][:12]}")
            problems.extend(segment_differences(a / "shards" / name, b / "shards" / name))
    ra, rb = ledger_rows(a), ledger_rows(b)
    if ra != rb:
        problems.append("rejects ledger differs:")
        problems.extend(f"  first only: {json.dumps(r)}" for r in ra if r not in rb)
        problems.extend(f"  second only: {json.dumps(r)}" for r in rb if r not in ra)
    return problems


@pytest.mark.slow
def test_the_demo_recipe_writes_the_same_bytes_twice(synth_demo_sources: dict[str, str], tmp_path: Path) -> None:
    runs = []
    for name in ("first", "second"):
        recipe = synth_demo_recipe(synth_demo_sources, str(tmp_path / name), "local")
        run_recipe(recipe_from_dict(recipe), executor="local", progress=False)
        runs.append(tmp_path / name)
    problems = compare_runs(*runs)
    assert not problems, "two runs of the demo recipe differ:\n" + "\n".join(problems)
    # every byte-writing media step really ran: keyframe JPEGs, the MKA audio track, piper WAVs
    segments = [
        (s["modality"], loads_meta(s["meta"]))
        for p in sorted((runs[0] / "shards").glob("*.tar"))
        for sample in iter_samples(str(p))
        for s in sample["segments"]
    ]
    assert any(m.get("role") == "keyframe" and m.get("caption") for _, m in segments)
    assert any(mod == "audio" and m.get("ext") == "mka" for mod, m in segments)
    assert any(mod == "audio" and m.get("tts", {}).get("voice") == "piper:joe" for mod, m in segments)
    assert len(shard_hashes(runs[0])) >= 5 and ledger_rows(runs[0])
