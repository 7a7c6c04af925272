"""The dedup's task path without Ray: a one-shard input cut into row ranges, run on a local
process pool, finds the planted duplicates; chunked signatures equal one-call signatures; the
partitioned verify/components/kept-id steps drop exactly what their in-driver forms drop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from filters.dedup import minhash, run_dedup
from filters.dedup.features import iter_rows
from filters.dedup.planted import planted_scaled, score_clusters
from shards.manifest import write_shardset_manifest
from shards.reader import iter_samples
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter


def test_chunked_signatures_equal_one_call(monkeypatch) -> None:
    texts = planted_scaled(60, words=40).texts + ["", "a b"]
    whole = minhash.signatures(*minhash.shingle_hashes(texts, 5), 64, 1)
    monkeypatch.setattr(minhash, "_CHUNK_CHARS", 500)
    assert len(minhash.text_chunks(texts)) > 5
    assert np.array_equal(minhash.text_signatures(texts, 64), whole)


def test_one_shard_runs_as_row_ranges_on_a_local_pool(tmp_path: Path) -> None:
    n = 2500
    corpus = planted_scaled(n, words=60)
    ids = {}
    with ShardWriter(str(tmp_path / "shards"), "docs", max_samples=n) as w:
        for i, text in enumerate(corpus.texts):
            sample = make_sample("t", "text", [Segment("text", text=text)], locator=f"doc/{i}")
            ids[sample["id"]] = i
            w.write(sample)
    write_shardset_manifest(str(tmp_path / "shards"), w.written, {})
    tar = str(next((tmp_path / "shards").glob("*.tar")))
    every = [s["id"] for s in iter_samples(tar)]
    assert [s["id"] for s in iter_rows(tar, 1000, 1700)] == every[1000:1700]
    assert [s["id"] for s in iter_rows(tar, 2400)] == every[2400:]

    report = run_dedup(
        str(tmp_path / "shards"),
        work_dir=str(tmp_path / "work"),
        out=str(tmp_path / "out"),
        config={"phash": False, "chromaprint": False},
        executor="local",
        workers=2,
    )
    assert report["executor"]["kind"] == "local"
    assert report["phases"]["features"]["tasks"] >= 2  # one shard, several workers
    assert report["phases"]["features"]["worker_peak_rss"] > 0
    roots = list(range(n))
    assert [p.name for p in (tmp_path / "out" / "rejects").iterdir()] == ["dedup.parquet"], "ledger parts merged"
    for r in pq.read_table(tmp_path / "out" / "rejects" / "dedup.parquet").to_pylist():
        roots[ids[r["id"]]] = ids[json.loads(r["detail"])["kept"]]
    scores = score_clusters(roots, corpus.true_pairs)
    assert scores.pair_precision == 1.0 and scores.drop_precision == 1.0
    assert scores.pair_recall >= 0.99 and scores.drop_recall >= 0.99


def test_partitioned_graph_steps_equal_the_driver_ones(tmp_path: Path) -> None:
    """``local_graph_max: 0`` sends verification, connected components and the kept-id lookup
    through partition files (several feature files and partitions): same drops, same details."""
    n = 1500
    corpus = planted_scaled(n, words=40)
    with ShardWriter(str(tmp_path / "shards"), "docs", max_samples=n // 3 + 1) as w:
        for i, text in enumerate(corpus.texts):
            w.write(make_sample("t", "text", [Segment("text", text=text)], locator=f"doc/{i}"))
    write_shardset_manifest(str(tmp_path / "shards"), w.written, {})
    ledgers, reports = {}, {}
    for name, extra in (("driver", {}), ("partitioned", {"local_graph_max": 0, "task_rows": 300, "partitions": 5})):
        reports[name] = run_dedup(
            str(tmp_path / "shards"),
            work_dir=str(tmp_path / f"work-{name}"),
            out=str(tmp_path / f"out-{name}"),
            config={"phash": False, "chromaprint": False, **extra},
            executor="local",
            workers=2,
        )
        rows = pq.read_table(tmp_path / f"out-{name}" / "rejects" / "dedup.parquet").to_pylist()
        ledgers[name] = sorted((r["id"], r["detail"]) for r in rows)
    phases = reports["partitioned"]["phases"]
    assert phases["edges"]["verify"] == phases["components"]["mode"] == phases["duplicates"]["mode"] == "distributed"
    assert phases["components"]["rounds"] >= 1 and phases["edges"]["tasks"] > 5
    assert reports["driver"]["phases"]["components"]["mode"] == "local"
    assert ledgers["partitioned"] == ledgers["driver"] and len(ledgers["driver"]) > 100
