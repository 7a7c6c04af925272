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
    lengths = lengths.astype(np.int64, copy=False)
    long = lengths >= ngram
    counts = np.where(long, lengths - ngram + 1, (lengths > 0).astype(np.int64))
    total = int(counts.sum())
    units = units.astype(np.uint64, copy=False)
    # every window of the concatenated units, from contiguous slices (no gathers); the windows
    # that start inside a document and end in it are its n-grams
    windows = max(len(units) - ngram + 1, 0)
    acc = units[:windows] * _NGRAM_MULTIPLIERS[0]
    for k in range(1, ngram):
        acc += units[k : k + windows] * _NGRAM_MULTIPLIERS[k]
    if len(lengths) == 1 and long[0]:  # one document: every window is one of its n-grams
        return ((acc >> np.uint64(32)) ^ acc).astype(np.uint32), counts
    doc_starts = np.cumsum(lengths) - lengths
    first = np.cumsum(counts) - counts
    if long.all():
        acc = acc[np.repeat(doc_starts - first, counts) + np.arange(total)]
    else:  # documents shorter than ngram: one shingle of all their units
        out = np.empty(total, dtype=np.uint64)
        docs = np.flatnonzero(long)
        c = counts[docs]
        j = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        out[np.repeat(first[docs], c) + j] = acc[np.repeat(doc_starts[docs], c) + j]
        short = np.flatnonzero(~long & (lengths > 0))
        s_acc = np.zeros(len(short), dtype=np.uint64)
        padded = np.concatenate([units, np.zeros(ngram, dtype=np.uint64)])
        for k in range(ngram - 1):
            s_acc += np.where(k < lengths[short], padded[doc_starts[short] + k], np.uint64(0)) * _NGRAM_MULTIPLIERS[k]
        out[first[short]] = s_acc
        acc = out
    return ((acc >> np.uint64(32)) ^ acc).astype(np.uint32), counts


