"""The Sample contract between pipelines and the trainer, as an Arrow schema.

A sample is one row: a stable content-hash ``id``, the ``source`` it came from, its ``kind`` (one of
the paper's data types) and an ordered list of ``segments``. Interleaving is just more segments.
Media travel as ``bytes`` up to a size limit and as a ``uri`` beyond it. Per-segment and per-sample
metadata are JSON strings so the schema stays fixed while operators add fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute below

MODALITIES = ("text", "image", "audio", "video")

# Chat (SFT) conversations, by the media they hold; any spoken assistant turn makes one audio generation.
SFT_KINDS = ("sft_text", "sft_image", "sft_video", "sft_audio", "sft_image_audio", "sft_audio_generation")

# The paper's data types (docs/PAPER.md sections 2-3) plus raw kinds for media that enrichment has not
# yet paired with text.
KINDS = (
    "text",
    "image",
    "audio",
    "video",
    "image_caption",
    "interleaved_image_text",
    "ocr",
    "asr",
    "tts",
    "speech_text_interleaved",
    "image_audio_text",
    "video_caption",
    "video_audio_text",
    # supervised fine-tuning conversations (docs/PAPER.md 7.1): segments carry meta role/turn
    *SFT_KINDS,
)

SEGMENT_TYPE = pa.struct(
    [
        pa.field("modality", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("bytes", pa.large_binary()),
        pa.field("uri", pa.string()),
        pa.field("meta", pa.string()),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("segments", pa.list_(SEGMENT_TYPE), nullable=False),
        pa.field("meta", pa.string()),
    ]
)

# Columns the executor adds while rows move through a run; never written into shards.
UNIT_COLUMN = "_unit"
UNIT_TOTAL_COLUMN = "_unit_total"
REASON_COLUMN = "reason"
DETAIL_COLUMN = "detail"
STAGE_COLUMN = "reject_stage"
INTERNAL_COLUMNS = (UNIT_COLUMN, UNIT_TOTAL_COLUMN, REASON_COLUMN, DETAIL_COLUMN, STAGE_COLUMN)


@dataclass
class Segment:
    modality: str
    text: str | None = None
    bytes: bytes | None = None
    uri: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")

    def as_row(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "text": self.text,
            "bytes": self.bytes,
            "uri": self.uri,
            "meta": dumps_meta(self.meta),
        }


def dumps_meta(meta: Mapping[str, Any] | None) -> str | None:
    """Canonical JSON so equal metadata always hashes and compares equal."""
    if not meta:
        return None
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def loads_meta(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (an undecodable byte of a file or member name, a
    ``\\ud800`` escape in JSON) becomes a visible ``\\udcff`` escape instead of failing every
    later encode (Arrow, JSON, the ledger)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # injective for any str, so ids never fail to compute


def content_id(source: str, locator: str, segments: Sequence[Segment | Mapping[str, Any]]) -> str:
    """Stable id: hash of where the sample came from and what it holds.

    The locator (file path, line offset, tar member) keeps two identical documents from different
    places apart, so shard keys never collide; content duplicates are the dedup stage's job.
    """
    h = hashlib.sha256()
    h.update(_utf8(source))
    h.update(b"\0")
    h.update(_utf8(locator))
    for seg in segments:
        row = seg.as_row() if isinstance(seg, Segment) else seg
        h.update(b"\1" + row["modality"].encode())
        for part in (row.get("text"), row.get("uri")):
            h.update(b"\2" + (_utf8(part) if part is not None else b""))
        data = row.get("bytes")
        h.update(b"\3" + (hashlib.sha256(data).digest() if data is not None else b""))
    return h.hexdigest()[:32]


def locator_id(source: str, locator: str) -> str:
    """Id of an input that could not even be parsed into segments (it still needs a ledger row)."""
    return content_id(source, locator, ())


def make_sample(
    source: str,
    kind: str,
    segments: Sequence[Segment],
    locator: str,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One Sample row as a plain dict, ready for ``pa.Table.from_pylist(..., schema=SAMPLE_SCHEMA)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    full_meta = {"locator": locator, **(meta or {})}
    return {
        "id": content_id(source, locator, segments),
        "source": source,
        "kind": kind,
        "segments": [s.as_row() for s in segments],
        "meta": dumps_meta(full_meta),
    }


def samples_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SAMPLE_SCHEMA)


def empty_samples() -> pa.Table:
    return SAMPLE_SCHEMA.empty_table()


def sample_columns(table: pa.Table) -> pa.Table:
    """Drop executor-internal columns, keeping the Sample fields and any score columns."""
    keep = [c for c in table.column_names if c not in INTERNAL_COLUMNS]
    return table.select(keep)


_KIND_OF_MODALITIES = {
    frozenset({"text"}): "text",
    frozenset({"image"}): "image",
    frozenset({"audio"}): "audio",
    frozenset({"video"}): "video",
    frozenset({"image", "text"}): "image_caption",
    frozenset({"audio", "text"}): "asr",
    frozenset({"video", "text"}): "video_caption",
    frozenset({"video", "audio"}): "video",
    frozenset({"video", "audio", "text"}): "video_audio_text",
    frozenset({"image", "audio"}): "image_audio_text",
    frozenset({"image", "audio", "text"}): "image_audio_text",
}


def kind_for(modalities: Iterable[str]) -> str:
    """The data type an ordered bundle of segments forms before any enrichment."""
    ordered = list(modalities)
    present = frozenset(ordered)
    media = [m for m in ordered if m != "text"]
    if len(ordered) > 2 and present == {"image", "text"} and (len(media) > 1 or ordered.count("text") > 1):
        return "interleaved_image_text"
    if len(ordered) > 2 and present == {"audio", "text"} and (len(media) > 1 or ordered.count("text") > 1):
        return "speech_text_interleaved"
    return _KIND_OF_MODALITIES.get(present, "video_audio_text" if "video" in present else "interleaved_image_text")


def with_segment_meta(table: pa.Table, metas: Sequence[str | None]) -> pa.Table:
    """Replace every segment's ``meta`` (flattened, in row then segment order), bytes untouched."""
    segments = table["segments"].combine_chunks()
    flat = segments.flatten()
    if len(flat) != len(metas):
        raise ValueError(f"{len(metas)} metas for {len(flat)} segments")
    fields = [pa.array(metas, pa.string()) if f.name == "meta" else flat.field(f.name) for f in SEGMENT_TYPE]
    struct = pa.StructArray.from_arrays(fields, fields=list(SEGMENT_TYPE))
    offsets = pa.compute.subtract(segments.offsets, segments.offsets[0])
    rebuilt = pa.ListArray.from_arrays(offsets, struct, type=SAMPLE_SCHEMA.field("segments").type)
    index = table.schema.get_field_index("segments")
    return table.set_column(index, table.schema.field(index), rebuilt)
