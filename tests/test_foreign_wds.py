"""Others' WebDataset shards, member by member (issue 12, "Real-world data"): tars written by the
tools' own writers (``webdataset.TarWriter``, video2dataset's layout) and by hand, through a real
run. Per-member gzip is inflated under the key's bounds, labels and msgpack become meta, a member's
bytes decide its modality when its extension lies, and whatever is not read is a counted reject."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import webdataset as wds
from PIL import Image

from pipelines.audit import audit
from pipelines.demo_data import photo_bytes
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from shards.codec import DecodeError, decode_sample, gunzip_bounded, media_of, sniff
from shards.reader import iter_samples
from tests.hostile import tar_with

AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg", "aiff", "caf", "au", "m4a", "mka")
VIDEO_FORMATS = ("mp4", "mkv")
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF"}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real files of every format the reader sniffs: PIL's images and ffmpeg's containers (one call
    for the audio, one for the video)."""
    out = tmp_path_factory.mktemp("media")
    audio = [str(out / f"a.{ext}") for ext in AUDIO_FORMATS]
    video = [str(out / f"v.{ext}") for ext in VIDEO_FORMATS]
    sine = ["-f", "lavfi", "-i", "sine=frequency=440:duration=0.3:sample_rate=8000"]
    subprocess.run(["ffmpeg", "-v", "error", *sine, *audio], check=True)
    testsrc = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=5:duration=0.4"]
    subprocess.run(["ffmpeg", "-v", "error", *testsrc, "-c:v", "mpeg4", "-pix_fmt", "yuv420p", *video], check=True)
    files = {Path(p).suffix[1:]: Path(p).read_bytes() for p in audio + video}
    image = Image.open(io.BytesIO(photo_bytes("astronaut", size=(64, 48))))
    for ext, fmt in IMAGE_FORMATS.items():
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format=fmt)
        files[ext] = buf.getvalue()
    return files


def _run(tmp_path: Path, tar: Path, **doc: Any) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, Any]]]:
    """Ingest one tar through a real local run; returns {key: reject reason}, {key: detail} and
    {key: sample}, after checking that the audit balances and every input is a sample or one ledger row."""
    out = tmp_path / "run"
    source = {"name": "wds", "type": "webdataset", "path": str(tar.parent), **doc.pop("source", {})}
    recipe = recipe_from_dict({"name": "foreign", "output": str(out), "sources": [source], **doc})
    m = run_recipe(recipe, executor="local", progress=False)
    report = audit(str(out))
    assert report.balanced, report.summary()
    assert m["ingested"] == m["written"] + m["rejected"]
    ledger = RunDir(str(out)).read_ledger().to_pylist()
    for row in ledger:
        assert row["detail"], f"{row['locator']}: {row['reason']} has no detail"
    reasons = {r["locator"].split("#", 1)[1]: r["reason"] for r in ledger}
    details = {r["locator"].split("#", 1)[1]: r["detail"] for r in ledger}
    assert len(reasons) == len(ledger), "one ledger row per input"
    samples = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for s in iter_samples(str(shard)):
            samples[json.loads(s["meta"])["locator"].split("#", 1)[1]] = s
    assert len(samples) == m["written"]
    return reasons, details, samples


def _meta(sample: dict[str, Any]) -> dict[str, Any]:
    return json.loads(sample["meta"])


def _segs(sample: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(seg["modality"], json.loads(seg["meta"]) if seg["meta"] else {}) for seg in sample["segments"]]


def _first_media(sample: dict[str, Any]) -> tuple[str, str | None, str | None]:
    modality, meta = _segs(sample)[0]
    return modality, meta.get("ext"), meta.get("ext_claimed")


def _text(sample: dict[str, Any]) -> str:
    return "".join(seg["text"] for seg in sample["segments"] if seg["modality"] == "text")


# ---------------------------------------------------------------- magic numbers