def word_units(texts: Sequence[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash of every lower-cased word (runs of letters, marks, digits), concatenated, and
    words per text. The hash is a polynomial over each word's UTF-8 bytes, finished with splitmix64.

    Splitting and hashing run in numpy straight from the Arrow buffer (``_numpy_word_units``): a
    byte table says which ASCII bytes are word bytes, non-ASCII code points are looked up in a
    table built once from RE2's own Unicode classes, and the polynomial of every word is one
    ``np.add.reduceat`` over position-weighted bytes. ``_regex_word_units`` (an Arrow regex split)
    is the reference it equals."""
    arr = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else _large_strings(texts)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    return _numpy_word_units(arr)


# ASCII byte -> (lower-cased byte + 1) for word bytes [0-9A-Za-z], 0 for separators: the
# polynomial's coefficient, so separator bytes add nothing to the word sums.
_ASCII_COEFF = np.zeros(256, dtype=np.uint64)
for _c in b"0123456789abcdefghijklmnopqrstuvwxyz":
    _ASCII_COEFF[_c] = _c + 1
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
    _ASCII_COEFF[_c] = _c + 32 + 1
_ASCII_WORD = _ASCII_COEFF > 0
_BYTE_INVERSE = np.uint64(pow(int(_BYTE_MULTIPLIER), -1, 1 << 64))  # odd, so invertible mod 2**64
_POWERS_CACHED = 1 << 22
_powers_cache: list[np.ndarray] = []


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``P**(i+1)`` and ``P**-i`` mod 2**64 for ``i < n`` (cached up to a few million)."""
    if _powers_cache and len(_powers_cache[0]) >= n:
        return _powers_cache[0][:n], _powers_cache[1][:n]
    size = max(n, 1 << 16)
    with np.errstate(over="ignore"):
        pw = np.cumprod(np.full(size, _BYTE_MULTIPLIER, dtype=np.uint64))
        inv = np.cumprod(np.full(size, _BYTE_INVERSE, dtype=np.uint64))
    inv = np.concatenate([np.ones(1, dtype=np.uint64), inv[:-1]])
    if size <= _POWERS_CACHED:
        _powers_cache[:] = [pw, inv]
    return pw[:n], inv[:n]


@cache
def _word_code_points() -> np.ndarray:
    """``table[cp]``: is code point ``cp`` a letter, mark or number, by RE2's classes (the ones
    ``_WORD_SEPARATOR`` splits with). One regex pass over all code points, once per process."""
    cps = np.arange(0x110000)
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
    data = cps.astype("<u4").tobytes().decode("utf-32-le").encode("utf-8")
    lengths = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arr = pa.LargeStringArray.from_buffers(len(cps), pa.py_buffer(offsets), pa.py_buffer(data))
    match = pc.match_substring_regex(arr, r"^[\p{L}\p{M}\p{N}]$")
    bits = np.frombuffer(match.buffers()[1], dtype=np.uint8)  # no nulls: the value bitmap (no pandas import)
    table = np.zeros(0x110000, dtype=bool)
    table[cps] = np.unpackbits(bits, bitorder="little")[match.offset : match.offset + len(cps)].astype(bool)
    return table


def _large_strings(texts: Sequence[str]) -> pa.Array:
    """Python strings (None as empty) as an Arrow large_string array, built from the buffers:
    cheaper than ``pa.array`` for a handful of texts, and it does not import pandas."""
    encoded = [t.encode() if t else b"" for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def _string_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, UTF-8 bytes) of a large_string array, without copies."""
    if not len(arr):
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    base = int(offsets[0])
    return offsets - base, np.frombuffer(arr.buffers()[2], dtype=np.uint8)[base : int(offsets[-1])]


def _numpy_word_units(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``word_units`` in numpy. A word's hash ``sum (b_k + 1) * P**(k + 1)`` (k its byte position in
    the word) is computed from global byte positions g: ``sum (b_g + 1) * P**(g + 1)`` over the
    word, times ``P**-start``. Separator bytes weigh 0, so one reduceat over the word starts sums
    every word. Texts with non-ASCII bytes are lower-cased by Arrow first (ASCII letters by the
    byte table) and their code points decoded only where the bytes are not ASCII."""
    bounds, data = _string_bytes(arr)
    high = np.flatnonzero(data >= 0x80)
    if len(high):
        bounds, data = _string_bytes(pc.utf8_lower(arr))
        high = np.flatnonzero(data >= 0x80)
    word = _ASCII_WORD[data]
    terms = _ASCII_COEFF[data]
    if len(high):  # UTF-8 sequences: decode at their lead bytes, the verdict covers the whole sequence
        byte = data[high]
        lead = (byte & 0xC0) != 0x80
        pos = high[lead]
        padded = np.concatenate([data, np.zeros(3, np.uint8)]).astype(np.int64)
        b0, c1, c2, c3 = padded[pos], padded[pos + 1] & 0x3F, padded[pos + 2] & 0x3F, padded[pos + 3] & 0x3F
        cp = np.where(
            b0 < 0xE0,
            ((b0 & 0x1F) << 6) | c1,
            np.where(
                b0 < 0xF0, ((b0 & 0x0F) << 12) | (c1 << 6) | c2, ((b0 & 0x07) << 18) | (c1 << 12) | (c2 << 6) | c3
            ),
        )
        is_word = _word_code_points()[cp][np.cumsum(lead) - 1]
        word[high] = is_word
        terms[high] = np.where(is_word, byte.astype(np.uint64) + np.uint64(1), np.uint64(0))
    first = word.copy()
    first[1:] &= ~word[:-1]
    lengths = np.diff(bounds)
    doc_first = bounds[:-1][lengths > 0]
    first[doc_first] = word[doc_first]  # a word never runs on from the previous text
    starts = np.flatnonzero(first)
    counts = np.diff(np.searchsorted(starts, bounds)).astype(np.int64)
    if not len(starts):
        return np.zeros(0, dtype=np.uint64), counts
    pw, inv = _powers(len(data))
    terms *= pw
    hashes = np.add.reduceat(terms, starts)
    hashes *= inv[starts]
    return splitmix64(hashes), counts


def _regex_word_units(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``word_units`` by Arrow: lower-case, split at runs of non-(letter, mark, number) code points."""
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
    if len(counts) == 1 and counts[0] > 0 and counts[0] * num_perm <= _CHUNK_ELEMENTS:  # one call per document
        matrix = a[:, None] * fmix32(hashes.astype(np.uint32))[None, :]
        matrix += b[:, None]
        return matrix.min(axis=1)[None, :]
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
    if len(texts) == 1 and len(texts[0] or "") <= _CHUNK_CHARS:
        return signatures(*shingle_hashes(texts, ngram, unit), num_perm, seed)
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
