"""Phase 2: band buckets via a shuffle, and the candidate pairs found in each bucket.

Every method turns a sample's features into bucket keys ("band rows"); samples sharing a key are
candidates. Exact keys carry the rest of their 128-bit hash and pHash rows carry the full hash, so
those pairs are confirmed inside the bucket. MinHash and chromaprint candidates are only
candidates: the verify phase compares their full signatures or fingerprints.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup import phash
from filters.dedup.config import DedupConfig
from filters.dedup.grouping import run_pairs, runs, star_pairs, unique_rows
from filters.dedup.minhash import band_keys, splitmix64

EXACT_TEXT, EXACT_MEDIA, MINHASH, PHASH, CHROMAPRINT = range(5)
METHODS = ("exact_text", "exact_media", "minhash", "phash", "chromaprint")
VERIFIED_LATER = (MINHASH, CHROMAPRINT)

BAND_SCHEMA = pa.schema(
    [
        pa.field("key", pa.uint64()),
        pa.field("node", pa.int64()),
        pa.field("method", pa.int8()),
        pa.field("probe", pa.bool_()),
        pa.field("check", pa.uint64()),
    ]
)
EDGE_SCHEMA = pa.schema(
    [
        pa.field("a", pa.int64()),
        pa.field("b", pa.int64()),
        pa.field("method", pa.int8()),
        pa.field("score", pa.float32()),
    ]
)


def _salt(method: int) -> np.uint64:
    return splitmix64(np.array([method + 1], dtype=np.uint64))[0]


def _valid(features: pa.Table, column: str) -> tuple[np.ndarray, pa.Array]:
    col = features[column].combine_chunks()
    idx = np.flatnonzero(pc.is_valid(col).to_numpy(zero_copy_only=False))
    return features["node"].to_numpy()[idx], col.take(pa.array(idx, pa.int64()))


def _blobs(values: pa.Array, dtype: type, width: int) -> np.ndarray:
    """Fixed-width binary values as a 2-d array without a Python loop."""
    if len(values) == 0:
        return np.zeros((0, width), dtype=dtype)
    data = values.buffers()[2]
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32, count=len(values) + 1, offset=values.offset * 4)
    flat = np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return flat.view(dtype).reshape(len(values), width)


def _table(key, node, method, probe=None, check=None) -> pa.Table:
    n = len(node)
    return pa.Table.from_arrays(
        [
            pa.array(key, pa.uint64()),
            pa.array(node, pa.int64()),
            pa.array(np.full(n, method, dtype=np.int8)),
            pa.array(np.zeros(n, dtype=bool) if probe is None else probe),
            pa.array(np.zeros(n, dtype=np.uint64) if check is None else check, pa.uint64()),
        ],
        schema=BAND_SCHEMA,
    )


def band_rows(features: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Bucket keys of every method for a batch of feature rows."""
    parts = [BAND_SCHEMA.empty_table()]
    for method, column in ((EXACT_TEXT, "text_key"), (EXACT_MEDIA, "media_key")):
        nodes, keys = _valid(features, column)
        if len(nodes):
            digest = _blobs(keys, np.uint64, 2)
            parts.append(_table(splitmix64(digest[:, 0] ^ _salt(method)), nodes, method, check=digest[:, 1]))
    if cfg.minhash.enabled:
        nodes, sigs = _valid(features, "minhash")
        if len(nodes):
            lsh = cfg.minhash.lsh()
            keys = band_keys(_blobs(sigs, np.uint32, cfg.minhash.num_perm), lsh, int(_salt(MINHASH)))
            parts.append(_table(keys.ravel(), np.repeat(nodes, lsh.bands), MINHASH))
    if cfg.phash.enabled:
        nodes, hashes = _valid(features, "phash")
        if len(nodes):
            values = hashes.to_numpy(zero_copy_only=False).astype(np.uint64)
            rows, keys, probes = phash.band_rows(values, cfg.phash.max_distance, cfg.phash.bands, int(_salt(PHASH)))
            parts.append(_table(keys, nodes[rows], PHASH, probes, values[rows]))
    if cfg.chromaprint.enabled:
        nodes, sigs = _valid(features, "chroma_minhash")
        if len(nodes):
            lsh = cfg.chromaprint.lsh()
            keys = band_keys(_blobs(sigs, np.uint32, cfg.chromaprint.num_perm), lsh, int(_salt(CHROMAPRINT)))
            parts.append(_table(keys.ravel(), np.repeat(nodes, lsh.bands), CHROMAPRINT))
    return pa.concat_tables(parts)


def edges_table(a: np.ndarray, b: np.ndarray, method: np.ndarray | int, score: np.ndarray | float) -> pa.Table:
    """Edges with ``a < b``, each distinct (a, b, method) once."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    method = np.broadcast_to(np.asarray(method, dtype=np.int8), lo.shape)
    score = np.broadcast_to(np.asarray(score, dtype=np.float32), lo.shape)
    keep = unique_rows(lo, hi, method)
    keep = keep[lo[keep] != hi[keep]]
    return pa.Table.from_arrays(
        [pa.array(lo[keep]), pa.array(hi[keep]), pa.array(method[keep]), pa.array(score[keep])], schema=EDGE_SCHEMA
    )


def bucket_candidates(rows: pa.Table, cfg: DedupConfig) -> pa.Table:
    """Candidate (and, for exact and pHash, confirmed) pairs from the band rows of one partition."""
    key = rows["key"].to_numpy()
    node = rows["node"].to_numpy()
    method = rows["method"].to_numpy()
    probe = rows["probe"].to_numpy(zero_copy_only=False)
    check = rows["check"].to_numpy()
    out = [EDGE_SCHEMA.empty_table()]
    for m in np.unique(method).tolist():
        sel = np.flatnonzero(method == m)
        if m in (EXACT_TEXT, EXACT_MEDIA):  # equal key and check: the full 128-bit hash is equal
            order = sel[np.lexsort((node[sel], check[sel], key[sel]))]
            first, member = star_pairs(*runs(key[order], check[order]))
            out.append(edges_table(node[order][first], node[order][member], m, 1.0))
            continue
        order = sel[np.lexsort((node[sel], key[sel]))]
        starts, sizes = runs(key[order])
        i, j = run_pairs(starts, sizes, cfg.max_bucket)
        a, b = node[order][i], node[order][j]
        if m == PHASH:
            both_probes = probe[order][i] & probe[order][j]
            distance = phash.hamming(check[order][i], check[order][j])
            ok = ~both_probes & (distance <= cfg.phash.max_distance) & (a != b)
            out.append(edges_table(a[ok], b[ok], m, 1.0 - distance[ok] / phash.HASH_BITS))
        else:
            out.append(edges_table(a, b, m, np.nan))
    return pa.concat_tables(out)