def test_sniff_names_every_format_by_its_bytes(media: dict[str, bytes]) -> None:
    expected = {ext: ext for ext in media}
    expected.update({"mkv": "webm", "mka": "webm"})  # Matroska and WebM share EBML; the name tells audio from video
    assert {ext: sniff(data) for ext, data in media.items()} == expected
    for text in (b"ID3 tags are metadata", b"FORM feed", b"BMW", b"RIFF raff", b""):
        assert sniff(text) is None, text


def test_bytes_decide_the_modality_unless_a_container_holds_either(media: dict[str, bytes]) -> None:
    cases = {
        ("mp4", "jpg"): ("image", "jpg"),  # video2dataset's still-image row
        ("jpg", "png"): ("image", "png"),
        ("wav", "flac"): ("audio", "flac"),
        ("bin", "aiff"): ("audio", "aiff"),  # an unknown name, known bytes
        ("mp4", "m4a"): ("video", "mp4"),  # one container family: the name says audio or video
        ("mkv", "mka"): ("video", "mkv"),
        ("mka", "mkv"): ("audio", "mka"),
        ("wav", "mp4"): ("audio", "mp4"),  # a container of either kind: the claimed modality stays
        ("aac", "m4a"): ("audio", "m4a"),
        ("txt", "jpg"): ("image", "jpg"),  # a caption that is not UTF-8 but a JPEG
    }
    assert {claim: media_of(claim[0], media[claim[1]]) for claim in cases} == cases
    assert media_of("txt", b"ID3 tags, FORM feeds and caff") == ("text", "txt")
    assert media_of("bin", b"\x00\x01 unknown") is None
    assert media_of("jpg", b"\x00\x01 unknown") == ("image", "jpg"), "validate judges what nothing names"


# ---------------------------------------------------------------- webdataset.TarWriter


def test_tarwriter_layout_keeps_labels_gzip_members_and_msgpack_meta(tmp_path: Path, media: dict[str, bytes]) -> None:
    tar = tmp_path / "in" / "wds.tar"
    tar.parent.mkdir()
    deep = b"\x91" * 5000 + b"\xc0"  # msgpack nested past its unpacker's stack
    with wds.TarWriter(str(tar), mtime=0) as sink:  # TarWriter gzips ``.gz`` keys itself, as in its own test data
        sink.write({"__key__": "s0", "jpg": media["jpg"], "cls": 3, "txt.gz": "a gzipped caption"})
        sink.write({"__key__": "s1", "png": media["png"], "cls2": 7, "json.gz": {"key": "orig-1", "url": "http://x"}})
        sink.write({"__key__": "s2", "jpg.gz": media["jpg"], "txt": "caption of a gzipped jpeg"})
        sink.write({"__key__": "s3", "webp": media["webp"], "msgpack": {"width": 64, "tags": ["a", "b"]}})
        sink.write({"__key__": "s4", "txt": "text beside a pickle", "pyd": {"a": 1}})
        sink.write({"__key__": "s5", "txt.gz": "\0" * (8 << 20)})  # inflates to 8 MiB: over the member bound
        sink.write({"__key__": "s6", "cls": 5})  # a label alone is no sample
        sink.write({"__key__": "s7", "jpg": media["jpg"], "mp": msgpack.packb(msgpack.ExtType(5, b"obj"))})
        sink.write({"__key__": "s8", "jpg": media["jpg"], "mp": deep})
        sink.write({"__key__": "s9", "flac": media["flac"], "transcript.txt": "a tone", "index": 12})
    reasons, details, samples = _run(tmp_path, tar, source={"max_member_bytes": "1MB"})
    assert reasons == {
        "s5": "member too large after decompression",
        "s6": "no usable members",
        "s7": "bad msgpack member",
        "s8": "msgpack too deep",
    }
    assert details["s5"].startswith("s5.txt.gz: over 1048576 bytes")
    assert "extension type 5 refused" in details["s7"]
    assert sorted(samples) == ["s0", "s1", "s2", "s3", "s4", "s9"]
    s0, s1, s2, s3, s4, s9 = (samples[k] for k in ("s0", "s1", "s2", "s3", "s4", "s9"))
    assert s0["kind"] == "image_caption" and _text(s0) == "a gzipped caption"
    assert _meta(s0)["labels"] == {"cls": "3"}
    assert _meta(s1)["labels"] == {"cls2": "7"} and _meta(s1)["foreign"]["url"] == "http://x"
    assert _meta(s1)["claimed_id"] == "orig-1" and s1["kind"] == "image"
    assert _segs(s2) == [("image", {"ext": "jpg", "member": "jpg.gz"}), ("text", {})]
    assert s2["segments"][0]["bytes"] == media["jpg"]
    assert _meta(s3)["msgpack"] == {"msgpack": {"width": 64, "tags": ["a", "b"]}}
    assert s4["kind"] == "text" and _meta(s4)["ignored_members"] == ["pyd"], "pickle is never decoded"
    assert _segs(s9)[0] == ("audio", {"ext": "flac"}) and _meta(s9)["labels"] == {"index": "12"}


