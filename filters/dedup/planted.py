"""Corpora with planted duplicates and exact ground truth, for the dedup tests and benchmarks.

Text: real English prose (the standard library's docstrings, which ship with Python) as base
documents, and variants at controlled Jaccard similarity, made by replacing words until the exact
Jaccard of the 5-gram shingle sets reaches the target. Images: scikit-image photographs,
re-encoded and resized. Audio: Debian's recorded Asterisk prompts, re-encoded with ffmpeg.
"""

from __future__ import annotations

import importlib
import inspect
import io
import random
import subprocess
import tempfile
import warnings
import wave
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filters.dedup.minhash import shingle_hashes

DOC_MODULES = (
    "abc argparse asyncio base64 calendar collections concurrent.futures configparser contextlib csv dataclasses "
    "datetime decimal difflib email enum fractions ftplib functools gettext glob gzip hashlib heapq hmac html "
    "http.client http.server imaplib inspect io ipaddress itertools json logging mailbox mimetypes multiprocessing "
    "numbers operator optparse os pathlib pickle pkgutil platform poplib pprint queue random re sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl statistics string struct "
    "subprocess tarfile tempfile textwrap threading timeit tokenize traceback typing unittest urllib.request uuid "
    "warnings weakref zipfile zoneinfo"
).split()


def real_documents(min_words: int = 80, max_words: int = 400) -> list[str]:
    """Distinct docstrings of standard-library classes and functions, in a stable order."""
    seen: dict[str, None] = {}
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for _, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                with warnings.catch_warnings():  # typing.io and friends warn when touched
                    warnings.simplefilter("ignore", DeprecationWarning)
                    doc = inspect.getdoc(obj)
                if doc and min_words <= len(doc.split()) <= max_words:
                    seen.setdefault(doc, None)
    return list(seen)


def shingle_sets(texts: Sequence[str], ngram: int = 5) -> list[set[int]]:
    """The exact shingle sets the MinHash sees (same tokens, same 32-bit shingle hashes)."""
    hashes, counts = shingle_hashes(texts, ngram)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [set(hashes[bounds[i] : bounds[i + 1]].tolist()) for i in range(len(texts))]


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def perturb_all(
    texts: Sequence[str], targets: Sequence[float], vocabulary: Sequence[str], rng: random.Random, ngram: int = 5
) -> list[tuple[str, float]]:
    """For each (text, target): the variant with the most word replacements (in a fixed random
    order) that keeps the exact shingle Jaccard to the text >= target. A binary search per text, run
    for all texts at once so each step hashes one batch."""
    words = [t.split() for t in texts]
    plans = []
    for w in words:
        positions = list(range(len(w)))
        rng.shuffle(positions)
        plans.append((positions, [rng.choice(vocabulary) for _ in positions]))
    bases = shingle_sets(texts, ngram)

    def variant(i: int, k: int) -> str:
        w = list(words[i])
        positions, replacements = plans[i]
        for p, r in zip(positions[:k], replacements[:k], strict=True):
            w[p] = r
        return " ".join(w)

    lo = [0] * len(texts)
    hi = [len(w) for w in words]
    while any(a < b for a, b in zip(lo, hi, strict=True)):
        active = [i for i in range(len(texts)) if lo[i] < hi[i]]
        mids = {i: (lo[i] + hi[i] + 1) // 2 for i in active}
        sets = shingle_sets([variant(i, mids[i]) for i in active], ngram)
        for i, s in zip(active, sets, strict=True):
            if jaccard(bases[i], s) >= targets[i]:
                lo[i] = mids[i]
            else:
                hi[i] = mids[i] - 1
    finals = [variant(i, lo[i]) for i in range(len(texts))]
    return [(t, jaccard(b, s)) for t, b, s in zip(finals, bases, shingle_sets(finals, ngram), strict=True)]


@dataclass
class TextCorpus:
    texts: list[str]
    family: list[int]  # which base document each text derives from
    level: list[float]  # the target Jaccard of each text to its base (1.0 for bases and copies)
    similarity: list[float]  # the exact Jaccard of each text to its base
    pairs: dict[tuple[int, int], float] = field(default_factory=dict)  # every pair with J > 0, exact

    def true_pairs(self, threshold: float) -> list[tuple[int, int]]:
        return [p for p, j in self.pairs.items() if j >= threshold]


def planted_text(
    n_bases: int = 100, levels: Sequence[float] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3), seed: int = 0
) -> TextCorpus:
    """Each base document followed by one variant per level; exact Jaccard of all overlapping pairs."""
    rng = random.Random(seed)
    bases = real_documents()[:n_bases]
    vocabulary = sorted({w for doc in bases for w in doc.split() if w.isalpha()})
    jobs = [(f, target) for f in range(len(bases)) for target in levels if target < 1.0]
    made = iter(perturb_all([bases[f] for f, _ in jobs], [t for _, t in jobs], vocabulary, rng))
    texts, family, level, similarity = [], [], [], []
    for f, base in enumerate(bases):
        for target in (1.0, *levels):  # the base itself, then its variants (1.0: an exact copy)
            text, j = (base, 1.0) if target >= 1.0 else next(made)
            texts.append(text)
            family.append(f)
            level.append(target)
            similarity.append(j)
    corpus = TextCorpus(texts, family, level, similarity)
    corpus.pairs = exact_pairs(shingle_sets(texts))
    return corpus


