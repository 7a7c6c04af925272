"""Phase 1: one row of dedup features per sample, computed shard by shard.

Per sample: its node id and sample id, the exact keys (normalised text, media bytes), a MinHash
signature of its text (text kinds only), the pHash of its image (samples whose only media is one
image) and the chromaprint fingerprint of its audio (samples whose only media is one audio clip),
plus a MinHash of the fingerprint's item halves for bucketing. Features a sample cannot give
(an undecodable image, a clip too short to fingerprint) stay null and say why in ``error``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters.content_hash import media_digest, text_digest
from filters.dedup import chromaprint, minhash
from filters.dedup.buckets import BAND_SCHEMA, band_rows
from filters.dedup.config import DedupConfig
from filters.dedup.grouping import partition_of
from filters.dedup.inputs import ShardInput, node_of
from filters.dedup.phash import phash64
from shards import storage
from shards.codec import decode_sample
from shards.reader import iter_samples, split_key
from shards.tarstream import iter_members

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("node", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("text_key", pa.binary()),
        pa.field("media_key", pa.binary()),
        pa.field("minhash", pa.binary()),
        pa.field("shingles", pa.binary()),  # sorted distinct shingle hashes (uint32), for exact verification
        pa.field("phash", pa.uint64()),
        pa.field("chroma", pa.binary()),
        pa.field("chroma_minhash", pa.binary()),
        pa.field("error", pa.string()),
    ]
)


def _media(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in segments if s["modality"] != "text"]


def _payload_size(segments: list[dict[str, Any]]) -> int:
    return sum(len(s["bytes"]) if s.get("bytes") is not None else len((s.get("text") or "").encode()) for s in segments)


def _image_feature(data: bytes, cfg: DedupConfig) -> tuple[int | None, str | None]:
    try:
        return phash64(data, cfg.phash.max_pixels), None
    except Exception as e:  # noqa: BLE001 - any decoder failure only means "no pHash"
        return None, f"phash: {type(e).__name__}: {e}"[:200]


def _audio_feature(data: bytes, cfg: DedupConfig) -> tuple[np.ndarray | None, str | None]:
    try:
        return chromaprint.fingerprint(data, cfg.chromaprint.max_seconds), None
    except Exception as e:  # noqa: BLE001
        return None, f"chromaprint: {e}"[:200]


def sample_features(rows: list[dict[str, Any]], nodes: list[int], cfg: DedupConfig, threads: int = 4) -> pa.Table:
    """Features of samples (Sample rows as dicts) with their node ids."""
    n = len(rows)
    text_keys: list[bytes | None] = [None] * n
    media_keys: list[bytes | None] = [None] * n
    texts: dict[int, str] = {}
    images: dict[int, bytes] = {}
    audios: dict[int, bytes] = {}
    for i, row in enumerate(rows):
        segs = row["segments"]
        media = _media(segs)
        if row["kind"] in cfg.text_kinds:
            seg_texts = [s["text"] for s in segs if s["modality"] == "text" and s["text"]]
            if cfg.exact.text:
                text_keys[i] = text_digest(seg_texts)
            if seg_texts:
                texts[i] = "\n".join(seg_texts)
        if cfg.exact.media:
            media_keys[i] = media_digest(segs)
        if len(media) == 1 and media[0].get("bytes"):
            if media[0]["modality"] == "image" and cfg.phash.enabled:
                images[i] = media[0]["bytes"]
            elif media[0]["modality"] == "audio" and cfg.chromaprint.enabled:
                audios[i] = media[0]["bytes"]

    minhashes: list[bytes | None] = [None] * n
    shingles: list[bytes | None] = [None] * n
    mh = cfg.minhash
    if mh.enabled and texts:
        order = sorted(texts)
        ordered = [texts[i] for i in order]
        for start, stop in minhash.text_chunks(ordered):  # cache-sized: cost per text independent of the batch
            units, lengths = minhash.unit_hashes(ordered[start:stop], mh.unit)
            hashes, counts = minhash.ngram_hashes(units, lengths, mh.ngram)
            sigs = minhash.signatures(hashes, counts, mh.num_perm, mh.seed)
            sets = distinct_per_doc(hashes, counts) if mh.verify == "exact" else None
            for j, i in enumerate(order[start:stop]):
                if lengths[j] >= mh.min_units:
                    minhashes[i] = sigs[j].tobytes()
                    if sets is not None:
                        shingles[i] = sets[j].tobytes()

    errors: list[str | None] = [None] * n
    phashes: list[int | None] = [None] * n
    chromas: list[bytes | None] = [None] * n
    chroma_sigs: list[bytes | None] = [None] * n
    with ThreadPoolExecutor(threads) as pool:  # PIL decoding and fpcalc release the GIL
        image_jobs = {i: pool.submit(_image_feature, data, cfg) for i, data in images.items()}
        audio_jobs = {i: pool.submit(_audio_feature, data, cfg) for i, data in audios.items()}
        for i, job in image_jobs.items():
            phashes[i], errors[i] = job.result()
        cp = cfg.chromaprint
        for i, job in audio_jobs.items():
            fp, errors[i] = job.result()
            if fp is not None:
                chromas[i] = fp.tobytes()
                halves = chromaprint.half_items(fp)
                sig = minhash.signatures(halves, np.array([len(halves)]), cp.num_perm, cp.seed)[0]
                chroma_sigs[i] = sig.tobytes()

    return pa.Table.from_pydict(
        {
            "node": nodes,
            "id": [r["id"] for r in rows],
            "size": [_payload_size(r["segments"]) for r in rows],
            "text_key": text_keys,
            "media_key": media_keys,
            "minhash": minhashes,
            "shingles": shingles,
            "phash": phashes,
            "chroma": chromas,
            "chroma_minhash": chroma_sigs,
            "error": errors,
        },
        schema=FEATURES_SCHEMA,
    )


def distinct_per_doc(hashes: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Each document's shingle hashes, sorted and distinct (one lexsort for the whole batch)."""
    doc = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((hashes, doc))
    h, d = hashes[order], doc[order]
    keep = np.ones(len(h), dtype=bool)
    keep[1:] = (h[1:] != h[:-1]) | (d[1:] != d[:-1])
    h, d = h[keep].astype(np.uint32), d[keep]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(d, minlength=len(counts)))])
    return [h[bounds[i] : bounds[i + 1]] for i in range(len(counts))]


