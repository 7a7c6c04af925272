"""How one Sample becomes WebDataset tar members and back.

Our layout: ``<id>.json`` holds the sample (kind, source, metadata, scores and the ordered segments;
text inline), and each media segment with bytes is a member ``<id>.<index>.<ext>``. WebDataset
splits keys at the first dot, so stock ``webdataset`` readers see one sample per id.

Foreign layouts (img2dataset, video2dataset: ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json``) decode
into a Sample too, with segments in a fixed modality order. Members compressed one by one
(``txt.gz``, as WebDataset's own test data has; ``.bz2``, ``.xz``, ``.zst`` alike) are inflated under
the key's byte bounds; label members (``.cls``, ``.label``...) and msgpack members become sample
metadata; a member's bytes decide its modality when its extension lies (video2dataset's still-image
rows are JPEGs named ``.mp4``). Only JSON, msgpack (plain values) and raw bytes are ever decoded: no
pickle, no ``.pyd``/``.pth`` members (they are listed in ``meta.ignored_members``). One streaming
decompression (``decompressing``) reads compressed members here and compressed manifests
(``urls.csv.gz``) at ingest.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zlib
from collections.abc import Mapping
from typing import IO, Any

import msgpack
import zstandard

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
AUDIO_EXTS = (
    *("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac"),
    *("aiff", "aif", "aifc", "caf", "wma", "amr", "au", "mka", "oga", "weba"),  # other containers ffmpeg reads
)
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v", "ogv", "mpg", "mpeg", "wmv", "flv")
TEXT_EXTS = ("txt", "text", "caption", "md")
MODALITY_OF_EXT = {
    **{e: "image" for e in IMAGE_EXTS},
    **{e: "audio" for e in AUDIO_EXTS},
    **{e: "video" for e in VIDEO_EXTS},
    **{e: "text" for e in TEXT_EXTS},
}
FOREIGN_ORDER = ("image", "video", "audio", "text")
# Sidecar members that label a sample (WebDataset's ``.cls``, ImageNet-style ``.label``): kept as
# ``meta.labels`` text, bounded, never as segments.
LABEL_EXTS = ("cls", "cls2", "class", "label", "labels", "id", "index", "idx", "target", "tag", "tags")
MAX_LABEL_BYTES = 64 << 10
MSGPACK_EXTS = ("msgpack", "mp", "mpk")
# Serialized Python objects: decoding them runs code. Listed in ``meta.ignored_members``, never read.
NEVER_DECODED = ("pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npy", "npz")
# Bound on a compressed member's inflated size when the caller gives none (a reader's default member bound).
DEFAULT_MAX_INFLATED_BYTES = 2 << 30
# Compressions a member (``txt.gz``) or a manifest (``urls.csv.zst``) may come in, by its name's last suffix.
COMPRESSIONS = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}
# What reading a broken compressed stream raises (gzip.BadGzipFile is an OSError; a stream cut short, EOFError).
DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
INFLATE_STEP = 1 << 20  # bytes a bounded inflate asks its stream for at a time
# Extensions naming the same format, so a member is only said to lie when its bytes are another format.
_FAMILIES = (
    ("jpg", "jpeg"),
    ("tif", "tiff"),
    ("aiff", "aif", "aifc"),
    ("mp4", "m4a", "m4v", "mov", "3gp"),
    ("webm", "mkv", "mka", "weba"),
    ("ogg", "opus", "oga", "ogv"),
    ("wma", "wmv", "asf"),
)
FAMILY_OF_EXT = {e: family[0] for family in _FAMILIES for e in family}
# Containers that hold audio or video alike: their bytes do not say which, so the extension does.
AMBIGUOUS_CONTAINERS = ("mp4", "webm", "ogg", "wma")
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


def sniff(data: bytes) -> str | None:
    """The format magic bytes name (a file extension), or None: bytes are trusted over a member's name."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}[head[8:12]]
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0" and len(head) >= 26:
        return "bmp"
    if head.startswith((b"II*\0", b"MM\0*")):
        return "tif"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS\0"):
        return "ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"caff\0\x01"):
        return "caf"
    if head.startswith(b".snd") and len(head) >= 24:
        return "au"
    if head.startswith(b"#!AMR"):
        return "amr"
    if head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):  # ASF: wma/wmv alike, the name decides
        return "wma"
    if head.startswith(b"ID3") and head[3:4] in (b"\2", b"\3", b"\4"):
        return "mp3"
    if head[:2] in (b"\xff\xfb", b"\xff\xfa", b"\xff\xf3", b"\xff\xf2", b"\xff\xe3", b"\xff\xe2"):
        return "mp3"  # MPEG-1/2/2.5 layer III frame sync, with or without CRC
    if head[:2] in (b"\xff\xf1", b"\xff\xf9"):
        return "aac"  # ADTS
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "m4a" if brand == b"M4A " else "mov" if brand == b"qt  " else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    return None


