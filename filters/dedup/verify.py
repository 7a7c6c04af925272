"""Phase 3: confirm MinHash and chromaprint candidates against the full signatures/fingerprints.

``compare_pairs`` scores the pairs whose two endpoint rows (each with its node's blob) are at hand
and drops those below the method's acceptance. The driver calls it on a small graph; on a large one
``filters.dedup.partitioned`` attaches the blobs in one task per feature file and calls it once per
pair partition, so no process holds all signatures.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup import chromaprint
from filters.dedup.buckets import CHROMAPRINT, EDGE_SCHEMA, MINHASH, edges_table
from filters.dedup.config import DedupConfig
from filters.dedup.grouping import runs, unique_rows


def blob_column(method: int, cfg: DedupConfig) -> str:
    """The feature that verifies a method's candidates."""
    if method == CHROMAPRINT:
        return "chroma"
    return "shingles" if cfg.minhash.verify == "exact" else "minhash"


def exact_jaccard(a: bytes, b: bytes) -> float:
    x, y = np.frombuffer(a, np.uint32), np.frombuffer(b, np.uint32)
    common = len(np.intersect1d(x, y, assume_unique=True))
    union = len(x) + len(y) - common
    return common / union if union else 1.0


JOIN_SCHEMA = pa.schema(
    [
        pa.field("node", pa.int64()),
        pa.field("side", pa.int8()),  # -1 feature row, 0 endpoint a, 1 endpoint b
        pa.field("other", pa.int64()),
        pa.field("blob", pa.binary()),
    ]
)
FEATURE_SIDE = -1


def feature_rows(features: pa.Table, method: int, column: str) -> pa.Table:
    blob = features[column]
    valid = features.filter(pc.is_valid(blob))
    n = len(valid)
    return pa.Table.from_arrays(
        [
            valid["node"],
            pa.array(np.full(n, FEATURE_SIDE, dtype=np.int8)),
            pa.array(np.full(n, -1, dtype=np.int64)),
            valid[column].cast(pa.binary()),
        ],
        schema=JOIN_SCHEMA,
    )


def endpoint_rows(candidates: pa.Table, method: int) -> pa.Table:
    mine = candidates.filter(pc.equal(candidates["method"], method))
    a, b = mine["a"].to_numpy(), mine["b"].to_numpy()
    n = len(a)
    return pa.Table.from_arrays(
        [
            pa.array(np.concatenate([a, b])),
            pa.array(np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])),
            pa.array(np.concatenate([b, a])),
            pa.nulls(2 * n, pa.binary()),
        ],
        schema=JOIN_SCHEMA,
    )


def attach_blobs(rows: pa.Table) -> pa.Table:
    """Partition by node: every endpoint row gets its node's blob (endpoints without one drop)."""
    node = rows["node"].to_numpy()
    side = rows["side"].to_numpy()
    is_feature = side == FEATURE_SIDE
    feat_idx = np.flatnonzero(is_feature)
    feat_idx = feat_idx[np.argsort(node[feat_idx], kind="stable")]
    ends = np.flatnonzero(~is_feature)
    pos = np.searchsorted(node[feat_idx], node[ends])
    found = pos < len(feat_idx)
    found[found] = node[feat_idx[pos[found]]] == node[ends[found]]
    ends, source = ends[found], feat_idx[pos[found]]
    return pa.Table.from_arrays(
        [
            rows["node"].take(pa.array(ends)),
            rows["side"].take(pa.array(ends)),
            rows["other"].take(pa.array(ends)),
            rows["blob"].take(pa.array(source)),
        ],
        schema=JOIN_SCHEMA,
    )


def compare_pairs(rows: pa.Table, method: int, cfg: DedupConfig) -> pa.Table:
    """Partition by pair: score each pair whose two endpoints arrived, keep the accepted ones."""
    node = rows["node"].to_numpy()
    other = rows["other"].to_numpy()
    side = rows["side"].to_numpy()
    a = np.where(side == 0, node, other)
    b = np.where(side == 0, other, node)
    keep = unique_rows(a, b, side)  # sorted by (a, b, side): a pair's side 0 then side 1
    starts, sizes = runs(a[keep], b[keep])
    complete = sizes == 2
    first, second = keep[starts[complete]], keep[starts[complete] + 1]
    blobs = rows["blob"]
    if method == MINHASH and cfg.minhash.verify == "exact":
        fa = blobs.take(pa.array(first)).to_pylist()
        fb = blobs.take(pa.array(second)).to_pylist()
        score = np.array([exact_jaccard(x, y) for x, y in zip(fa, fb, strict=True)])
        ok = score >= cfg.minhash.accept()
    elif method == MINHASH:
        width = cfg.minhash.num_perm
        sig_a = np.frombuffer(b"".join(blobs.take(pa.array(first)).to_pylist()), np.uint32).reshape(-1, width)
        sig_b = np.frombuffer(b"".join(blobs.take(pa.array(second)).to_pylist()), np.uint32).reshape(-1, width)
        score = np.mean(sig_a == sig_b, axis=1) if len(first) else np.zeros(0)
        ok = score >= cfg.minhash.accept()
    else:
        cp = cfg.chromaprint
        fa = blobs.take(pa.array(first)).to_pylist()
        fb = blobs.take(pa.array(second)).to_pylist()
        score = np.array(
            [
                chromaprint.similarity(
                    np.frombuffer(x, np.uint32), np.frombuffer(y, np.uint32), cp.max_offset, cp.min_overlap
                )
                for x, y in zip(fa, fb, strict=True)
            ]
        )
        ok = score >= cp.min_similarity
    if not len(first):
        return EDGE_SCHEMA.empty_table()
    return edges_table(a[first][ok], b[first][ok], method, score[ok])
