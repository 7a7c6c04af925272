"""The ``validate`` operator on real and deliberately broken media, without Ray."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from filters.integrity import Validate
from pipelines.demo_data import asterisk_prompts, photo_bytes, slideshow
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from tests.hostile import png_bomb


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("media")
    wav_path, _ = asterisk_prompts(limit=1)[0]
    wav = wav_path.read_bytes()
    for name in ("astronaut", "coffee"):
        (d / f"{name}.jpg").write_bytes(photo_bytes(name))
    mp4 = slideshow([d / "astronaut.jpg", d / "coffee.jpg"], wav_path, d / "v.mp4").read_bytes()
    flac = d / "a.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav_path), str(flac)], check=True)
    return {
        "jpg": photo_bytes("astronaut"),
        "png": photo_bytes("coffee", "PNG", (64, 64)),
        "wav": wav,
        "flac": flac.read_bytes(),
        "mp4": mp4,
    }


def _table(cases: dict[str, Segment]) -> pa.Table:
    return samples_table(make_sample("t", "image", [seg], locator=name) for name, seg in cases.items())


def test_good_and_bad_media(media: dict[str, bytes]) -> None:
    wrong_header = b"RIFF\x24\x00\x00\x00WAVEfmt " + random.Random(1).randbytes(4000)
    cases = {
        "jpg": Segment("image", bytes=media["jpg"]),
        "png": Segment("image", bytes=media["png"]),
        "wav": Segment("audio", bytes=media["wav"]),
        "flac": Segment("audio", bytes=media["flac"]),
        "mp4": Segment("video", bytes=media["mp4"]),
        "truncated_jpg": Segment("image", bytes=media["jpg"][: len(media["jpg"]) // 3]),
        "png_bomb": Segment("image", bytes=png_bomb()),
        "text_as_jpg": Segment("image", bytes=b"just some text, not an image"),
        "empty_image": Segment("image", bytes=b""),
        "truncated_wav": Segment("audio", bytes=media["wav"][: len(media["wav"]) // 3]),
        "truncated_flac": Segment("audio", bytes=media["flac"][: len(media["flac"]) // 2]),
        "wrong_header_audio": Segment("audio", bytes=wrong_header),
        "garbage_mp4": Segment("video", bytes=random.Random(2).randbytes(5000)),
        "truncated_mp4": Segment("video", bytes=media["mp4"][: len(media["mp4"]) // 2]),
        "audio_as_video": Segment("video", bytes=media["wav"]),
        "blank_text": Segment("text", text="   \n"),
    }
    op = get_operator("validate")(max_pixels=10_000_000)
    op.setup()
    kept, rejected = split_rejected(op(_table(cases)))
    kept_names = sorted(loads_meta(m)["locator"] for m in kept["meta"].to_pylist())
    assert kept_names == ["flac", "jpg", "mp4", "png", "wav"]
    reasons = {
        loads_meta(m)["locator"]: r
        for m, r in zip(rejected["meta"].to_pylist(), rejected["reason"].to_pylist(), strict=True)
    }
    assert reasons["png_bomb"] == "image exceeds pixel limit"
    assert reasons["truncated_jpg"] == "undecodable image"
    assert reasons["text_as_jpg"] == "undecodable image"
    assert reasons["empty_image"] == "empty file"
    assert reasons["truncated_wav"] == "undecodable media"
    assert reasons["truncated_flac"] == "undecodable media"
    assert reasons["wrong_header_audio"] in ("unreadable media", "undecodable media")
    assert reasons["garbage_mp4"] == "unreadable media"
    assert reasons["truncated_mp4"] in ("unreadable media", "undecodable media")
    assert reasons["audio_as_video"] == "no video stream"
    assert reasons["blank_text"] == "empty text"
    assert set(reasons) | set(kept_names) == set(cases)
    metas = {loads_meta(r["meta"])["locator"]: loads_meta(r["segments"][0]["meta"]) for r in kept.to_pylist()}
    assert metas["jpg"]["width"] == 512 and metas["jpg"]["height"] == 512
    assert metas["wav"]["sample_rate"] == 8000 and metas["wav"]["duration"] > 1
    assert metas["mp4"]["width"] == 320 and metas["mp4"]["audio_codec"] == "aac"


def test_validate_is_a_plain_class_without_ray() -> None:
    op = Validate(threads=1)
    assert op.resources.cpus == 1 and not op.stateful
    out = op(_table({"ok": Segment("text", text="hello")}))
    assert out["reason"].to_pylist() == [None]


def test_hostile_file_times_out(tmp_path: Path, media: dict[str, bytes]) -> None:
    op = Validate(timeout_s=0.001, threads=1)
    out = op(_table({"slow": Segment("video", bytes=media["mp4"])}))
    assert out["reason"].to_pylist()[0] in ("media probe timed out", "media decode timed out")