def iter_rows(path: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``start`` to ``stop`` of one of our shards. Members of the samples before ``start``
    are skipped by their headers, never read or decoded, so row ranges of one shard are cheap to
    hand to different workers. Our shards hold one sample per key, in order."""
    if start == 0 and stop is None:
        yield from iter_samples(path)
        return
    state = {"key": None, "row": -1}

    def want(member) -> bool:
        if not member.isfile():
            return False
        key = split_key(member.name)[0]
        if key != state["key"]:
            state["key"], state["row"] = key, state["row"] + 1
        return start <= state["row"] and (stop is None or state["row"] < stop)

    current: str | None = None
    members: dict[str, bytes] = {}
    with storage.open_read(path) as f:
        for member, data in iter_members(f, want):
            if data is None:
                if stop is not None and state["row"] >= stop:
                    break
                continue
            key, ext = split_key(member.name)
            if key != current:
                if current is not None:
                    yield decode_sample(current, members, source=path, locator=f"{path}#{current}")
                current, members = key, {}
            members[ext] = data
    if current is not None:
        yield decode_sample(current, members, source=path, locator=f"{path}#{current}")


def shard_features(shard: ShardInput, cfg: DedupConfig, chunk: int = 2048, start: int = 0, stop: int | None = None):
    """Features of the samples of one shard (or a row range of it), a chunk at a time."""
    rows: list[dict[str, Any]] = []
    nodes: list[int] = []
    produced = False
    for r, sample in enumerate(iter_rows(shard.path, start, stop), start=start):
        rows.append(sample)
        nodes.append(node_of(shard.index, r))
        if len(rows) >= chunk:
            yield sample_features(rows, nodes, cfg)
            produced = True
            rows, nodes = [], []
    if rows or not produced:
        yield sample_features(rows, nodes, cfg)


@dataclass(frozen=True)
class FeatureTask:
    """Rows ``start`` to ``stop`` of one shard: their features go to ``features_dir``, their band
    rows, split by shuffle partition, to ``bands_dir/p-NNNNN/`` (the candidates phase reads one
    partition at a time, so no worker ever holds more than a partition)."""

    task: int
    shard: ShardInput
    start: int
    stop: int
    cfg: DedupConfig
    features_dir: str
    bands_dir: str
    partitions: int


def band_file(bands_dir: str, partition: int, task: int) -> str:
    return storage.join(bands_dir, f"p-{partition:05d}", f"t-{task:06d}.parquet")


def features_task(t: FeatureTask) -> dict[str, Any]:
    """Features and band rows of one row range: features streamed to Parquet a chunk at a time,
    band rows kept per partition (about 100 bytes per sample) and written at the end."""
    rows = errors = 0
    by_part: dict[int, list[pa.Table]] = {}
    path = storage.join(t.features_dir, f"part-{t.task:06d}.parquet")
    storage.makedirs(t.features_dir)
    with storage.atomic_write(path) as f, pq.ParquetWriter(f, FEATURES_SCHEMA) as writer:
        for table in shard_features(t.shard, t.cfg, start=t.start, stop=t.stop):
            writer.write_table(table)
            rows += len(table)
            errors += len(table) - table["error"].null_count
            bands = band_rows(table, t.cfg)
            if not len(bands):
                continue
            part = partition_of(bands["key"].to_numpy(), t.partitions)
            order = np.argsort(part, kind="stable")
            bands, part = bands.take(pa.array(order)), part[order]
            bounds = np.searchsorted(part, np.arange(t.partitions + 1))
            for p in np.flatnonzero(np.diff(bounds)).tolist():
                by_part.setdefault(p, []).append(bands.slice(bounds[p], bounds[p + 1] - bounds[p]))
    for p, tables in by_part.items():
        target = band_file(t.bands_dir, p, t.task)
        storage.makedirs(target.rsplit("/", 1)[0])
        with storage.atomic_write(target) as f:
            pq.write_table(pa.concat_tables(tables).cast(BAND_SCHEMA), f)
    return {"rows": rows, "errors": errors, "partitions": sorted(by_part)}