# ---------------------------------------------------------------- video2dataset, lying extensions, AIFF/CAF


def test_video2dataset_still_images_and_lying_extensions_pass_validate(tmp_path: Path, media: dict[str, bytes]) -> None:
    tar = tmp_path / "in" / "00000.tar"
    tar.parent.mkdir()

    def row(key: str, caption: str, **members: bytes) -> dict[str, Any]:
        meta = {"url": f"http://v/{key}", "key": key, "status": "success", "caption": caption, "error_message": None}
        return {"__key__": key, "txt": caption, "json": meta, **members}

    with wds.TarWriter(str(tar), mtime=0) as sink:
        sink.write(row("000000000", "a still image row", mp4=media["jpg"]))  # video2dataset's still-image rows
        sink.write(row("000000001", "a real clip", mp4=media["mp4"]))
        sink.write(row("000000002", "its audio track", m4a=media["m4a"]))
        sink.write(row("000000003", "a png named jpg", jpg=media["png"]))
        sink.write(row("000000004", "a flac named wav", wav=media["flac"]))
        sink.write(row("000000005", "an aiff", aiff=media["aiff"]))
        sink.write(row("000000006", "a caf", caf=media["caf"]))
        sink.write(row("000000007", "matroska audio", mka=media["mka"]))
        sink.write(row("000000008", "a sun au", au=media["au"]))
    reasons, details, samples = _run(tmp_path, tar, pipeline=[{"op": "validate", "params": {"threads": 1}}])
    assert reasons == {}, "every row decodes and every member passes ffmpeg/PIL"
    got = {key: (s["kind"], *_first_media(s)) for key, s in samples.items()}
    assert got == {
        "000000000": ("image_caption", "image", "jpg", "mp4"),
        "000000001": ("video_caption", "video", "mp4", None),
        "000000002": ("asr", "audio", "m4a", None),
        "000000003": ("image_caption", "image", "png", "jpg"),
        "000000004": ("asr", "audio", "flac", "wav"),
        "000000005": ("asr", "audio", "aiff", None),
        "000000006": ("asr", "audio", "caf", None),
        "000000007": ("asr", "audio", "mka", None),
        "000000008": ("asr", "audio", "au", None),
    }
    assert samples["000000000"]["segments"][0]["bytes"] == media["jpg"]
    assert _meta(samples["000000005"])["foreign"]["key"] == "000000005"


# ---------------------------------------------------------------- hand-made members: broken gzip, empties


