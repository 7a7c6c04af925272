"""Exact-duplicate keys: a hash of the normalised text and a hash of the media bytes of a sample.

Normalisation (NFKC, case-folded, runs of punctuation and whitespace collapsed to one space) makes
copies that differ only in case, spacing or punctuation hash alike. ``content_hash`` is the per-row
score step that writes the keys as columns; the global exact dedup (``filters.dedup``) uses the same
functions, so a key seen in a shard is the key the dedup compares.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import xxhash

from filters.segments import put_column
from pipelines.operator import Operator, Resources, register

_NON_WORD = re.compile(r"[\W_]+")
MEDIA = ("image", "audio", "video")


def normalize_text(text: str) -> str:
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_digest(texts: Iterable[str]) -> bytes | None:
    """128-bit key of a sample's text segments, or None when they normalise to nothing."""
    parts = [normalize_text(t) for t in texts if t]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return xxhash.xxh3_128_digest("\x1e".join(parts).encode())


def media_digest(segments: Sequence[dict[str, Any]]) -> bytes | None:
    """128-bit key of a sample's media bytes in order (None when it carries no media bytes)."""
    h = xxhash.xxh3_128()
    found = False
    for seg in segments:
        if seg["modality"] in MEDIA and seg.get("bytes") is not None:
            h.update(seg["modality"].encode() + b"\0" + xxhash.xxh3_128_digest(seg["bytes"]))
            found = True
    return h.digest() if found else None


def sample_digests(segments: Sequence[dict[str, Any]]) -> tuple[bytes | None, bytes | None]:
    return text_digest(s["text"] for s in segments if s["modality"] == "text"), media_digest(segments)


@register
class ContentHash(Operator):
    """Score step: ``text_hash`` and ``media_hash`` (hex) per sample, the exact-duplicate keys."""

    name = "content_hash"
    resources = Resources(cpus=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        text_keys, media_keys = [], []
        for segments in batch["segments"].to_pylist():
            t, m = sample_digests(segments)
            text_keys.append(t.hex() if t else None)
            media_keys.append(m.hex() if m else None)
        batch = put_column(batch, "text_hash", pa.array(text_keys, pa.string()))
        return put_column(batch, "media_hash", pa.array(media_keys, pa.string()))
