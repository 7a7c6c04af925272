"""The ``conversations`` source: chat (SFT) records in the ShareGPT, LLaVA or OpenAI layout → SFT samples.

``{type: conversations, path: ..., format: sharegpt | llava | openai}`` reads JSON lines (plain or
compressed, split into byte ranges as ``jsonl``), Parquet (row groups, as ``parquet``) and ``.json``
files holding one JSON array (LLaVA's and ShareGPT's releases; read as a stream, one element at a
time, each bounded like a JSONL line). Planning, globs, confinement and bounds are the ``jsonl`` and
``parquet`` sources'; only the record → sample step is here.

A sample is the conversation in order. Every segment's meta has ``role`` (``system`` | ``user`` |
``assistant``) and ``turn`` (the message's 0-based index in the conversation); a message with text
and media is several segments with the same role and turn, in the order the format puts them:

- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt"|..., "value": str}], "system"?,
  "image"|"images"?, "audio"|"audios"?, "video"|"videos"?}``. ``<image>``/``<audio>``/``<video>`` in a
  value mark where the record's media go, in order; a kind of media with no placeholder at all goes
  before the text of the first user message. A message may carry its own ``image``/``audio``/``video``
  (before its text); on an assistant message, ``audio`` is the spoken answer (after its text).
- ``llava``: the same layout, strict: the ``<image>`` (``<video>``, ``<audio>``) placeholders must match
  the media given one for one.
- ``openai``: ``{"messages": [{"role": "system"|"developer"|"user"|"assistant", "content": str | [parts]}]}``
  with parts ``{"type": "text", "text"}``, ``{"type": "image_url", "image_url": {"url"}}``,
  ``{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}``, ``video_url`` and the
  ``image``/``audio``/``video`` parts (``{"type": "image", "image": path}``); an assistant ``audio``
  (``{"data": base64, "transcript"?, "format"?}``, or a ``path``/``url``) is its spoken answer.

Media are paths (relative to the manifest's folder, or to the source's ``media_root``; confined as
every source's are), ``http(s)`` URLs (kept as ``uri`` segments where ``storage.allow_uris`` allows,
for the ``download`` step), bytes (Parquet) or base64 (``data:`` URLs, ``input_audio``).

A spoken assistant turn is an audio segment with role ``assistant`` (a spoken answer comes after the
turn's text, when it has any), its words in ``meta.tts.text`` (the transcript, else the turn's text)
and the voice in ``meta.tts.voice`` when the sample names one; any assistant audio counts as spoken.

Sample meta: ``format``; ``turns`` (messages in the conversation); ``category`` (the record's
``category``, normalised to Table 5's names: ``general_qa``, ``ocr``, ``graphical``, ``mathematics``,
``spatiotemporal``, ``captioning``, ``medical``; another name is kept lower-cased with ``_`` for spaces;
null without one); ``voice`` when the record's ``voice`` field or the system prompt names one
(``voice: piper:NAME`` or ``voice: espeak:LANG[+VARIANT]``, the TTS step's voice names); ``claimed_id``
(the record's ``id``) and the record's other fields. The kind: any spoken assistant turn →
``sft_audio_generation``; else by the media present: ``sft_video`` (any video), ``sft_image_audio``,
``sft_image``, ``sft_audio``, ``sft_text``.

Every malformed record is a reject with a reason (``missing conversations``, ``empty conversation``,
``unknown role``, ``bad turn``, ``empty turn``, ``no assistant turn``, ``placeholder mismatch``, ``bad
media``, ``bad base64``, ``bad category``, ``bad voice``, plus the shared ones: ``record is not an
object``, ``broken json line``, ``json too deep``, ``text too large``, ``missing media file``, ``path
outside allowed roots``, ``uri not allowed``, ...). Claimed ids are only kept: two records claiming
one id are two samples (content duplicates are the dedup stage's job).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Iterator
from typing import IO, Any

from pipelines.recipe import Recipe, SourceSpec
from shards import safejson
from shards.codec import COMPRESSIONS, DECOMPRESS_ERRORS, compression_of
from shards.confine import UriPolicy
from shards.reader import Record
from shards.schema import Segment, make_sample

ROLES = {
    "sharegpt": {
        "system": "system",
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "bot": "assistant",
        "chatgpt": "assistant",
        "model": "assistant",
    },
    "openai": {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"},
}
ROLES["llava"] = ROLES["sharegpt"]
CATEGORIES = ("general_qa", "ocr", "graphical", "mathematics", "spatiotemporal", "captioning", "medical")
CATEGORY_ALIASES = {
    "general": "general_qa",
    "generalqa": "general_qa",
    "qa": "general_qa",
    "vqa": "general_qa",
    "math": "mathematics",
    "maths": "mathematics",
    "caption": "captioning",
    "chart": "graphical",
    "charts": "graphical",
    "graph": "graphical",
    "graphics": "graphical",
    "diagram": "graphical",
    "spatial": "spatiotemporal",
    "temporal": "spatiotemporal",
}
MEDIA = ("image", "audio", "video")
PLACEHOLDER = re.compile(r"<(image|audio|video)>")
VOICE = re.compile(r"(?:piper|espeak):[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
VOICE_IN_PROMPT = re.compile(r"\bvoice\s*[:=]\s*(" + VOICE.pattern + ")", re.IGNORECASE)
AUDIO_EXTS = {"wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "pcm16"}
# record fields the layout consumes; the rest become sample metadata
CONSUMED = {
    "sharegpt": {"conversations", "system", "id", "category", "voice", "locator", *MEDIA, "images", "audios", "videos"},
    "openai": {"messages", "id", "category", "voice", "locator"},
}
CONSUMED["llava"] = CONSUMED["sharegpt"]


def _bad(reason: str, detail: str) -> ValueError:
    return ValueError(f"{reason}: {detail}")


# ---------------------------------------------------------------- record → sample


def conversation_sample(
    record: Any, spec: SourceSpec, recipe: Recipe, base: str, locator: str, policy: UriPolicy
) -> dict[str, Any]:
    """One chat record → one SFT sample; raises ValueError ``reason: detail`` for a malformed one."""
    if not isinstance(record, dict):
        raise ValueError(f"record is not an object: {type(record).__name__}")
    fmt = str(spec.options["format"])
    base = spec.options.get("media_root") or base
    media = _Media(recipe, base, policy)
    if fmt == "openai":
        messages = _messages(record, "messages", fmt)
        segments = [seg for turn, m in enumerate(messages) for seg in _openai_message(m, turn, media)]
        turns = len(messages)
    else:
        segments, turns = _sharegpt_segments(record, _messages(record, "conversations", fmt), fmt, media)
    if not any(seg.meta["role"] == "assistant" for seg in segments):
        raise _bad("no assistant turn", f"{turns} messages, none from the assistant")
    voice = _voice(record, segments)
    said: dict[int, list[str]] = {}
    for seg in segments:
        if seg.meta["role"] == "assistant" and seg.modality == "text" and seg.text:
            said.setdefault(seg.meta["turn"], []).append(seg.text.strip())
    for seg in segments:  # every assistant audio is speech the model says: the tts convention
        if seg.meta["role"] == "assistant" and seg.modality == "audio":
            words = " ".join(said.get(seg.meta["turn"], []))
            seg.meta.setdefault("tts", {"text": words} if words else {})
            if voice:
                seg.meta["tts"]["voice"] = voice
    meta: dict[str, Any] = {
        "format": fmt,
        "turns": turns,
        "category": _category(record.get("category")),
        **({"voice": voice} if voice else {}),
    }
    from pipelines.sources import _plain

    for k, v in record.items():
        if k not in CONSUMED[fmt] and not isinstance(v, bytes | bytearray):
            meta.setdefault(str(k), _plain(v))
    if "locator" in record:  # the locator is ours; what the record says is only a claim
        meta["claimed_locator"] = _plain(record["locator"])
    claimed = record.get("id")
    if isinstance(claimed, str | int) and not isinstance(claimed, bool):
        meta["claimed_id"] = str(claimed)
    return make_sample(spec.name, _kind(segments), segments, locator, meta)


def _messages(record: dict[str, Any], key: str, fmt: str) -> list[Any]:
    messages = record.get(key)
    if messages is None:
        other = "messages" if key == "conversations" else "conversations"
        hint = f" (it has {other!r}: is the source's format right?)" if other in record else ""
        raise _bad(f"missing {key}", f"no {key!r} list in a {fmt} record{hint}")
    if not isinstance(messages, list):
        raise _bad(f"missing {key}", f"{key!r} is a {type(messages).__name__}, not a list")
    if not messages:
        raise _bad("empty conversation", f"{key!r} is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad("bad turn", f"message {i} is a {type(m).__name__}, not an object")
    return messages


def _role(message: dict[str, Any], fmt: str, turn: int) -> str:
    key = "role" if fmt == "openai" else "from"
    said = message.get(key)
    role = ROLES[fmt].get(said.strip().lower()) if isinstance(said, str) else None
    if role is None:
        raise _bad("unknown role", f"message {turn} {key} {str(said)[:50]!r}; expected one of {sorted(ROLES[fmt])}")
    return role


def _meta(role: str, turn: int) -> dict[str, Any]:
    return {"role": role, "turn": turn}


class _Media:
    """Makes media segments the way ``jsonl`` records do (``_record_segment``: confinement, uris, size)."""

    def __init__(self, recipe: Recipe, base: str, policy: UriPolicy) -> None:
        self.recipe, self.base, self.policy = recipe, base, policy

    def segment(self, modality: str, value: Any, meta: dict[str, Any], what: str) -> Segment:
        from pipelines.sources import _record_segment

        if isinstance(value, dict):  # a Hugging Face Image/Audio value: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and value[:5].lower() == "data:":
            data, ext = _data_url(value, what)
            return Segment(modality, bytes=data, meta={**meta, **({"ext": ext} if ext else {})})
        if not isinstance(value, str | bytes | bytearray) or not value:
            raise _bad("bad media", f"{what}: {type(value).__name__} is not a path, url or bytes")
        return _record_segment(
            {"modality": modality, "value": value, "meta": meta}, self.recipe, self.base, 0, self.policy
        )

    def base64(self, modality: str, data: Any, ext: Any, meta: dict[str, Any], what: str) -> Segment:
        if not isinstance(data, str) or not data:
            raise _bad("bad media", f"{what}: no base64 data")
        raw = _b64(data, what)
        ext = str(ext).lower() if isinstance(ext, str) and ext.lower() in AUDIO_EXTS else None
        return Segment(modality, bytes=raw, meta={**meta, **({"ext": ext} if ext else {})})


def _b64(data: str, what: str) -> bytes:
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad("bad base64", f"{what}: {e}") from e
    if not raw:
        raise _bad("empty file", f"{what}: base64 data decodes to nothing")
    return raw


def _data_url(value: str, what: str) -> tuple[bytes, str | None]:
    """``data:image/png;base64,...`` → bytes and an extension from its media type."""
    head, sep, data = value.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise _bad("bad media", f"{what}: a data: url that is not base64")
    subtype = head[5:].split(";")[0].partition("/")[2].lower()
    ext = {"jpeg": "jpg", "mpeg": "mp3", "x-wav": "wav", "wave": "wav"}.get(subtype, subtype) or None
    return _b64(data, what), ext if ext and ext.isalnum() else None


def _spoken(media: _Media, audio: Any, text: str | None, meta: dict[str, Any], what: str) -> Segment:
    """An assistant's spoken answer: a path/url, or ``{"data": base64, "format"?, "transcript"?}``."""
    transcript = None
    if isinstance(audio, dict) and "data" in audio:
        transcript = audio.get("transcript")
        seg = media.base64("audio", audio.get("data"), audio.get("format") or "wav", meta, what)
    elif isinstance(audio, dict) and ("path" in audio or "url" in audio):
        transcript = audio.get("transcript")
        seg = media.segment("audio", audio.get("path") or audio.get("url"), meta, what)
    else:
        seg = media.segment("audio", audio, meta, what)
    if transcript is not None and not isinstance(transcript, str):
        raise _bad("bad turn", f"{what}: transcript is not a string")
    words = transcript if transcript and transcript.strip() else text
    seg.meta["tts"] = {"text": words} if words else {}
    return seg