def test_broken_gzip_empty_and_duplicate_members_are_specific_rejects(tmp_path: Path, media: dict[str, bytes]) -> None:
    tar = tmp_path / "in" / "raw.tar"
    tar.parent.mkdir()
    caption = gzip.compress(b"a caption compressed by hand", mtime=0)
    tar.write_bytes(
        tar_with(
            [
                ("good.jpg", media["jpg"]),
                ("good.txt.gz", caption + caption),  # two concatenated gzip streams, as gzip(1) reads them
                ("corrupt.jpg", media["jpg"]),
                ("corrupt.txt.gz", b"\x1f\x8b\x08\x00garbage that is no deflate stream"),
                ("cut.jpg", media["jpg"]),
                ("cut.txt.gz", caption[:-12]),
                ("empty.mp4", b""),
                ("empty.txt", b"a caption beside an empty video"),
                ("emptygz.jpg", media["jpg"]),
                ("emptygz.txt.gz", b""),
                ("twice.txt", b"plain"),
                ("twice.txt.gz", caption),
                ("bigkey.txt.gz", gzip.compress(b"x" * (3 << 20), mtime=0)),
                ("lies.bin", media["gif"]),  # an unknown extension whose bytes are an image
                ("lies.cls", b"9"),
                ("onlylabel.label", b"\xff\xfe not utf-8"),
                ("onlylabel.jpg", media["jpg"]),
            ]
        )
    )
    reasons, details, samples = _run(tmp_path, tar, limits={"max_key_bytes": 2 << 20})
    assert reasons == {
        "corrupt": "undecodable member",
        "cut": "undecodable member",
        "empty": "empty member",
        "emptygz": "empty member",
        "twice": "duplicate member in sample",
        "bigkey": "member too large after decompression",
        "onlylabel": "text is not utf-8",
    }
    assert details["corrupt"].startswith("corrupt.txt.gz: ") and details["cut"].startswith("cut.txt.gz: ")
    assert details["empty"] == "empty.mp4" and details["emptygz"] == "emptygz.txt.gz"
    assert details["bigkey"] == "bigkey.txt.gz: over 2097152 bytes"
    assert sorted(samples) == ["good", "lies"]
    assert _text(samples["good"]) == "a caption compressed by hand" * 2
    assert _segs(samples["lies"]) == [("image", {"ext": "gif", "ext_claimed": "bin"})]
    assert _meta(samples["lies"])["labels"] == {"cls": "9"}


# ---------------------------------------------------------------- the decoders alone


def test_gunzip_stops_at_its_bound_without_inflating_the_rest() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), mtime=0)  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(DecodeError) as e:
        gunzip_bounded(bomb, 1000, "k.txt.gz")
    assert (e.value.reason, e.value.detail) == ("member too large after decompression", "k.txt.gz: over 1000 bytes")
    assert gunzip_bounded(gzip.compress(b"abc") + b"\0" * 512, 3, "k.txt.gz") == b"abc"  # tar-style zero padding


def test_msgpack_meta_is_plain_values_only() -> None:
    packed = msgpack.packb({"t": msgpack.Timestamp(0), "raw": b"\x00\x01", "n": [1, 2.5, None, True]})
    row = decode_sample("k", {"txt": b"caption", "msgpack": packed}, source="s", trust_id=False)
    assert json.loads(row["meta"])["msgpack"]["msgpack"] == {
        "t": "1970-01-01T00:00:00+00:00",
        "raw": "<binary: 2 bytes>",
        "n": [1, 2.5, None, True],
    }
    for bad, reason in (
        (msgpack.packb({1: "int key"}), "bad msgpack member"),
        (b"\xc1", "bad msgpack member"),
        (msgpack.packb([1]) + b"\x01", "bad msgpack member"),
        (b"\x91" * 70 + b"\xc0", "msgpack too deep"),
    ):
        with pytest.raises(DecodeError) as e:
            decode_sample("k", {"txt": b"caption", "mp": bad}, source="s", trust_id=False, max_json_depth=64)
        assert e.value.reason == reason and e.value.detail.startswith("k.mp"), bad
