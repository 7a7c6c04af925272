"""Vectorised group operations inside one partition.

Every global step of the dedup is "bring rows with the same key together, then work on each key's
rows": band buckets, joins of edges with features, star contraction of the graph. Rows get a
partition number from their key (``partition_of``), are written to that partition's folder, and one
task reads a whole partition, in which numpy sorts and splits the rows by key. A partition holds
about ``rows / partitions`` rows: that, not the corpus, bounds a worker's memory.
"""

from __future__ import annotations

import numpy as np

from filters.dedup.minhash import splitmix64

PART = "_part"


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    return (splitmix64(np.asarray(keys).astype(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One 64-bit key per (a, b) pair, for partitioning edges."""
    return splitmix64(a.astype(np.uint64)) ^ b.astype(np.uint64)


def runs(*sorted_columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal rows in sorted columns."""
    n = len(sorted_columns[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for c in sorted_columns:
        change |= c[1:] != c[:-1]
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    return starts, np.diff(np.concatenate([starts, [n]])).astype(np.int64)


def star_pairs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first member, other member) index pairs of every run: the star around each run's first row."""
    total = int(sizes.sum())
    run_id = np.repeat(np.arange(len(starts)), sizes)
    members = np.ones(total, dtype=bool)
    members[starts] = False
    members = np.flatnonzero(members)
    return starts[run_id[members]], members


def run_pairs(starts: np.ndarray, sizes: np.ndarray, max_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs within each run: all pairs up to ``max_bucket`` members; beyond, a star from the
    first member plus a chain through consecutive members (linear in the run, still connected)."""
    first, second = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    small = (sizes > 1) & (sizes <= max_bucket)
    for size in np.unique(sizes[small]):
        at = starts[small & (sizes == size)]
        iu, ju = np.triu_indices(int(size), 1)
        first.append((at[:, None] + iu[None, :]).ravel())
        second.append((at[:, None] + ju[None, :]).ravel())
    for at, size in zip(starts[sizes > max_bucket].tolist(), sizes[sizes > max_bucket].tolist(), strict=True):
        members = np.arange(at + 1, at + size, dtype=np.int64)
        first += [np.full(size - 1, at, dtype=np.int64), members[:-1]]
        second += [members, members[1:]]
    return np.concatenate(first), np.concatenate(second)


def unique_rows(*columns: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in lexicographic order of the columns."""
    n = len(columns[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(columns[::-1])
    keep = np.ones(n, dtype=bool)
    same = np.ones(n - 1, dtype=bool)
    for c in columns:
        sc = c[order]
        same &= sc[1:] == sc[:-1]
    keep[1:] = ~same
    return order[keep]
