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

from shards.schema import (
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


def decode_sample(key: str, members: Mapping[str, bytes], source: str = "", locator: str = "") -> dict[str, Any]:
    """A Sample row from one key's members, ours or a foreign layout. Raises DecodeError.

    Foreign samples get their id from ``source`` and ``locator`` (default: the key) and content."""
    doc = None
    if "json" in members:
        try:
            doc = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DecodeError("bad json member", str(e)[:200]) from e
        if not isinstance(doc, dict):
            raise DecodeError("bad json member", "not an object")
    if doc is not None and doc.get("format") == FORMAT:
        return _decode_ours(doc, members)
    return _decode_foreign(locator or key, members, doc or {}, source)


def _decode_ours(doc: dict[str, Any], members: Mapping[str, bytes]) -> dict[str, Any]:
    segments = []
    for entry in doc["segments"]:
        data = None
        if "member" in entry:
            if entry["member"] not in members:
                raise DecodeError("missing member", entry["member"])
            data = members[entry["member"]]
        segments.append(
            {
                "modality": entry["modality"],
                "text": entry.get("text"),
                "bytes": data,
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
    if ignored:
        meta["ignored_members"] = ignored
    return {
        "id": content_id(source, locator, segments),
        "source": source,
        "kind": kind_for(s["modality"] for s in segments),
        "segments": segments,
        "meta": dumps_meta(meta),
    }
