"""Perceptual image hashes and multi-index hashing for Hamming-distance near-duplicates.

``imagehash.phash`` gives a 64-bit DCT hash; a re-encoded or resized copy lands within a few bits
(0-2 on the scikit-image photographs), a different photograph 18+ bits away. To find every pair
within ``max_distance`` bits without comparing all pairs, the 64 bits are split into ``bands``
chunks: by pigeonhole two hashes within ``max_distance`` agree on some chunk up to
``max_distance // bands`` bits. Each hash is stored under its chunk values and probes the chunk
values within that radius, so candidates meet in the same bucket of the band shuffle.
"""

from __future__ import annotations

import io
import itertools
import warnings
from functools import cache

import imagehash
import numpy as np
from PIL import Image

from filters.dedup.minhash import splitmix64

HASH_BITS = 64


def phash64(data: bytes, max_pixels: int = 64_000_000) -> int:
    """The 64-bit pHash of encoded image bytes (raises on undecodable or oversized images)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > max_pixels:
            raise ValueError(f"image of {im.size[0]}x{im.size[1]} exceeds {max_pixels} pixels")
        im.draft("L", (256, 256))  # JPEG: decode at a reduced scale, still far above pHash's 32x32
        bits = imagehash.phash(im).hash.flatten()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(a, np.uint64) ^ np.asarray(b, np.uint64)).astype(np.int64)


def chunk_bounds(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each chunk, covering all 64 bits."""
    widths = [HASH_BITS // bands + (1 if i < HASH_BITS % bands else 0) for i in range(bands)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths, strict=True)]


@cache
def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every mask of 1..radius set bits within ``width`` bits."""
    masks = [
        sum(1 << b for b in combo) for r in range(1, radius + 1) for combo in itertools.combinations(range(width), r)
    ]
    return np.array(masks, dtype=np.uint64)


def probe_radius(max_distance: int, bands: int) -> int:
    return max_distance // bands


def band_rows(
    hashes: np.ndarray, max_distance: int, bands: int, salt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of the input, bucket key, is_probe) for every stored and probing chunk value."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    radius = probe_radius(max_distance, bands)
    rows, keys, probes = [], [], []
    index = np.arange(len(hashes), dtype=np.int64)
    for band, (shift, width) in enumerate(chunk_bounds(bands)):
        chunk = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        tag = np.uint64(salt) ^ (np.uint64(band + 1) << np.uint64(56))
        rows.append(index)
        keys.append(splitmix64(chunk ^ tag))
        probes.append(np.zeros(len(hashes), dtype=bool))
        masks = _flip_masks(width, radius)
        if len(masks):
            probed = (chunk[:, None] ^ masks[None, :]).ravel()
            rows.append(np.repeat(index, len(masks)))
            keys.append(splitmix64(probed ^ tag))
            probes.append(np.ones(len(probed), dtype=bool))
    return np.concatenate(rows), np.concatenate(keys), np.concatenate(probes)