def sniff_ext(modality: str, data: bytes) -> str:
    """A file extension from magic bytes, so viewers and foreign readers can open members."""
    found = sniff(data)
    if found is not None:
        return found
    return {"image": "img", "audio": "audio", "video": "video", "text": "txt"}[modality]


def _same_format(a: str, b: str) -> bool:
    return FAMILY_OF_EXT.get(a, a) == FAMILY_OF_EXT.get(b, b)


def media_of(ext: str, data: bytes) -> tuple[str, str] | None:
    """(modality, extension) of a member from its bytes and its claimed extension, or None when neither
    names media. A text member keeps its name unless it is not UTF-8; ASF is audio unless named video."""
    claimed = MODALITY_OF_EXT.get(ext)
    if claimed == "text":
        try:
            data.decode("utf-8")
            return "text", ext
        except UnicodeDecodeError:
            pass
    found = sniff(data)
    if found is None:
        return (claimed, ext) if claimed is not None else None
    if _same_format(found, ext):
        return MODALITY_OF_EXT.get(ext, MODALITY_OF_EXT[found]), ext
    modality = MODALITY_OF_EXT[found]
    if FAMILY_OF_EXT.get(found, found) in AMBIGUOUS_CONTAINERS and claimed in ("audio", "video"):
        modality = claimed
    return modality, found


def compression_of(name: str) -> str | None:
    """The compression a name's last suffix says (``urls.csv.gz``, ``txt.zst``), or None."""
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return suffix if suffix in COMPRESSIONS else None


def decompressing(fileobj: IO[bytes], compression: str) -> IO[bytes]:
    """A buffered reader of what ``fileobj`` decompresses to, streaming: concatenated streams (gzip
    members, bzip2/xz streams, zstd frames) read as one, a stream cut short raises EOFError, and a
    read inflates little more than it returns, so a bomb costs only what its reader asks of it.
    Closing it leaves ``fileobj`` open."""
    if compression == "gz":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")  # ignores gzip(1)'s trailing zero padding too
    if compression == "bz2":
        return bz2.BZ2File(fileobj, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(fileobj, mode="rb")
    if compression == "zst":
        return io.BufferedReader(_ZstdFrames(fileobj))
    raise ValueError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSIONS)})")


class _ZstdFrames(io.RawIOBase):
    """zstd frames, one after another, decoded here because ``zstandard``'s stream reader never says
    that its input ended inside a frame. Input goes in ``STEP`` bytes at a time: a zstd block of up
    to 128 KiB can take 4 bytes, so one step inflates to at most 8 MiB, whatever the input holds."""

    STEP = 256
    READ = 256 << 10  # compressed bytes read from the file at a time

    def __init__(self, fileobj: IO[bytes]) -> None:
        super().__init__()
        self._fp = fileobj
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the frame being decoded; None between frames
        self._input = memoryview(b"")
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if not self._input:
                self._input = memoryview(self._fp.read(self.READ))
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("zstd input ended inside a frame")
                    return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            piece, self._input = self._input[: self.STEP], self._input[self.STEP :]
            self._out = memoryview(self._frame.decompress(piece))
            if self._frame.eof:  # the next frame starts in what this one left
                self._input = memoryview(self._frame.unused_data + bytes(self._input))
                self._frame = None
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def inflate_bounded(data: bytes, limit: int, name: str) -> bytes:
    """Inflate a member compressed as its name's suffix says (``k.txt.gz``, ``.bz2``, ``.xz``,
    ``.zst``; concatenated streams too), never holding more than ``limit`` bytes: a small bomb stops
    at its bound instead of filling memory. Raises DecodeError."""
    compression = compression_of(name)
    if compression is None:
        raise ValueError(f"{name} does not name a compression")
    out = bytearray()
    try:
        with decompressing(io.BytesIO(data), compression) as stream:
            while piece := stream.read(min(INFLATE_STEP, limit + 1 - len(out))):
                out += piece
                if len(out) > limit:
                    raise DecodeError("member too large after decompression", f"{name}: over {limit} bytes")
    except DECOMPRESS_ERRORS as e:
        raise DecodeError("undecodable member", f"{name}: corrupt {COMPRESSIONS[compression]}: {e}") from e
    return bytes(out)


