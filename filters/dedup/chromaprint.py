"""Audio fingerprints with chromaprint (``fpcalc -raw``) and their similarity.

A raw fingerprint is a sequence of 32-bit items, about eight per second. A re-encoded copy
(mp3, ogg, aac, another sample rate) keeps a bit error rate (BER) near 0.01 against the
original, different speech sits around 0.3-0.5. Similarity is ``1 - BER`` at the best alignment
within ``max_offset`` items. Candidates come from MinHash over the set of 16-bit item halves:
most halves survive re-encoding exactly, so copies share many, unrelated clips few.
"""

from __future__ import annotations

import subprocess

import numpy as np

from synth.media import MediaError, spilled

FPCALC = "fpcalc"


def fingerprint(data: bytes, max_seconds: int = 120, timeout_s: float = 60.0) -> np.ndarray:
    """Raw chromaprint items of encoded audio (uint32). Clips under about 2 s give none."""
    with spilled(data) as path:
        try:
            proc = subprocess.run(
                [FPCALC, "-raw", "-plain", "-length", str(max_seconds), path],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise MediaError("fingerprint timed out", f"{timeout_s}s") from e
    # fpcalc 1.5 exits 3 after a benign "Error decoding audio frame (End of file)"; the output counts.
    items = [int(x) for x in proc.stdout.strip().split(",") if x.strip().isdigit()]
    if not items:
        raise MediaError("no audio fingerprint", proc.stderr.strip()[-200:])
    return np.array(items, dtype=np.uint32)


def half_items(fp: np.ndarray) -> np.ndarray:
    """The set elements MinHash sees: each item's upper and lower 16 bits, tagged by half."""
    fp = np.asarray(fp, dtype=np.uint32)
    upper = (fp >> np.uint32(16)) | np.uint32(1 << 16)
    lower = fp & np.uint32(0xFFFF)
    return np.unique(np.concatenate([upper, lower]))


def similarity(a: np.ndarray, b: np.ndarray, max_offset: int = 8, min_overlap: float = 0.5) -> float:
    """``1 - BER`` at the best alignment; 0 when no offset overlaps enough of the shorter clip."""
    a = np.asarray(a, dtype=np.uint32)
    b = np.asarray(b, dtype=np.uint32)
    shorter = min(len(a), len(b))
    if shorter == 0:
        return 0.0
    best = 1.0
    for offset in range(-max_offset, max_offset + 1):
        x = a[max(0, offset) :]
        y = b[max(0, -offset) :]
        n = min(len(x), len(y))
        if n == 0 or n < min_overlap * shorter:
            continue
        ber = np.bitwise_count(x[:n] ^ y[:n]).sum() / (32.0 * n)
        best = min(best, float(ber))
    return 1.0 - best