def _text(text: str, role: str, turn: int, recipe: Recipe) -> Segment:
    if len(text) * 4 > recipe.max_text_bytes and len(text.encode("utf-8")) > recipe.max_text_bytes:
        raise _bad("text too large", f"message {turn}: over {recipe.max_text_bytes} bytes")
    return Segment("text", text=text, meta=_meta(role, turn))


def _as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str | bytes | bytearray | dict):
        return [value]
    raise _bad("bad media", f"{what}: {type(value).__name__} is not a path, url or list")


def _record_media(record: dict[str, Any]) -> dict[str, list[Any]]:
    """The record-level media of a ShareGPT/LLaVA record: ``image``/``images`` (and audio, video)."""
    out = {}
    for m in MEDIA:
        if record.get(m) is not None and record.get(m + "s") is not None:
            raise _bad("bad media", f"both {m!r} and {m + 's'!r} given")
        out[m] = _as_list(record.get(m) if record.get(m) is not None else record.get(m + "s"), m)
    return out


def _sharegpt_segments(
    record: dict[str, Any], messages: list[dict[str, Any]], fmt: str, media: _Media
) -> tuple[list[Segment], int]:
    """The segments of a ShareGPT/LLaVA conversation, and its message count (a record-level
    ``system`` prompt is message 0 when the conversation has no system message of its own)."""
    pending = _record_media(record)
    roles, texts = [], []
    for i, m in enumerate(messages):
        roles.append(_role(m, fmt, i))
        value = m.get("value")
        if value is not None and not isinstance(value, str):
            raise _bad("bad turn", f"message {i} value is a {type(value).__name__}, not a string")
        texts.append(value or "")
    counts = {k: sum(t.count(f"<{k}>") for t in texts) for k in MEDIA}
    for k in MEDIA:
        if counts[k] != len(pending[k]) and (fmt == "llava" or counts[k]):
            raise _bad("placeholder mismatch", f"{counts[k]} <{k}> placeholders for {len(pending[k])} {k}s")
    unplaced = [(k, j, v) for k in MEDIA if not counts[k] for j, v in enumerate(pending[k])]
    if unplaced and "user" not in roles:
        raise _bad("placeholder mismatch", "media without a placeholder and no user message to put them in")
    segments: list[Segment] = []
    system = record.get("system")
    offset = 0
    if system is not None and "system" not in roles:
        if not isinstance(system, str):
            raise _bad("bad turn", f"system is a {type(system).__name__}, not a string")
        if system.strip():
            segments.append(_text(system, "system", 0, media.recipe))
            offset = 1
    used = dict.fromkeys(MEDIA, 0)
    for i, (m, role, text) in enumerate(zip(messages, roles, texts, strict=True)):
        turn = i + offset
        meta = _meta(role, turn)
        out: list[Segment] = []
        if role == "user" and unplaced:  # media without any placeholder go before the first user text
            out += [media.segment(k, v, dict(meta), f"{k} {j}") for k, j, v in unplaced]
            unplaced = []
        own = {k: _as_list(m.get(k), f"message {i} {k}") for k in MEDIA}
        spoken = own.pop("audio") if role == "assistant" else []
        for k, values in own.items():
            out += [media.segment(k, v, dict(meta), f"message {i} {k} {j}") for j, v in enumerate(values)]
        parts = PLACEHOLDER.split(text)
        for n, part in enumerate(parts):
            if n % 2:  # a placeholder: the record's next medium of its kind
                out.append(media.segment(part, pending[part][used[part]], dict(meta), f"{part} {used[part]}"))
                used[part] += 1
                continue
            if len(parts) > 1:  # whitespace is trimmed only where a placeholder was
                part = part.rstrip() if n == 0 else part.lstrip() if n == len(parts) - 1 else part.strip()
            if part.strip():
                out.append(_text(part, role, turn, media.recipe))
        if len(spoken) > 1:
            raise _bad("bad media", f"message {i}: {len(spoken)} spoken answers, expected one")
        words = PLACEHOLDER.sub("", text).strip() or None
        out += [_spoken(media, a, words, dict(meta), f"message {i} audio") for a in spoken]
        _check_turn(out, role, turn)
        segments += out
    return segments, len(messages) + offset