gunzip_bounded = inflate_bounded  # its name from when only gzip members were read


def inflate_members(
    key: str, members: Mapping[str, bytes], max_member_bytes: int | None, max_key_bytes: int | None
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Members with every ``<ext>.gz`` (``.bz2``, ``.xz``, ``.zst``) inflated to ``<ext>``, and {inner ext:
    member ext} of those.

    Each inflated member is bounded by ``max_member_bytes`` and, with what the key already holds, by
    ``max_key_bytes``: the bounds a key's members are read under hold after decompression too."""
    packed = sorted(e for e in members if compression_of(e) is not None and e.rsplit(".", 1)[0])
    if not packed:
        return dict(members), {}
    out = {e: d for e, d in members.items() if e not in packed}
    origin: dict[str, str] = {}
    held = sum(len(d) for d in out.values())
    for ext in packed:
        inner, name = ext.rsplit(".", 1)[0], f"{key}.{ext}"
        if inner in out:
            raise DecodeError("duplicate member in sample", f"{name} and {key}.{inner}")
        if not members[ext]:
            raise DecodeError("empty member", name)
        limit = max_member_bytes if max_member_bytes is not None else DEFAULT_MAX_INFLATED_BYTES
        if max_key_bytes is not None:
            limit = min(limit, max(max_key_bytes - held, 0))
        out[inner] = inflate_bounded(members[ext], limit, name)
        origin[inner] = ext
        held += len(out[inner])
    return out, origin


def _no_ext(code: int, data: bytes) -> Any:
    """msgpack extension types would build objects of the writer's choosing: refused."""
    raise ValueError(f"extension type {code} refused")


def unpack_meta(data: bytes, name: str, max_depth: int | None, max_bytes: int | None) -> Any:
    """A msgpack member as plain JSON values: no extension types, string keys, depth and size bounded
    as JSON is; binary values become ``"<binary: N bytes>"`` (meta is text)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError("msgpack too large", f"{name}: {len(data)} bytes, limit {max_bytes}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, timestamp=3, ext_hook=_no_ext)
    except msgpack.StackError as e:
        raise DecodeError("msgpack too deep", name) from e
    except Exception as e:  # noqa: BLE001  FormatError, ExtraData, bad utf-8, refused ext, timestamp overflow...
        raise DecodeError("bad msgpack member", f"{name}: {str(e)[:150]}") from e
    return _plain(value, name, TRUSTED_JSON_DEPTH if max_depth is None else max_depth, 1)


def _plain(value: Any, name: str, max_depth: int, depth: int) -> Any:
    if isinstance(value, list | dict):
        if depth > max_depth:
            raise DecodeError("msgpack too deep", f"{name}: over {max_depth} levels")
        if isinstance(value, list):
            return [_plain(v, name, max_depth, depth + 1) for v in value]
        out = {}
        for k, v in value.items():
            if isinstance(k, bytes):
                try:
                    k = k.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DecodeError("bad msgpack member", f"{name}: a map key is not utf-8") from e
            out[k] = _plain(v, name, max_depth, depth + 1)
        return out
    if isinstance(value, bytes):
        return f"<binary: {len(value)} bytes>"
    if hasattr(value, "isoformat"):  # a msgpack timestamp, read as datetime
        return value.isoformat()
    return value


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
    max_member_bytes: int | None = None,
    max_key_bytes: int | None = None,
) -> dict[str, Any]:
    """A Sample row from one key's members, ours or a foreign layout. Raises DecodeError.

    ``trust_id`` is for reading our own output (audit, inspect, the trainer): our samples keep their
    stored id and source. Ingest passes ``trust_id=False``: every id is then ours to compute from
    ``source``, ``locator`` (default: the key) and content, and what the input claimed (its ``id``,
    or a foreign json's ``id``/``key``) is kept as ``meta.claimed_id``. A tar's json is bounded in
    bytes and depth; ours may nest ``JSON_ENVELOPE_DEPTH`` deeper than the record it came from.
    Compressed members (``<ext>.gz``, ``.bz2``, ``.xz``, ``.zst``) are inflated first, under
    ``max_member_bytes`` and ``max_key_bytes``."""
    members, origin = inflate_members(key, members, max_member_bytes, max_key_bytes)
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
    foreign = doc or {}
    return _decode_foreign(
        key, locator or key, members, foreign, source, origin=origin, max_depth=max_json_depth, max_bytes=max_json_bytes
    )


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


def _label(data: bytes, name: str) -> str:
    if len(data) > MAX_LABEL_BYTES:
        raise DecodeError("label too large", f"{name}: {len(data)} bytes, limit {MAX_LABEL_BYTES}")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DecodeError("text is not utf-8", f"{name}: {e}") from e


def _decode_foreign(
    key: str,
    locator: str,
    members: Mapping[str, bytes],
    doc: dict[str, Any],
    source: str,
    *,
    origin: Mapping[str, str] | None = None,
    max_depth: int | None = TRUSTED_JSON_DEPTH,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """A foreign key's members as a Sample: media and text become segments (by their bytes when the
    extension lies), labels and msgpack become meta, serialized objects and unknown members are listed."""
    origin = origin or {}
    by_modality: dict[str, list[tuple[str, str, bytes]]] = {}
    ignored: list[str] = []
    labels: dict[str, str] = {}
    packed: dict[str, Any] = {}
    for ext, data in sorted(members.items()):
        if ext == "json":
            continue
        member_ext = origin.get(ext, ext)
        name = f"{key}.{member_ext}"
        last = ext.rsplit(".", 1)[-1].lower()
        if last in NEVER_DECODED:
            ignored.append(member_ext)
            continue
        if last in LABEL_EXTS or last in MSGPACK_EXTS:
            if len(data) == 0:
                raise DecodeError("empty member", name)
            if last in LABEL_EXTS:
                labels[ext] = _label(data, name)
            else:
                packed[ext] = unpack_meta(data, name, max_depth, max_bytes)
            continue
        if len(data) == 0:
            if last in MODALITY_OF_EXT:
                raise DecodeError("empty member", name)
            ignored.append(member_ext)
            continue
        found = media_of(last, data)
        if found is None:
            ignored.append(member_ext)
            continue
        modality, actual = found
        by_modality.setdefault(modality, []).append((ext, ext if actual == last else actual, data))
    if not by_modality:
        raise DecodeError("no usable members", ",".join(sorted(origin.get(e, e) for e in members)) or "empty")
    segments = []
    for modality in FOREIGN_ORDER:
        for ext, actual, data in by_modality.get(modality, []):
            name = f"{key}.{origin.get(ext, ext)}"
            if modality == "text":
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DecodeError("text is not utf-8", f"{name}: {e}") from e
                segments.append({"modality": "text", "text": text, "bytes": None, "uri": None, "meta": None})
                continue
            seg_meta = {"ext": actual}
            if actual != ext:
                seg_meta["ext_claimed"] = ext
            if ext in origin:
                seg_meta["member"] = origin[ext]
            segments.append(
                {"modality": modality, "text": None, "bytes": data, "uri": None, "meta": dumps_meta(seg_meta)}
            )
    meta: dict[str, Any] = {"locator": locator, "foreign": doc} if doc else {"locator": locator}
    claimed = doc.get("id", doc.get("key"))
    if isinstance(claimed, str | int) and not isinstance(claimed, bool):
        meta["claimed_id"] = str(claimed)
    if labels:
        meta["labels"] = labels
    if packed:
        meta["msgpack"] = packed
    if ignored:
        meta["ignored_members"] = ignored
    return {
        "id": content_id(source, locator, segments),
        "source": source,
        "kind": kind_for(s["modality"] for s in segments),
        "segments": segments,
        "meta": dumps_meta(meta),
    }
