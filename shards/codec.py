"""How one Sample becomes WebDataset tar members and back.

Our layout: ``<id>.json`` holds the sample (kind, source, metadata, scores and the ordered segments;
text inline), and each media segment with bytes is a member ``<id>.<index>.<ext>``. WebDataset
splits keys at the first dot, so stock ``webdataset`` readers see one sample per id.

Foreign layouts (img2dataset, video2dataset: ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``) decode
into a Sample too, with segments in a fixed modality order. Only JSON and raw bytes are ever
decoded: no pickle, no ``.pyd``/``.pth`` members.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shards import safejson
from shards.schema import (
    KINDS,
    MODALITIES,
    SAMPLE_SCHEMA,
    content_id,
    dumps_meta,
    kind_for,
    loads_meta,
)

FORMAT = "omnicorpus/1"

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
TEXT_EXTS = ("txt", "text", "caption", "md")
MODALITY_OF_EXT = {
    **{e: "image" for e in IMAGE_EXTS},
    **{e: "audio" for e in AUDIO_EXTS},
    **{e: "video" for e in VIDEO_EXTS},
    **{e: "text" for e in TEXT_EXTS},
}
FOREIGN_ORDER = ("image", "video", "audio", "text")
SAMPLE_FIELDS = {f.name for f in SAMPLE_SCHEMA}
# Reading our own output still bounds JSON depth, generously, far below the recursion limit.
TRUSTED_JSON_DEPTH = 512
# Levels our sample json adds around a record's metadata (doc → segments → segment → meta), so a
# shard written from records within ``max_json_depth`` can be ingested again under the same bound.
JSON_ENVELOPE_DEPTH = 4


class DecodeError(ValueError):
    """A sample whose members cannot be turned into a Sample; the message is the reject reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def sniff_ext(modality: str, data: bytes) -> str:
    """A file extension from magic bytes, so viewers and foreign readers can open members."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"GIF8"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    return {"image": "img", "audio": "audio", "video": "video", "text": "txt"}[modality]


def encode_sample(row: Mapping[str, Any]) -> dict[str, bytes]:
    """Members (without the key) for one sample row; extra columns (scores) go into the JSON."""
    segments = []
    members: dict[str, bytes] = {}
    for i, seg in enumerate(row["segments"]):
        entry: dict[str, Any] = {"modality": seg["modality"]}
        if seg.get("text") is not None:
            entry["text"] = seg["text"]
        if seg.get("uri") is not None:
            entry["uri"] = seg["uri"]
        if seg.get("bytes") is not None:
            member = f"{i:03d}.{sniff_ext(seg['modality'], seg['bytes'])}"
            members[member] = bytes(seg["bytes"])
            entry["member"] = member
        if seg.get("meta"):
            entry["meta"] = loads_meta(seg["meta"])
        segments.append(entry)
    doc = {
        "format": FORMAT,
        "id": row["id"],
        "source": row["source"],
        "kind": row["kind"],
        "meta": loads_meta(row.get("meta")),
        "segments": segments,
    }
    extra = {k: v for k, v in row.items() if k not in SAMPLE_FIELDS and not k.startswith("_")}
    if extra:
        doc["columns"] = extra
    members["json"] = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode()
    return {"json": members.pop("json"), **members}


def decode_sample(
    key: str,
    members: Mapping[str, bytes],
    source: str = "",
    locator: str = "",
    *,
    trust_id: bool = True,
    max_json_depth: int | None = TRUSTED_JSON_DEPTH,
    max_json_bytes: int | None = None,
) -> dict[str, Any]:
    """A Sample row from one key's members, ours or a foreign layout. Raises DecodeError.

    ``trust_id`` is for reading our own output (audit, inspect, the trainer): our samples keep their
    stored id and source. Ingest passes ``trust_id=False``: every id is then ours to compute from
    ``source``, ``locator`` (default: the key) and content, and what the input claimed (its ``id``,
    or a foreign json's ``id``/``key``) is kept as ``meta.claimed_id``. A tar's json is bounded in
    bytes and depth; ours may nest ``JSON_ENVELOPE_DEPTH`` deeper than the record it came from."""
    doc = None
    if "json" in members:
        try:
            doc = safejson.loads(members["json"], max_json_depth, max_json_bytes)
        except safejson.JsonBound as e:
            raise DecodeError(e.reason, e.detail) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DecodeError("bad json member", str(e)[:200]) from e
        if not isinstance(doc, dict):
            raise DecodeError("bad json member", "not an object")
    if doc is not None and doc.get("format") == FORMAT:
        row = _decode_ours(doc, members)
        if trust_id:
            return row
        return _as_ingested(row, source, locator or key)
    return _decode_foreign(locator or key, members, doc or {}, source)


def _bad(detail: str) -> DecodeError:
    return DecodeError("bad sample json", detail[:200])


def _check_doc(doc: dict[str, Any], members: Mapping[str, bytes]) -> None:
    """Our sample json must follow the schema; anything else is one reject, never a KeyError."""
    for name in ("id", "source", "kind"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise _bad(f"{name} missing or not a string")
    if doc["kind"] not in KINDS:
        raise _bad(f"unknown kind {doc['kind'][:50]!r}")
    if not isinstance(doc.get("meta", {}), dict | None):
        raise _bad("meta is not an object")
    columns = doc.get("columns", {})
    if not isinstance(columns, dict):
        raise _bad("columns is not an object")
    reserved = [c for c in columns if c in SAMPLE_FIELDS or c.startswith("_")]  # would overwrite the row's own
    if reserved:
        raise _bad(f"reserved column names {reserved[:5]}")
    segments = doc.get("segments")
    if not isinstance(segments, list):
        raise _bad("segments missing or not a list")
    for i, entry in enumerate(segments):
        if not isinstance(entry, dict) or entry.get("modality") not in MODALITIES:
            raise _bad(f"segment #{i} has no known modality")
        for name in ("text", "uri", "member"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise _bad(f"segment #{i}: {name} is not a string")
        if not isinstance(entry.get("meta", {}), dict | None):
            raise _bad(f"segment #{i}: meta is not an object")
        if entry.get("member") is not None and entry["member"] not in members:
            raise DecodeError("missing member", entry["member"][:200])


def _decode_ours(doc: dict[str, Any], members: Mapping[str, bytes]) -> dict[str, Any]:
    _check_doc(doc, members)
    segments = []
    for entry in doc["segments"]:
        member = entry.get("member")
        segments.append(
            {
                "modality": entry["modality"],
                "text": entry.get("text"),
                "bytes": members[member] if member is not None else None,
                "uri": entry.get("uri"),
                "meta": dumps_meta(entry.get("meta")),
            }
        )
    row = {
        "id": doc["id"],
        "source": doc["source"],
        "kind": doc["kind"],
        "segments": segments,
        "meta": dumps_meta(doc.get("meta")),
    }
    row.update(doc.get("columns", {}))
    return row


def _as_ingested(row: dict[str, Any], source: str, locator: str) -> dict[str, Any]:
    """One of our samples read as input: our id, this source and locator; what it claimed in meta."""
    meta = loads_meta(row["meta"])
    claimed = {"claimed_id": row["id"]}
    if row["source"] != source:
        claimed["claimed_source"] = row["source"]
    if "locator" in meta and meta["locator"] != locator:
        claimed["claimed_locator"] = meta["locator"]
    meta.update(claimed, locator=locator)
    return {
        "id": content_id(source, locator, row["segments"]),
        "source": source,
        "kind": row["kind"],
        "segments": row["segments"],
        "meta": dumps_meta(meta),
    }


def _decode_foreign(locator: str, members: Mapping[str, bytes], doc: dict[str, Any], source: str) -> dict[str, Any]:
    by_modality: dict[str, list[tuple[str, bytes]]] = {}
    ignored = []
    for ext, data in sorted(members.items()):
        if ext == "json":
            continue
        modality = MODALITY_OF_EXT.get(ext.rsplit(".", 1)[-1].lower())
        if modality is None:
            ignored.append(ext)
            continue
        by_modality.setdefault(modality, []).append((ext, data))
    if not by_modality:
        raise DecodeError("no usable members", ",".join(sorted(members)) or "empty")
    segments = []
    for modality in FOREIGN_ORDER:
        for ext, data in by_modality.get(modality, []):
            if len(data) == 0:
                raise DecodeError("empty member", ext)
            if modality == "text":
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DecodeError("text is not utf-8", f"{ext}: {e}") from e
                segments.append({"modality": "text", "text": text, "bytes": None, "uri": None, "meta": None})
            else:
                segments.append(
                    {"modality": modality, "text": None, "bytes": data, "uri": None, "meta": dumps_meta({"ext": ext})}
                )
    meta: dict[str, Any] = {"locator": locator, "foreign": doc} if doc else {"locator": locator}
    claimed = doc.get("id", doc.get("key"))
    if isinstance(claimed, str | int) and not isinstance(claimed, bool):
        meta["claimed_id"] = str(claimed)
    if ignored:
        meta["ignored_members"] = ignored
    return {
        "id": content_id(source, locator, segments),
        "source": source,
        "kind": kind_for(s["modality"] for s in segments),
        "segments": segments,
        "meta": dumps_meta(meta),
    }
