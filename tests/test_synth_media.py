"""probe / normalize_audio / keyframes on real and generated media, without Ray."""

from __future__ import annotations

import io
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import asterisk_prompts, photo_bytes, slideshow
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.avtools import clip_ranges, decode_audio_batch, extract_audio_track
from synth.media import MediaError, decode_audio


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("synth_media")
    wav_path, _ = asterisk_prompts(limit=1)[0]
    for name in ("astronaut", "coffee"):
        (d / f"{name}.jpg").write_bytes(photo_bytes(name))
    long_mp4 = d / "long.mp4"  # 70 s of test pattern with a tone: long enough to be split into clips
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=5:duration=70"]
        + ["-f", "lavfi", "-i", "sine=frequency=440:duration=70", "-shortest"]
        + ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(long_mp4)],
        check=True,
    )
    return {
        "wav": wav_path.read_bytes(),
        "jpg": photo_bytes("astronaut"),
        "slideshow": slideshow([d / "astronaut.jpg", d / "coffee.jpg"], wav_path, d / "s.mp4").read_bytes(),
        "long": long_mp4.read_bytes(),
    }


def _table(segments_by_name: dict[str, list[Segment]]):
    return samples_table(make_sample("t", "video", segs, locator=name) for name, segs in segments_by_name.items())


def _by_locator(table) -> dict[str, dict]:
    return {loads_meta(r["meta"])["locator"]: r for r in table.to_pylist()}


def test_clip_ranges_cover_the_video_without_slivers() -> None:
    assert clip_ranges(20.0, 32.0) == [(0.0, 20.0)]
    assert clip_ranges(70.0, 32.0) == [(0.0, 32.0), (32.0, 70.0)]  # a 6 s tail joins the clip before it
    assert clip_ranges(90.0, 32.0) == [(0.0, 32.0), (32.0, 64.0), (64.0, 90.0)]
    assert clip_ranges(90.0, None) == [(0.0, 90.0)]


def test_probe_adds_meta_and_clip_ranges(media: dict[str, bytes]) -> None:
    table = _table(
        {
            "long": [Segment("video", bytes=media["long"])],
            "show": [Segment("video", bytes=media["slideshow"]), Segment("text", text="a slideshow")],
            "photo": [Segment("image", bytes=media["jpg"])],
            "speech": [Segment("audio", bytes=media["wav"])],
            "garbage": [Segment("video", bytes=random.Random(1).randbytes(3000))],
            "wav_as_video": [Segment("video", bytes=media["wav"])],
        }
    )
    kept, rejected = split_rejected(get_operator("probe")()(table))
    rows = _by_locator(kept)
    long_meta = loads_meta(rows["long"]["segments"][0]["meta"])
    assert long_meta["clips"] == [[0.0, 32.0], [32.0, 70.0]] and long_meta["has_audio"]
    assert long_meta["width"] == 160 and long_meta["video_codec"] == "h264" and long_meta["duration"] >= 69.9
    show_meta = loads_meta(rows["show"]["segments"][0]["meta"])
    assert "clips" not in show_meta and show_meta["audio_codec"] == "aac"
    assert loads_meta(rows["photo"]["segments"][0]["meta"])["width"] == 512
    assert loads_meta(rows["speech"]["segments"][0]["meta"])["sample_rate"] == 8000
    reasons = dict(
        zip(
            [loads_meta(m)["locator"] for m in rejected["meta"].to_pylist()],
            rejected["reason"].to_pylist(),
            strict=True,
        )
    )
    assert reasons == {"garbage": "unreadable media", "wav_as_video": "no video stream"}


def test_probe_timeout_rejects_instead_of_hanging(media: dict[str, bytes]) -> None:
    out = get_operator("probe")(timeout_s=0.001, threads=1)(_table({"v": [Segment("video", bytes=media["long"])]}))
    assert out["reason"].to_pylist() == ["media probe timed out"]


def test_keyframes_per_clip_at_one_fps_within_the_pixel_budget(media: dict[str, bytes]) -> None:
    table = get_operator("probe")()(_table({"long": [Segment("video", bytes=media["long"])]})).drop_columns(
        ["reason", "detail"]
    )
    budget = 10_000  # smaller than the 160x120 source, so frames must shrink
    out = get_operator("keyframes")(max_frames=32, max_pixels=budget)(table)
    assert out["reason"].to_pylist() == [None]
    segs = out["segments"].to_pylist()[0]
    assert segs[0]["modality"] == "video" and loads_meta(segs[0]["meta"])["keyframes"] == len(segs) - 1
    frames = [loads_meta(s["meta"]) | {"bytes": s["bytes"]} for s in segs[1:]]
    clip0 = [f for f in frames if f["clip"] == 0]
    clip1 = [f for f in frames if f["clip"] == 1]
    assert len(clip0) == 32 and [f["t"] for f in clip0] == [float(t) for t in range(32)]  # 1 fps, exactly
    assert len(clip1) == 32 and 32.0 <= clip1[0]["t"] < clip1[-1]["t"] < 70.0  # 38 s thinned to 32 frames
    for f in frames:
        with Image.open(io.BytesIO(f["bytes"])) as im:
            assert im.size == (f["width"], f["height"]) and im.width * im.height <= budget
            assert im.width % 28 == 0 and im.height % 28 == 0


def test_normalize_audio_adds_a_16k_mono_copy_and_keeps_the_original(media: dict[str, bytes]) -> None:
    table = _table({"speech": [Segment("audio", bytes=media["wav"]), Segment("text", text="hello")]})
    out = get_operator("normalize_audio")()(table)
    segs = out["segments"].to_pylist()[0]
    assert [s["modality"] for s in segs] == ["audio", "audio", "text"]
    assert segs[0]["bytes"] == media["wav"]  # the original, byte for byte
    copy = loads_meta(segs[1]["meta"])
    assert copy["role"] == "asr_input" and copy["sample_rate"] == 16000 and copy["channels"] == 1
    resampled = decode_audio(segs[1]["bytes"])
    assert abs(len(resampled) - len(decode_audio(media["wav"]))) <= 16
    again = get_operator("normalize_audio")()(out.drop_columns(["reason", "detail"]))
    assert len(again["segments"].to_pylist()[0]) == 3  # idempotent


def test_decode_audio_batch_isolates_a_bad_file(media: dict[str, bytes]) -> None:
    out = decode_audio_batch([media["wav"], b"RIFF not really a wav", media["slideshow"], media["wav"]])
    assert isinstance(out[1], MediaError)
    assert np.array_equal(out[0], out[3]) and len(out[0]) > 16000
    assert isinstance(out[2], np.ndarray) and len(out[2]) > 16000  # a video's audio track


def test_extract_audio_track_is_a_stream_copy(media: dict[str, bytes], tmp_path: Path) -> None:
    track = extract_audio_track(media["slideshow"])
    audio = decode_audio(track)
    assert abs(len(audio) - len(decode_audio(media["slideshow"]))) <= 3200  # AAC priming: < 0.2 s
    with pytest.raises(MediaError):
        extract_audio_track(photo_bytes("coffee"))