def exact_pairs(sets: Sequence[set[int]]) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair sharing a shingle (an inverted index, not all pairs)."""
    index: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for h in s:
            index[h].append(i)
    candidates = {(a, b) for docs in index.values() for k, a in enumerate(docs) for b in docs[k + 1 :]}
    return {(a, b): jaccard(sets[a], sets[b]) for a, b in sorted(candidates)}


def components(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Smallest member of each item's connected component (union-find)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


@dataclass
class Scores:
    """Precision and recall of predicted clusters against exact ground truth."""

    pair_precision: float
    pair_recall: float
    drop_precision: float
    drop_recall: float
    true_pairs: int
    predicted_pairs: int


def score_clusters(predicted_root: Sequence[int], true_pairs: Sequence[tuple[int, int]]) -> Scores:
    """Pairs: a true pair (direct similarity >= threshold) is found when both items share a predicted
    cluster; a predicted same-cluster pair is right when both share a true component (the transitive
    closure of the true pairs). Drops: every cluster keeps its smallest item; the others are drops."""
    n = len(predicted_root)
    truth = components(n, true_pairs)
    found = sum(1 for a, b in true_pairs if predicted_root[a] == predicted_root[b])
    clusters: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(predicted_root):
        clusters[r].append(i)
    predicted = [(a, b) for members in clusters.values() for k, a in enumerate(members) for b in members[k + 1 :]]
    right = sum(1 for a, b in predicted if truth[a] == truth[b])
    true_drops = {i for i in range(n) if truth[i] != i}
    drops = {i for i in range(n) if predicted_root[i] != i}
    return Scores(
        pair_precision=right / len(predicted) if predicted else 1.0,
        pair_recall=found / len(true_pairs) if true_pairs else 1.0,
        drop_precision=len(drops & true_drops) / len(drops) if drops else 1.0,
        drop_recall=len(drops & true_drops) / len(true_drops) if true_drops else 1.0,
        true_pairs=len(true_pairs),
        predicted_pairs=len(predicted),
    )


# ---------------------------------------------------------------- images and audio

PHOTOS_FOR_DEDUP = (
    "astronaut coffee chelsea rocket immunohistochemistry hubble_deep_field colorwheel camera coins moon brick "
    "grass gravel cell horse text page clock logo retina binary_blobs"
).split()  # scikit-image photographs, without `cat` (the same photograph as `chelsea`) or synthetic patterns


def image_variants(name: str) -> dict[str, bytes]:
    """A photograph as JPEG, its re-encodings (JPEG quality 30, PNG), resized copies, and a crop
    (a different image under pHash: 8-26 bits away)."""
    from pipelines.demo_data import photo

    im = photo(name).convert("RGB")
    w, h = im.size

    def enc(image, fmt: str = "JPEG", quality: int = 90) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=quality) if fmt == "JPEG" else image.save(buf, format=fmt)
        return buf.getvalue()

    return {
        "original": enc(im),
        "jpeg_q30": enc(im, quality=30),
        "png": enc(im, "PNG"),
        "half": enc(im.resize((w // 2, h // 2))),
        "crop": enc(im.crop((w // 10, h // 10, w - w // 10, h - h // 10))),
    }


def long_prompts(n: int, min_seconds: float = 3.0) -> list[Path]:
    """Recorded prompts long enough for a chromaprint fingerprint."""
    from pipelines.demo_data import asterisk_prompts

    out = []
    for wav, _ in asterisk_prompts():
        with wave.open(str(wav)) as w:
            if w.getnframes() / w.getframerate() >= min_seconds:
                out.append(wav)
        if len(out) >= n:
            break
    return out


AUDIO_ENCODINGS = {
    "mp3": ["-c:a", "libmp3lame", "-b:a", "32k", "-f", "mp3"],
    "ogg": ["-c:a", "libvorbis", "-q:a", "2", "-f", "ogg"],
    "flac": ["-c:a", "flac", "-f", "flac"],
    "wav22k": ["-ar", "22050", "-f", "wav"],
}


def reencode(wav: Path, encoding: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-i", str(wav), *AUDIO_ENCODINGS[encoding], str(out)], check=True
        )
        return out.read_bytes()


def roots_from_duplicates(n: int, dropped: dict[int, int]) -> list[int]:
    """Predicted cluster root of items 0..n-1 from a {dropped item: kept item} map."""
    return [dropped.get(i, i) for i in range(n)]


def level_recall(corpus: TextCorpus, predicted_root: Sequence[int]) -> dict[float, float]:
    """Per planted level: the share of variants that ended in their base document's cluster."""
    by_level: dict[float, list[bool]] = defaultdict(list)
    base_of = {}
    for i, (f, lv) in enumerate(zip(corpus.family, corpus.level, strict=True)):
        base_of.setdefault(f, i)
        if i != base_of[f]:
            by_level[lv].append(predicted_root[i] == predicted_root[base_of[f]])
    return {lv: float(np.mean(v)) for lv, v in sorted(by_level.items(), reverse=True)}