def _check_turn(segments: list[Segment], role: str, turn: int) -> None:
    if not segments and role != "system":  # an empty system prompt says nothing; it is left out
        raise _bad("empty turn", f"message {turn} ({role}) holds no text or media")


PART_TYPES = {"image_url": "image", "video_url": "video", "image": "image", "video": "video", "audio": "audio"}


def _openai_message(message: dict[str, Any], turn: int, media: _Media) -> list[Segment]:
    role = _role(message, "openai", turn)
    meta = _meta(role, turn)
    content = message.get("content")
    segments: list[Segment] = []
    if isinstance(content, str):
        if content.strip():
            segments.append(_text(content, role, turn, media.recipe))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            segments += _openai_part(part, meta, media, f"message {turn} part {j}")
    elif content is not None:
        raise _bad("bad turn", f"message {turn} content is a {type(content).__name__}, not a string or list")
    audio = message.get("audio")
    if audio is not None:
        if role != "assistant":
            raise _bad("bad turn", f"message {turn}: only an assistant message has an audio answer")
        words = " ".join(s.text for s in segments if s.modality == "text" and s.text).strip() or None
        segments.append(_spoken(media, audio, words, dict(meta), f"message {turn} audio"))
    _check_turn(segments, role, turn)
    return segments


def _openai_part(part: Any, meta: dict[str, Any], media: _Media, what: str) -> list[Segment]:
    if isinstance(part, str):
        return [_text(part, meta["role"], meta["turn"], media.recipe)] if part.strip() else []
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad("bad turn", f"{what} is not a content part with a type")
    kind = part["type"]
    if kind in ("text", "input_text", "output_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad("bad turn", f"{what} text is a {type(text).__name__}, not a string")
        return [_text(text, meta["role"], meta["turn"], media.recipe)] if text.strip() else []
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise _bad("bad media", f"{what}: input_audio is not an object")
        return [media.base64("audio", audio.get("data"), audio.get("format") or "wav", dict(meta), what)]
    if kind in PART_TYPES:
        value = part.get(kind)
        if isinstance(value, dict) and "url" in value:
            value = value["url"]
        return [media.segment(PART_TYPES[kind], value, dict(meta), what)]
    raise _bad("bad turn", f"{what} has unknown type {kind[:40]!r}")


def _kind(segments: list[Segment]) -> str:
    if any(s.modality == "audio" and s.meta["role"] == "assistant" for s in segments):
        return "sft_audio_generation"
    present = {s.modality for s in segments}
    if "video" in present:
        return "sft_video"
    if {"image", "audio"} <= present:
        return "sft_image_audio"
    if "image" in present:
        return "sft_image"
    if "audio" in present:
        return "sft_audio"
    return "sft_text"


def _category(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad("bad category", f"{type(value).__name__}, not a string")
    name = re.sub(r"[\s\-/]+", "_", value.strip().lower())[:100]
    if not name:
        return None
    return name if name in CATEGORIES else CATEGORY_ALIASES.get(name.replace("_", ""), CATEGORY_ALIASES.get(name, name))


def _voice(record: dict[str, Any], segments: list[Segment]) -> str | None:
    """The voice a record names: its ``voice`` field, else ``voice: piper:NAME`` in a system prompt."""
    named = record.get("voice")
    if named is not None:
        if not isinstance(named, str) or not VOICE.fullmatch(named.strip()):
            raise _bad("bad voice", f"{str(named)[:60]!r}: expected piper:NAME or espeak:LANG[+VARIANT]")
        return named.strip()
    for seg in segments:
        if seg.meta["role"] == "system" and seg.text:
            m = VOICE_IN_PROMPT.search(seg.text)
            if m:
                return m[1].rstrip(".")
    return None


# ---------------------------------------------------------------- JSON arrays

ARRAY_PEEK = 1 << 16
CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_SPACE = b" \t\r\n"
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_TOKEN = re.compile(rb'["\[\]{},]')
_QUOTE = ord('"')
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)


def is_json_array(path: str) -> bool:
    """Whether a ``.json`` manifest holds one JSON array (its first byte past blanks is ``[``), rather
    than JSON lines. ``.jsonl``/``.ndjson`` are always lines."""
    from pipelines.sources import _open_manifest

    name = path.lower()
    compression = compression_of(path)
    plain = name[: -len(compression) - 1] if compression else name
    if not plain.endswith(".json"):
        return False
    head = b""
    try:
        with _open_manifest(path) as f:
            while len(head) < ARRAY_PEEK and not head.removeprefix(_BOM).lstrip(_SPACE):
                data = f.read(4096)
                if not data:
                    break
                head += data
    except (OSError, *DECOMPRESS_ERRORS):
        pass  # what came before the break decides; the reader reports the break
    return head.removeprefix(_BOM).lstrip(_SPACE)[:1] == b"["


class ArrayBroken(ValueError):
    """The array's text (or its stream) broke at ``offset``: the rest of the file is one reject."""

    def __init__(self, offset: int, detail: str, reason: str = "broken json array") -> None:
        super().__init__(detail)
        self.offset, self.reason = offset, reason


def array_items(
    f: IO[bytes], limit: int, chunk: int = CHUNK, broken: tuple[type[BaseException], ...] = (), name: str = ""
) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, element bytes)`` for each element of the JSON array ``f`` holds, read as a stream;
    an element over ``limit`` bytes is ``(offset, None)``, read past without being held. Raises
    ``ArrayBroken`` where the text stops being an array (an element's own syntax is the parser's), or
    where a ``broken`` error (a decompressor's) stops the stream: reason ``corrupt NAME``."""
    buf = bytearray()
    base = 0  # buf[0] is the stream's byte ``base``
    eof = False
    # read1: what a decompressor has inflated so far, so the records before a break still come out
    read = getattr(f, "read1", f.read)

    def fill() -> bool:
        nonlocal eof
        try:
            data = b"" if eof else read(chunk)
        except broken as e:
            raise ArrayBroken(base + len(buf), f"{type(e).__name__}: {e}", f"corrupt {name}") from e
        eof = eof or not data
        buf.extend(data)
        return bool(data)

    def first_non_space(at: int) -> re.Match[bytes] | None:
        while not (found := _NON_SPACE.search(buf, at)) and fill():
            pass
        return found

    m = first_non_space(0)
    if m is None:
        return  # an empty file holds no record
    if buf.startswith(_BOM):
        m = first_non_space(3)
        if m is None:
            return
    if buf[m.start()] != ord("["):
        raise ArrayBroken(m.start(), "not a json array")
    i, depth, start, over, in_string = m.start() + 1, 1, None, False, False
    while True:
        if in_string:
            j = _STRING_BODY.match(buf, i).end()  # type: ignore[union-attr] - it always matches
            if j < len(buf) and buf[j] == _QUOTE:
                in_string, i = False, j + 1
                continue
            i = j  # the string runs on past the buffer (j may sit on a last backslash)
        else:
            token = _TOKEN.search(buf, i)
            end = token.start() if token else len(buf)
            if depth == 1 and start is None:
                lead = _NON_SPACE.search(buf, i, end)
                if lead:
                    start = base + lead.start()
                elif token and buf[end] not in b",]":
                    start = base + end
            if token:
                c, i = buf[end], end + 1
                if c == _QUOTE:
                    in_string = True
                elif c in b"[{":
                    depth += 1
                elif depth > 1 and c != ord(","):
                    depth -= 1
                elif c == ord("}"):
                    raise ArrayBroken(base + end, "unbalanced brackets")
                elif depth == 1:  # a , or the array's ]: the element before it ends
                    if start is not None:
                        whole = not over and base + end - start <= limit
                        yield start, bytes(buf[start - base : end]).strip() if whole else None
                    start, over = None, False
                    if c == ord("]"):
                        m = first_non_space(i)
                        if m is not None:
                            raise ArrayBroken(base + m.start(), "data after the json array")
                        return
                    if i > chunk:
                        del buf[:i]
                        base, i = base + i, 0
                continue
            i = len(buf)
        # the buffer ends inside a string or between tokens: read on
        if start is not None and base + len(buf) - start > limit:
            over = True
        keep = i if start is None or over else start - base
        del buf[:keep]
        base, i = base + keep, i - keep
        if not fill():
            raise ArrayBroken(base + i, "unterminated json array")


def read_json_array(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """The records of a ``.json`` file holding one array, each bounded as a JSONL line is; where the
    array breaks (or its stream does) is one reject after the records before it."""
    from pipelines.sources import _guarded, _open_manifest, _record_policy, _record_sample, _reject, _relative

    path = unit["path"]
    where, base = _relative(spec, path), posixpath.dirname(path)
    policy = _record_policy(spec, recipe, path)
    limits = recipe.limits
    compression = compression_of(path)
    broken = DECOMPRESS_ERRORS if compression else ()
    try:
        with _open_manifest(path) as f:
            for at, element in array_items(
                f, recipe.max_text_bytes, broken=broken, name=COMPRESSIONS.get(compression or "", "")
            ):
                locator = f"{where}@{at}"
                if element is None:
                    yield _reject(spec.name, locator, "record too long", f"over {recipe.max_text_bytes} bytes")
                    continue
                try:
                    record = safejson.loads(element, limits.max_json_depth, limits.max_json_bytes)
                except safejson.JsonBound as e:
                    yield _reject(spec.name, locator, e.reason, e.detail)
                    continue
                except UnicodeDecodeError as e:
                    yield _reject(spec.name, locator, "text is not utf-8", str(e))
                    continue
                except json.JSONDecodeError as e:
                    yield _reject(spec.name, locator, "broken json record", f"{e}: {element[:120]!r}")
                    continue
                yield _guarded(
                    spec.name,
                    locator,
                    lambda r=record, loc=locator: _record_sample(r, spec, recipe, base, loc, policy),
                )
    except ArrayBroken as e:
        yield _reject(spec.name, f"{where}@{e.offset}", e.reason, str(e))
