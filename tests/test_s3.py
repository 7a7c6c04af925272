"""Sources read from and shards written to a real S3 API: moto's server on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.inspect_shards import inspect_target
from pipelines.recipe import recipe_from_dict
from shards import storage
from shards.manifest import shard_urls
from shards.reader import iter_samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()
    storage.configure()
    mp.undo()


def test_sources_and_shards_on_s3(s3_endpoint: str, demo_sources: dict[str, str]) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="raw")
    s3.create_bucket(Bucket="corpus")
    media = Path(demo_sources["media"])
    uploaded = 0
    for f in sorted(media.iterdir()):
        if f.stem in ("astronaut", "coffee", "chelsea", "truncated", "not-utf8") or f.stem.startswith("espeak"):
            s3.upload_file(str(f), "raw", f"media/{f.name}")
            uploaded += 1
    s3.upload_file(demo_sources["docs"], "raw", "docs.jsonl")
    s3.upload_file(str(Path(demo_sources["wds"]) / "00000.tar"), "raw", "wds/00000.tar")
    recipe = recipe_from_dict(
        {
            "name": "s3",
            "output": "s3://corpus/runs/r1",
            "sources": [
                {"name": "media", "type": "local", "path": "s3://raw/media", "unit_size": 4},
                {"name": "docs", "type": "jsonl", "path": "s3://raw/docs.jsonl"},
                {"name": "wds", "type": "webdataset", "path": "s3://raw/wds"},
            ],
            "pipeline": [{"op": "validate"}],
            "shards": {"max_samples": 3},
            "storage": {"endpoint_url": s3_endpoint},
            "executor": {"type": "local"},
        }
    )
    m = run_recipe(recipe, progress=False)
    # 3 photo pairs + 3 espeak pairs + truncated.jpg + not-utf8.txt; 12 JSONL lines; 5 tar inputs
    assert m["ingested"] == 8 + 12 + 5
    # the interleaved JSONL document points at media/ paths that exist only locally
    assert m["rejects_by_reason"] == {
        "undecodable image": 1,
        "text is not utf-8": 1,
        "broken json line": 1,
        "missing media file": 1,
        "unsafe tar member: parent path": 1,
    }
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="runs/r1/")["Contents"]]
    assert "runs/r1/manifest.json" in keys and "runs/r1/shards/manifest.json" in keys
    assert not [k for k in keys if ".tmp-" in k]
    urls = shard_urls("s3://corpus/runs/r1/shards/manifest.json")
    assert all(u.startswith("s3://corpus/runs/r1/shards/") for u in urls)
    assert sum(1 for u in urls for _ in iter_samples(u)) == m["written"] == 25 - 5
    report = audit("s3://corpus/runs/r1")
    assert report.balanced, report.summary()
    assert "samples: 20" in inspect_target("s3://corpus/runs/r1")
    from trainer.data import EntryStream, resolve_entry

    entry = resolve_entry({"name": "s3", "manifest": "s3://corpus/runs/r1/shards/manifest.json"})
    stream = EntryStream(entry, seed=0, index=0, stream=0, streams=1)
    streamed = {stream.next_sample()["id"] for _ in range(entry.samples)}
    assert streamed == {s["id"] for u in urls for s in iter_samples(u)}, "the trainer streams the S3 shards"
    again = run_recipe(recipe, progress=False)
    assert again["written"] == m["written"], "a re-run on S3 skips committed units"


def test_large_shards_upload_in_parts_and_verify(s3_endpoint: str) -> None:
    import hashlib
    import random

    from shards.schema import Segment, make_sample
    from shards.writer import ShardWriter

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="big")
    storage.configure(endpoint_url=s3_endpoint, default_block_size=5 << 20)
    try:
        rng = random.Random(1)
        rows = [
            make_sample("big", "video", [Segment("video", bytes=rng.randbytes(3 << 20))], locator=f"v{i}")
            for i in range(4)
        ]
        (info,) = ShardWriter("s3://big/shards", "p", max_samples=10).write_all(rows)
        head = s3.head_object(Bucket="big", Key="shards/p-00000.tar")
        assert head["ContentLength"] == info.bytes > 12 << 20
        assert head["ETag"].strip('"').endswith("-3"), "uploaded as a 3-part multipart upload"
        data = s3.get_object(Bucket="big", Key="shards/p-00000.tar")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == info.sha256
        back = list(iter_samples("s3://big/shards/p-00000.tar"))
        assert [b["segments"][0]["bytes"] for b in back] == [r["segments"][0]["bytes"] for r in rows]
    finally:
        storage.configure(endpoint_url=s3_endpoint)


def test_ray_run_against_s3(s3_endpoint: str, demo_sources: dict[str, str], ray_local) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="rayraw")
    s3.upload_file(demo_sources["docs"], "rayraw", "docs.jsonl")
    s3.upload_file(demo_sources["pairs"], "rayraw", "pairs.parquet")
    storage_opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}  # Ray workers get these
    recipe = recipe_from_dict(
        {
            "name": "s3ray",
            "output": "s3://rayraw/run",
            "sources": [
                {"name": "docs", "type": "jsonl", "path": "s3://rayraw/docs.jsonl", "unit_bytes": 600},
                {"name": "pairs", "type": "parquet", "path": "s3://rayraw/pairs.parquet"},
            ],
            "pipeline": [{"op": "validate"}],
            "storage": storage_opts,
            "executor": {"type": "ray"},
        }
    )
    m = run_recipe(recipe, progress=False)
    assert m["ingested"] == 12 + 4
    assert audit("s3://rayraw/run").balanced