# ---------------------------------------------------------------- a planted corpus of any size


@dataclass
class ScaledCorpus:
    """``n`` documents of ``words`` words; a share of them are variants of a base document at a
    planted Jaccard level, scattered through the corpus. ``true_pairs``: every pair of one family
    (a base and its variants) whose exact word 5-gram Jaccard is at least the threshold; documents
    of different families share no 5-gram by more than chance (random draws from a 5k-word
    vocabulary), so no other pair is near."""

    texts: list[str]
    family: np.ndarray
    true_pairs: list[tuple[int, int]]


def _gram_keys(tokens: np.ndarray, ngram: int = 5) -> np.ndarray:
    """Distinct 64-bit keys of a token row's n-grams (exact up to 64-bit collisions)."""
    acc = np.zeros(len(tokens) - ngram + 1, dtype=np.uint64)
    for k in range(ngram):
        acc = acc * np.uint64(1_000_003) + tokens[k : len(tokens) - ngram + 1 + k].astype(np.uint64)
    return np.unique(acc)


def planted_scaled(
    n: int,
    words: int = 100,
    dup_share: float = 0.3,
    levels: Sequence[float] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.5),
    threshold: float = 0.8,
    seed: int = 0,
) -> ScaledCorpus:
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = defaultdict(int)
    for doc in real_documents():
        for w in doc.lower().split():
            if w.isalpha() and w.isascii():
                counts[w] += 1
    vocab_words = sorted(counts, key=lambda w: (-counts[w], w))[:5000]
    vocab = np.array(vocab_words, dtype=object)
    freq = np.array([counts[w] for w in vocab_words], dtype=np.float64) ** 0.5  # flatter than the real Zipf
    freq /= freq.sum()
    n_var = int(n * dup_share)
    n_base = n - n_var
    tokens = rng.choice(len(vocab), size=(n, words), p=freq).astype(np.int32)
    family = np.concatenate([np.arange(n_base), rng.integers(0, max(n_base, 1), n_var)])
    level = np.concatenate([np.ones(n_base), rng.choice(np.asarray(levels, dtype=np.float64), n_var)])
    survive = 2 * level / (1 + level)  # shingle share to keep for a Jaccard of `level`
    rate = 1 - survive ** (1 / 5)
    replace = rng.random((n_var, words)) < rate[n_base:, None]
    variants = tokens[family[n_base:]].copy()
    variants[replace] = tokens[n_base:][replace]  # fresh random words at the replaced positions
    tokens[n_base:] = variants
    order = rng.permutation(n)  # scatter variants through the corpus (and the shards)
    tokens, family = tokens[order], family[order]
    texts = [" ".join(vocab[row].tolist()) for row in tokens]
    members: dict[int, list[int]] = defaultdict(list)
    for i, f in enumerate(family.tolist()):
        members[f].append(i)
    true_pairs = []
    for group in members.values():
        if len(group) < 2:
            continue
        keys = {i: _gram_keys(tokens[i]) for i in group}
        for k, a in enumerate(group):
            for b in group[k + 1 :]:
                common = len(np.intersect1d(keys[a], keys[b], assume_unique=True))
                if common / (len(keys[a]) + len(keys[b]) - common) >= threshold:
                    true_pairs.append((a, b))
    return ScaledCorpus(texts, family, true_pairs)
