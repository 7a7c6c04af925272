"""Vectorised MinHash, bit-compatible with datasketch's default ``affine32`` scheme.

datasketch hashes every shingle, pre-mixes it with the 32-bit MurmurHash3 finaliser and applies
``num_perm`` affine permutations ``a * h + b mod 2**32``; a document's signature is the minimum per
permutation. We do the same arithmetic for a whole batch of documents at once: one ``(shingles,
num_perm)`` uint32 matrix per chunk and ``np.minimum.reduceat`` over document boundaries, so the
per-shingle Python loop of ``MinHash.update`` disappears. Given the same shingle hashes and seed,
``signatures`` equals ``MinHash(num_perm, seed, hashfunc=int).update_batch(hashes).hashvalues``.

Shingles are word n-grams (``\\w+`` tokens of the lower-cased text) or character n-grams. Words
are hashed once and n-grams are combined in numpy, so no n-gram string is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_HASH = np.uint32(0xFFFFFFFF)
_WORD_SEPARATOR = r"[^\p{L}\p{M}\p{N}]+"
_BYTE_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-64 prime
_CHUNK_ELEMENTS = 1 << 19  # shingles x permutations per matrix: 2 MB of uint32, cache-sized
_CHUNK_CHARS = 1 << 18  # characters tokenised at a time (the temporaries are ~40 bytes per character)
# Odd 64-bit multipliers that combine the hashes of an n-gram's members (position-dependent).
_NGRAM_MULTIPLIERS = np.random.RandomState(0x5EED).randint(1, 1 << 62, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(
    1
)


@cache
def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 parameters ``(a, b)`` for ``num_perm`` and ``seed``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch pre-mixes every input hash with it)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def ngram_hashes(units: np.ndarray, lengths: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """uint32 hash of every n-gram of every document, and n-grams per document.

    The n-gram hash is a position-weighted 64-bit sum of its units' hashes, folded to 32 bits. A
    document shorter than ``ngram`` units gives one shingle of all its units, as text-dedup tools
    do, so short documents still match their exact copies.
    """
    lengths = lengths.astype(np.int64)
    counts = np.where(lengths >= ngram, lengths - ngram + 1, (lengths > 0).astype(np.int64))
    doc_starts = np.cumsum(lengths) - lengths
    first = np.cumsum(counts) - counts
    starts = np.repeat(doc_starts, counts) + (np.arange(int(counts.sum())) - np.repeat(first, counts))
    width = np.minimum(np.repeat(lengths, counts), ngram)  # units in each shingle (< ngram only when short)
    padded = np.concatenate([units.astype(np.uint64), np.zeros(ngram, dtype=np.uint64)])
    acc = np.zeros(len(starts), dtype=np.uint64)
    for k in range(ngram):
        acc += np.where(k < width, padded[starts + k], np.uint64(0)) * _NGRAM_MULTIPLIERS[k]
    return ((acc >> np.uint64(32)) ^ acc).astype(np.uint32), counts


def word_units(texts: Sequence[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of every lower-cased word (runs of letters, marks, digits), concatenated, and
    words per text. Splitting runs in Arrow (RE2, Unicode classes); hashing is a polynomial over
    each word's UTF-8 bytes in numpy, finished with splitmix64."""
    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(texts, pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    words = pc.split_pattern_regex(pc.utf8_lower(arr), _WORD_SEPARATOR)
    flat = pc.list_flatten(words)
    parents = pc.list_parent_indices(words).to_numpy()
    offsets = np.frombuffer(flat.buffers()[1], dtype=np.int64, count=len(flat) + 1, offset=flat.offset * 8)
    word_len = np.diff(offsets)
    nonempty = word_len > 0  # the split leaves empty strings where a text starts or ends with a separator
    counts = np.bincount(parents[nonempty], minlength=len(arr)).astype(np.int64)
    if not nonempty.any():
        return np.zeros(0, dtype=np.uint64), counts
    base = offsets[0]
    data = np.frombuffer(flat.buffers()[2], dtype=np.uint8)[base : offsets[-1]].astype(np.uint64)
    position = np.arange(len(data)) - np.repeat(offsets[:-1] - base, word_len)
    powers = np.cumprod(np.full(int(word_len.max()), _BYTE_MULTIPLIER, dtype=np.uint64))
    hashes = np.add.reduceat((data + np.uint64(1)) * powers[position], (offsets[:-1] - base)[nonempty])
    return splitmix64(hashes), counts


def char_units(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Code points of the whitespace-normalised, lower-cased texts, concatenated."""
    normal = [" ".join(t.lower().split()) for t in texts]
    lengths = np.fromiter((len(t) for t in normal), dtype=np.int64, count=len(texts))
    units = np.frombuffer("".join(normal).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    return units, lengths


def shingle_hashes(texts: Sequence[str], ngram: int = 5, unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """(uint32 shingle hashes of all texts concatenated, shingles per text)."""
    units, lengths = unit_hashes(texts, unit)
    return ngram_hashes(units, lengths, ngram)


def unit_hashes(texts: Sequence[str], unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """(hashes of every word or character, concatenated; units per text)."""
    if unit not in ("word", "char"):
        raise ValueError(f"shingle unit must be 'word' or 'char', not {unit!r}")
    return (word_units if unit == "word" else char_units)(texts)


def signatures(hashes: np.ndarray, counts: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """``(docs, num_perm)`` uint32 MinHash signatures; a document without shingles is all ``MAX_HASH``.

    The matrix is laid out ``(num_perm, shingles)`` so the per-document minimum reduces contiguous
    memory, in chunks that stay in cache (about 4x faster than the row-major layout).
    """
    a, b = permutations(num_perm, seed)
    out = np.full((num_perm, len(counts)), MAX_HASH, dtype=np.uint32)
    nonempty = np.flatnonzero(counts > 0)
    mixed = fmix32(hashes.astype(np.uint32))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    max_shingles = max(1, _CHUNK_ELEMENTS // num_perm)
    ends = offsets[nonempty + 1]
    i = 0
    while i < len(nonempty):  # chunks of whole documents, about max_shingles shingles each
        j = int(np.searchsorted(ends, offsets[nonempty[i]] + max_shingles, side="right"))
        j = max(j, i + 1)
        docs = nonempty[i:j]
        lo, hi = offsets[docs[0]], offsets[docs[-1] + 1]
        matrix = a[:, None] * mixed[None, lo:hi]
        matrix += b[:, None]
        out[:, docs] = np.minimum.reduceat(matrix, offsets[docs] - lo, axis=1)
        i = j
    return np.ascontiguousarray(out.T)


def text_chunks(texts: Sequence[str] | pa.Array, max_chars: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of whole texts of about ``max_chars`` characters each.

    Tokenising and shingling make several 8-byte temporaries per input byte; done a chunk at a
    time they stay in cache and the cost per document does not grow with the batch."""
    max_chars = max_chars or _CHUNK_CHARS
    if isinstance(texts, pa.Array | pa.ChunkedArray):
        lengths = pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        lengths = np.fromiter((len(t) if t else 0 for t in texts), dtype=np.int64, count=len(texts))
    if not len(lengths):
        return []
    ends = np.cumsum(lengths)
    out, start = [], 0
    while start < len(lengths):
        base = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, base + max_chars, side="right"))
        stop = min(len(lengths), max(stop, start + 1))
        out.append((start, stop))
        start = stop
    return out


