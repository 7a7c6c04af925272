"""MinHash signatures against plain datasketch, and our pHash against imagehash, in one process.

The corpus is real prose (the standard library's docstrings) with word-replaced variants, 5-word
shingles, 128 permutations. Ours: ``filters.dedup.minhash.text_signatures`` (Arrow tokenising,
numpy n-gram hashing and permutations, bit-compatible with datasketch's affine32 scheme). Bare:
datasketch's ``MinHash.update`` per shingle per document, the plain loop; a second row compares
with ``MinHash.bulk`` and an xxhash hash function, datasketch's fastest documented path. Both
sides tokenise and shingle inside the timing. Everything runs on one core, so docs/s is per core.

Images: ``phash64`` (JPEG draft decoding at reduced scale) against ``imagehash.phash`` on a full
decode of the same JPEGs.
"""

from __future__ import annotations

import io
import random
import re

import imagehash
import xxhash
from datasketch import MinHash
from PIL import Image

from bench.common import Row, best_time, jpeg_variants, main, result
from filters.dedup.minhash import text_signatures
from filters.dedup.phash import phash64
from filters.dedup.planted import real_documents

NUM_PERM = 128
NGRAM = 5
_WORD = re.compile(r"\w+")


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` real documents: the docstrings, then copies with 5% of words replaced."""
    rng = random.Random(seed)
    base = real_documents()
    vocabulary = sorted({w for d in base for w in d.split()})
    out = []
    while len(out) < n:
        doc = base[len(out) % len(base)].split()
        out.append(" ".join(w if rng.random() > 0.05 else rng.choice(vocabulary) for w in doc))
    return out


def _shingles(text: str) -> list[bytes]:
    words = _WORD.findall(text.lower())
    return [" ".join(words[i : i + NGRAM]).encode() for i in range(max(1, len(words) - NGRAM + 1))]


def _plain_update(texts: list[str]) -> None:
    for text in texts:
        m = MinHash(num_perm=NUM_PERM)
        for shingle in _shingles(text):
            m.update(shingle)


def _bulk_xxhash(texts: list[str]) -> None:
    MinHash.bulk([_shingles(t) for t in texts], num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest)


def _bare_phash(images: list[bytes]) -> None:
    for data in images:
        imagehash.phash(Image.open(io.BytesIO(data)))


def run(quick: bool = False) -> list[Row]:
    n, n_plain, repeats = (2000, 200, 2) if quick else (20_000, 1000, 3)
    texts = corpus(n)
    plain_texts = texts[:n_plain]  # the plain loop is slow: a prefix, rated per document
    words = sum(len(t.split()) for t in texts) / len(texts)
    text_signatures(texts[:50], NUM_PERM, NGRAM)  # warm-up (regex compile, permutations)
    t_ours = best_time(lambda: text_signatures(texts, NUM_PERM, NGRAM), repeats)
    t_plain = best_time(lambda: _plain_update(plain_texts), 1)
    t_bulk = best_time(lambda: _bulk_xxhash(texts), 1)

    images = list(jpeg_variants()) * (3 if quick else 10)
    t_phash = best_time(lambda: [phash64(d) for d in images], repeats)
    t_bare_phash = best_time(lambda: _bare_phash(images), repeats)
    note = f"{NUM_PERM} perms, word {NGRAM}-grams, {words:.0f} words/doc, 1 core"
    return [
        result("minhash", "docs/s", n / t_ours, n_plain / t_plain, f"bare=datasketch MinHash.update loop; {note}"),
        result("minhash", "docs/s", n / t_ours, n / t_bulk, f"bare=datasketch MinHash.bulk + xxhash; {note}"),
        result(
            "phash", "images/s", len(images) / t_phash, len(images) / t_bare_phash, "bare=imagehash.phash, full decode"
        ),
    ]


if __name__ == "__main__":
    main(run)
