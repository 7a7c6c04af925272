"""The shard contract: schema, writer (rollover, atomic, checksums), reader (ours, foreign, hostile)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds

from pipelines.demo_data import PHOTOS, photo_bytes, write_img2dataset_tar
from shards.manifest import read_shardset_manifest, shard_urls, write_shardset_manifest
from shards.reader import iter_records, iter_samples, read_shard
from shards.schema import SAMPLE_SCHEMA, Segment, content_id, kind_for, make_sample, samples_table, with_segment_meta
from shards.writer import ShardWriter
from tests.hostile import link, tar_with


def _samples(n: int) -> list[dict]:
    names = list(PHOTOS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        segs = [
            Segment("image", bytes=photo_bytes(name, size=(64, 48)), meta={"ext": "jpg"}),
            Segment("text", text=f"{PHOTOS[name]} #{i}"),
        ]
        rows.append(make_sample("unit-test", "image_caption", segs, locator=f"row{i}", meta={"n": i}))
    return rows


def test_ids_are_stable_and_content_sensitive() -> None:
    a = [Segment("text", text="hello")]
    assert content_id("s", "x", a) == content_id("s", "x", [Segment("text", text="hello")])
    assert content_id("s", "x", a) != content_id("s", "x", [Segment("text", text="hello!")])
    assert content_id("s", "x", a) != content_id("s", "y", a)
    img = [Segment("image", bytes=b"\xff\xd8\xff1")]
    assert content_id("s", "x", img) != content_id("s", "x", [Segment("image", bytes=b"\xff\xd8\xff2")])
    with pytest.raises(ValueError):
        make_sample("s", "no_such_kind", a, "x")
    with pytest.raises(ValueError):
        Segment("smell", text="?")


def test_kind_follows_segment_order() -> None:
    assert kind_for(["image", "text"]) == "image_caption"
    assert kind_for(["text", "image", "text", "image"]) == "interleaved_image_text"
    assert kind_for(["audio", "text"]) == "asr"
    assert kind_for(["text", "audio", "text"]) == "speech_text_interleaved"
    assert kind_for(["video", "text"]) == "video_caption"


def test_write_read_roundtrip_with_rollover(tmp_path: Path) -> None:
    rows = _samples(7)
    rows.append(
        make_sample("unit-test", "video", [Segment("video", uri="s3://bucket/big.mp4", meta={"bytes": 10})], "big")
    )
    with ShardWriter(str(tmp_path), "part", max_samples=3) as w:
        for r in rows:
            w.write(r)
    infos = w.written
    assert [i.path for i in infos] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    assert [i.stats.samples for i in infos] == [3, 3, 2]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    for info in infos:
        data = (tmp_path / info.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.bytes
    back = [s for info in infos for s in iter_samples(str(tmp_path / info.path))]
    assert [b["id"] for b in back] == [r["id"] for r in rows]
    for orig, got in zip(rows, back, strict=True):
        assert got["segments"] == orig["segments"]
        assert json.loads(got["meta"]) == json.loads(orig["meta"])
    assert back[-1]["segments"][0]["uri"] == "s3://bucket/big.mp4"
    table = read_shard(str(tmp_path / infos[0].path))
    assert table.schema == SAMPLE_SCHEMA and len(table) == 3


def test_rollover_by_bytes_and_determinism(tmp_path: Path) -> None:
    rows = _samples(6)
    limit = 10240  # one tar record: two of these small samples fit
    a = ShardWriter(str(tmp_path / "a"), "p", max_bytes=limit).write_all(rows)
    b = ShardWriter(str(tmp_path / "b"), "p", max_bytes=limit).write_all(rows)
    assert len(a) >= 3 and sum(i.stats.samples for i in a) == 6
    assert all(i.bytes <= limit or i.stats.samples == 1 for i in a)
    assert [i.sha256 for i in a] == [i.sha256 for i in b], "same samples must give byte-identical shards"


def test_stock_webdataset_reads_our_shards(tmp_path: Path) -> None:
    infos = ShardWriter(str(tmp_path), "p", max_samples=100).write_all(_samples(4))
    ds = wds.WebDataset([str(tmp_path / infos[0].path)], shardshuffle=False)
    got = list(ds)
    assert len(got) == 4
    first = got[0]
    doc = json.loads(first["json"])
    assert doc["kind"] == "image_caption" and first["__key__"] == doc["id"]
    assert first["000.jpg"].startswith(b"\xff\xd8")


def test_manifest_counts_and_urls(tmp_path: Path) -> None:
    infos = ShardWriter(str(tmp_path), "p", max_samples=2).write_all(_samples(5))
    write_shardset_manifest(str(tmp_path), infos)
    m = read_shardset_manifest(str(tmp_path))
    assert m["totals"]["samples"] == 5 and m["totals"]["shards"] == 3
    assert m["totals"]["modalities"]["image"]["segments"] == 5
    assert m["totals"]["kinds"] == {"image_caption": 5}
    assert shard_urls(str(tmp_path / "manifest.json")) == [str(tmp_path / i.path) for i in infos]


def test_reads_img2dataset_tar_written_by_plain_tarfile(tmp_path: Path) -> None:
    names = list(PHOTOS)[:3]
    path = write_img2dataset_tar(
        tmp_path / "00000.tar", [(f"http://x/{n}", photo_bytes(n, size=(32, 32)), PHOTOS[n]) for n in names]
    )
    recs = list(iter_records(str(path), source="laion"))
    samples = [r.sample for r in recs if r.sample]
    assert len(samples) == 3 and not [r for r in recs if r.reject]
    s = samples[0]
    assert s["kind"] == "image_caption" and s["source"] == "laion"
    assert [seg["modality"] for seg in s["segments"]] == ["image", "text"]
    assert s["segments"][1]["text"] == PHOTOS[names[0]]
    assert json.loads(s["meta"])["foreign"]["url"] == f"http://x/{names[0]}"


def test_hostile_tar_members_are_rejected_not_extracted(tmp_path: Path) -> None:
    data = tar_with(
        [
            ("ok.txt", b"a caption"),
            ("../../evil.txt", b"x"),
            ("/etc/evil.txt", b"x"),
            link("ok2.jpg", "/etc/passwd"),
            link("ok3.txt", "ok.txt", hard=True),
            ("bad.txt", b"\xff\xfe\xfa"),
            ("pickled.pyd", b"\x80\x04K\x01."),
        ]
    )
    path = tmp_path / "hostile.tar"
    path.write_bytes(data)
    recs = list(iter_records(str(path), source="x"))
    reasons = sorted(r.reject.reason for r in recs if r.reject)
    assert reasons == [
        "no usable members",
        "text is not utf-8",
        "unsafe tar member: absolute path",
        "unsafe tar member: link",
        "unsafe tar member: link",
        "unsafe tar member: parent path",
    ]
    assert [r.sample["segments"][0]["text"] for r in recs if r.sample] == ["a caption"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_truncated_tar_ends_in_a_reject(tmp_path: Path) -> None:
    infos = ShardWriter(str(tmp_path), "p", max_samples=100).write_all(_samples(3))
    data = (tmp_path / infos[0].path).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    recs = list(iter_records(str(cut)))
    assert recs[-1].reject is not None and recs[-1].reject.reason == "truncated or corrupt tar"
    assert all(r.sample for r in recs[:-1])
    (tmp_path / "junk.tar").write_bytes(random.Random(1).randbytes(3000))
    junk = list(iter_records(str(tmp_path / "junk.tar")))
    assert len(junk) == 1 and junk[0].reject is not None


def test_with_segment_meta_keeps_bytes() -> None:
    rows = _samples(2)
    table = samples_table(rows).slice(1, 1)
    out = with_segment_meta(table, ['{"a":1}', None])
    segs = out["segments"].to_pylist()[0]
    assert segs[0]["meta"] == '{"a":1}' and segs[0]["bytes"] == rows[1]["segments"][0]["bytes"]
    assert isinstance(out, pa.Table) and out.schema == SAMPLE_SCHEMA