def text_signatures(
    texts: Sequence[str], num_perm: int = 128, ngram: int = 5, unit: str = "word", seed: int = 1
) -> np.ndarray:
    """``(docs, num_perm)`` signatures of texts, computed a cache-sized chunk at a time."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start, stop in text_chunks(texts):
        hashes, counts = shingle_hashes(texts[start:stop], ngram, unit)
        out[start:stop] = signatures(hashes, counts, num_perm, seed)
    return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots, row by row (datasketch's ``MinHash.jaccard``)."""
    return np.mean(sig_a == sig_b, axis=-1)


@dataclass(frozen=True)
class LshParams:
    bands: int
    rows: int

    @classmethod
    def for_threshold(
        cls, threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
    ) -> LshParams:
        """datasketch's optimum (weighted false positive + false negative area) for ``threshold``."""
        return cls(*_optimal_lsh(threshold, num_perm, fp_weight, fn_weight))

    def candidate_probability(self, jaccard: float) -> float:
        """Chance that two documents at ``jaccard`` share at least one band."""
        return 1.0 - (1.0 - jaccard**self.rows) ** self.bands


@cache
def _optimal_lsh(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """datasketch's numerical integration takes about half a second: once per process."""
    from datasketch.lsh import _optimal_param

    bands, rows = _optimal_param(threshold, num_perm, fp_weight, fn_weight)
    return int(bands), int(rows)


def band_keys(sigs: np.ndarray, params: LshParams, salt: int = 0) -> np.ndarray:
    """``(docs, bands)`` uint64 bucket keys: each band's rows hashed together with its band index."""
    n = len(sigs)
    used = sigs[:, : params.bands * params.rows].reshape(n, params.bands, params.rows).astype(np.uint64)
    acc = np.zeros((n, params.bands), dtype=np.uint64)
    for k in range(params.rows):
        acc += used[:, :, k] * _NGRAM_MULTIPLIERS[k % len(_NGRAM_MULTIPLIERS)]
    acc += np.arange(params.bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    return splitmix64(acc)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer, so structured keys spread evenly over sort partitions."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
