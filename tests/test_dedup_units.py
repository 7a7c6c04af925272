"""The dedup's building blocks without Ray: MinHash against datasketch, LSH banding, pHash
multi-index probing, chromaprint similarity, connected components (local and star contraction)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest
from datasketch import MinHash

from filters.dedup import chromaprint, components, minhash, phash
from filters.dedup.config import DedupConfig
from filters.dedup.grouping import partition_of, run_pairs, runs, star_pairs
from filters.dedup.planted import image_variants, jaccard, long_prompts, real_documents, reencode, shingle_sets

DOCS = real_documents()[:40]


@pytest.mark.parametrize("unit,ngram", [("word", 5), ("word", 1), ("char", 4)])
def test_signatures_equal_datasketch(unit: str, ngram: int) -> None:
    texts = [*DOCS[:6], "", "two words", "Über café — naïve façade"]
    hashes, counts = minhash.shingle_hashes(texts, ngram, unit)
    sigs = minhash.signatures(hashes, counts, num_perm=64, seed=3)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for i in range(len(texts)):
        m = MinHash(num_perm=64, seed=3, hashfunc=int)
        m.update_batch(hashes[bounds[i] : bounds[i + 1]].tolist())
        assert np.array_equal(sigs[i], m.hashvalues), texts[i][:40]


def test_short_documents_get_one_shingle_and_case_and_punctuation_do_not_matter() -> None:
    hashes, counts = minhash.shingle_hashes(["a b", "A, b!", "a b c d e f", ""], 5)
    assert counts.tolist() == [1, 1, 2, 0] and hashes[0] == hashes[1]


def test_numpy_tokeniser_equals_the_arrow_regex_split() -> None:
    """Words split and hashed from the raw UTF-8 bytes (the fast path) equal Arrow's regex split of
    the lower-cased text, for ASCII, accents, CJK, Greek final sigma, emoji, combining marks,
    non-breaking spaces and random code points; a slice of an Arrow array too."""
    rng = random.Random(5)
    texts = [
        *DOCS[:20],
        "",
        "__a__b",
        "Hello,World x",
        "Über café — naïve façade",
        "日本語のテキスト、句読点。漢字",
        "emoji 😀 ok😀ok",
        "ΟΔΥΣΣΕΥΣ σς",
        "İstanbul ǅ ẞ",
        "a\u00a0b\u2003c",
        "१२३ ٣٤ x²y",
        "e\u0301tude",
    ]
    for _ in range(100):
        pool = [(32, 127), (0xA0, 0x3000), (0x10000, 0x20000)]
        texts.append("".join(chr(rng.randrange(*rng.choice(pool))) for _ in range(rng.randrange(40))))
    rng.shuffle(texts)
    arr = pa.array([*texts, None], pa.large_string())
    for chunk in (arr, arr.slice(3, 60)):
        units, counts = minhash.word_units(chunk)
        ref_units, ref_counts = minhash._regex_word_units(pa.compute.fill_null(chunk, ""))
        assert np.array_equal(counts, ref_counts) and np.array_equal(units, ref_units)


def test_estimate_tracks_exact_jaccard() -> None:
    rng = random.Random(0)
    base = DOCS[0].split()
    errors = []
    for _ in range(20):
        words = [w if rng.random() > 0.05 else "zzz" for w in base]
        a, b = DOCS[0], " ".join(words)
        exact = jaccard(*shingle_sets([a, b]))
        sig = minhash.text_signatures([a, b], num_perm=256)
        errors.append(minhash.jaccard_estimate(sig[0], sig[1]) - exact)
    assert abs(np.mean(errors)) < 0.03 and np.std(errors) < 0.05


def test_lsh_params_and_band_keys() -> None:
    cfg = DedupConfig()
    lsh = cfg.minhash.lsh()
    assert lsh.bands * lsh.rows <= cfg.minhash.num_perm
    assert lsh.candidate_probability(0.8) > 0.98 and lsh.candidate_probability(0.3) < 0.01
    sigs = minhash.text_signatures([DOCS[1], DOCS[1], DOCS[2]], cfg.minhash.num_perm)
    keys = minhash.band_keys(sigs, lsh)
    assert np.array_equal(keys[0], keys[1]) and not np.intersect1d(keys[0], keys[2]).size
    assert len(np.unique(keys[0])) == lsh.bands  # the band index is part of the key


def test_phash_of_copies_is_close_and_of_other_photos_far() -> None:
    hashes = {name: {k: phash.phash64(v) for k, v in image_variants(name).items()} for name in ("astronaut", "coffee")}
    for variants in hashes.values():
        for key in ("jpeg_q30", "png", "half"):
            assert phash.hamming(variants["original"], variants[key]) <= 4
        assert phash.hamming(variants["original"], variants["crop"]) > 6
    assert phash.hamming(hashes["astronaut"]["original"], hashes["coffee"]["original"]) > 16


def test_multi_index_probes_find_every_pair_within_the_distance() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 200, dtype=np.int64).astype(np.uint64)
    near = base.copy()
    for i in range(len(near)):  # flip 0..6 random bits
        for bit in rng.choice(64, size=rng.integers(0, 7), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    values = np.concatenate([base, near])
    rows, keys, probes = phash.band_rows(values, max_distance=6, bands=4, salt=1)
    found = set()
    order = np.argsort(keys, kind="stable")
    starts, sizes = runs(keys[order])
    i, j = run_pairs(starts, sizes, 10_000)
    for a, b in zip(rows[order][i].tolist(), rows[order][j].tolist(), strict=True):
        found.add((min(a, b), max(a, b)))
    for k in range(len(base)):
        assert (k, k + len(base)) in found


def test_chromaprint_copies_are_similar_and_other_prompts_not() -> None:
    prompts = long_prompts(3)
    fps = [chromaprint.fingerprint(p.read_bytes()) for p in prompts]
    for p, fp in zip(prompts, fps, strict=True):
        for enc in ("mp3", "ogg"):
            assert chromaprint.similarity(fp, chromaprint.fingerprint(reencode(p, enc))) > 0.9
    assert chromaprint.similarity(fps[0], fps[1]) < 0.8 and chromaprint.similarity(fps[1], fps[2]) < 0.8
    with pytest.raises(Exception, match="fingerprint"):
        chromaprint.fingerprint(b"RIFF not audio")


def _reference(n_nodes: int, a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    parent = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: find(x) for x in list(parent)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_local_and_star_contraction_agree_with_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3000, 2000) * 7 + 5
    b = rng.integers(0, 3000, 2000) * 7 + 5
    keep = a != b
    a, b = a[keep], b[keep]
    expected = _reference(3000, a, b)
    nodes, roots = components.components_local(a, b)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == expected

    # the distributed algorithm, partitions simulated in-process
    edges = pa.table({"u": np.minimum(a, b), "v": np.maximum(a, b), "changed": np.zeros(len(a), np.int8)})
    edges = edges.cast(components.STAR_SCHEMA)
    for _ in range(50):
        changed = 0
        for step in (components.large_star, components.small_star):
            rows = components.both_ways(edges)
            part = partition_of(rows["u"].to_numpy(), 3)
            edges = pa.concat_tables([step(rows.filter(pa.array(part == p))) for p in range(3)])
            changed += int(np.sum(edges["changed"].to_numpy()))
        if changed == 0:
            break
    labels = components.star_labels(edges)
    assert dict(zip(labels["node"].to_pylist(), labels["root"].to_pylist(), strict=True)) == expected


def test_pairs_within_runs() -> None:
    keys = np.array([1, 1, 1, 2, 3, 3, 3, 3, 3])
    starts, sizes = runs(keys)
    assert starts.tolist() == [0, 3, 4] and sizes.tolist() == [3, 1, 5]
    i, j = run_pairs(starts, sizes, max_bucket=3)
    pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    assert {(0, 1), (0, 2), (1, 2)} <= pairs  # all pairs of the small run
    assert {(4, 5), (4, 6), (4, 7), (4, 8), (5, 6), (6, 7), (7, 8)} == pairs - {(0, 1), (0, 2), (1, 2)}  # star+chain
    first, member = star_pairs(starts, sizes)
    assert set(zip(first.tolist(), member.tolist(), strict=True)) == {(0, 1), (0, 2), (4, 5), (4, 6), (4, 7), (4, 8)}


def test_config_rejects_typos() -> None:
    with pytest.raises(ValueError, match="unknown minhash"):
        DedupConfig.from_dict({"minhash": {"treshold": 0.8}})
    with pytest.raises(ValueError, match="unknown dedup setting"):
        DedupConfig.from_dict({"minhsah": {}})
    assert not DedupConfig.from_dict({"phash": False}).phash.enabled
    assert DedupConfig.from_dict({"partitions": 8}).config_hash() == DedupConfig().config_hash()
