"""Reading and rewriting Sample rows inside an Arrow batch, for operators that change segments.

Segment metadata keys the synth operators write (all JSON, in ``segment.meta``):

- ``role``: ``keyframe`` (an image sampled from the video before it), ``asr_input`` (a 16 kHz mono
  copy of the audio before it, from ``normalize_audio``); absent for source media.
- probe fields (``duration``, ``width``, ``sample_rate``, codecs, ...) and ``clips`` (time ranges of
  a long video), from ``probe``; ``t``/``clip`` on keyframes.
- ``asr``: ``{text, language, language_probability, segments: [{start, end, text}], model}``.
- ``caption`` (+ ``caption_model``) on images and keyframes.
- ``speak: true`` on a text segment a builder wants spoken (``voice``: the voice it must be spoken in);
  ``tts``: ``{voice, text}`` on the audio segment that replaced it, plus ``backcheck``: ``{text, wer}``
  once transcribed back.

Sample metadata: ``built_by`` names the builder that shaped the sample (later builders skip it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from shards.schema import SAMPLE_SCHEMA, dumps_meta, loads_meta

SEGMENTS_TYPE = SAMPLE_SCHEMA.field("segments").type


def seg_meta(seg: dict[str, Any]) -> dict[str, Any]:
    return loads_meta(seg.get("meta"))


def make_segment(
    modality: str,
    *,
    text: str | None = None,
    data: bytes | None = None,
    uri: str | None = None,
    meta: dict | None = None,
) -> dict[str, Any]:
    return {"modality": modality, "text": text, "bytes": data, "uri": uri, "meta": dumps_meta(meta)}


def with_meta(seg: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """A copy of ``seg`` with metadata keys added or replaced (``None`` removes a key)."""
    meta = {**seg_meta(seg), **updates}
    return {**seg, "meta": dumps_meta({k: v for k, v in meta.items() if v is not None})}


def is_source_media(seg: dict[str, Any], modality: str) -> bool:
    """A media segment that came from the source (not a keyframe or a normalised copy)."""
    return seg["modality"] == modality and "role" not in seg_meta(seg)


def replace_samples(
    batch: pa.Table,
    segments: Sequence[list[dict[str, Any]]],
    kinds: Sequence[str] | None = None,
    metas: Sequence[str | None] | None = None,
) -> pa.Table:
    """``batch`` with new segment lists (and kinds, sample metas), every other column untouched."""
    out = batch.set_column(
        batch.schema.get_field_index("segments"), SAMPLE_SCHEMA.field("segments"), pa.array(segments, SEGMENTS_TYPE)
    )
    if kinds is not None:
        out = out.set_column(
            out.schema.get_field_index("kind"), SAMPLE_SCHEMA.field("kind"), pa.array(kinds, pa.string())
        )
    if metas is not None:
        out = out.set_column(
            out.schema.get_field_index("meta"), SAMPLE_SCHEMA.field("meta"), pa.array(metas, pa.string())
        )
    return out


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``key``: deterministic sampling that survives re-runs and resharding."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
