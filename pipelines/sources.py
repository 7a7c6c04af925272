"""Ingest: split each source into work units, and read one unit into Sample rows plus rejects.

Planning only lists and sizes inputs (cheap, on the driver); reading happens in workers. A unit is a
plain JSON dict so it can be stored in the run's plan and shipped to Ray.

- ``local``: a folder (or ``s3://`` prefix) of media; files sharing a stem form one sample
  (``cat.jpg`` + ``cat.txt`` → image_caption; ``a.wav`` + ``a.txt`` → asr; ``x.json`` is metadata).
- ``jsonl``: one record per line, split into byte ranges; a line belongs to the range its first
  byte is in.
- ``parquet``: one unit per row group.
- ``webdataset``: one unit per tar, ours or foreign (img2dataset/video2dataset layout).

Records (JSONL lines, Parquet rows) either list ``segments`` (``{"modality", "text" | "path" |
"uri"}``) or use the shorthand fields ``image``/``video``/``audio`` (a path, or bytes in Parquet)
and ``text``. Relative media paths resolve against the manifest's folder.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from pipelines.recipe import Recipe, SourceSpec
from shards import storage
from shards.codec import FOREIGN_ORDER, MODALITY_OF_EXT
from shards.reader import Record, Reject, iter_records
from shards.schema import KINDS, MODALITIES, Segment, kind_for, locator_id, make_sample

SIDECAR_EXTS = ("json",)


def unit_id(source: str, locator: Any) -> str:
    digest = hashlib.sha256(json.dumps([source, locator], sort_keys=True).encode()).hexdigest()
    return f"{source}-{digest[:12]}"


# ---------------------------------------------------------------- planning


def plan_source(spec: SourceSpec) -> list[dict[str, Any]]:
    planner = {"local": _plan_local, "jsonl": _plan_jsonl, "parquet": _plan_parquet, "webdataset": _plan_tars}
    units = planner[spec.type](spec)
    return [{"id": unit_id(spec.name, u), "source": spec.name, "type": spec.type, **u} for u in units]


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    return [u for spec in recipe.sources for u in plan_source(spec)]


def _find(path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    fs, root = storage.filesystem(path)
    if fs.isfile(root):
        return [path]
    if not fs.exists(root):
        raise FileNotFoundError(f"source path does not exist: {path}")
    found = sorted(fs.find(root))
    prefix = path.split("://", 1)[0] + "://" if storage.is_remote(path) else ""
    return [prefix + p for p in found if not suffixes or p.lower().endswith(suffixes)]


def _plan_local(spec: SourceSpec) -> list[dict[str, Any]]:
    root = spec.path.rstrip("/")
    groups: dict[str, list[str]] = {}
    for f in _find(root):
        rel = f[len(root) :].lstrip("/")
        directory, base = posixpath.split(rel)
        stem = base.split(".", 1)[0] if not base.startswith(".") else base
        groups.setdefault(posixpath.join(directory, stem), []).append(rel)
    keys = sorted(groups)
    return [
        {"root": root, "groups": [sorted(groups[k]) for k in keys[i : i + spec.unit_size]]}
        for i in range(0, len(keys), spec.unit_size)
    ]


def _plan_jsonl(spec: SourceSpec) -> list[dict[str, Any]]:
    units = []
    for f in _find(spec.path, (".jsonl", ".json", ".ndjson")):
        total = storage.size(f)
        for start in range(0, max(total, 1), spec.unit_bytes):
            units.append({"path": f, "start": start, "end": min(start + spec.unit_bytes, total)})
    return units


def _plan_parquet(spec: SourceSpec) -> list[dict[str, Any]]:
    units = []
    for f in _find(spec.path, (".parquet",)):
        with storage.open_read(f) as fh:
            meta = pq.ParquetFile(fh).metadata
        for rg in range(meta.num_row_groups):
            units.append({"path": f, "row_group": rg})
    return units


def _plan_tars(spec: SourceSpec) -> list[dict[str, Any]]:
    return [{"path": f} for f in _find(spec.path, (".tar",))]


# ---------------------------------------------------------------- reading


def read_unit(unit: dict[str, Any], recipe: Recipe) -> Iterator[Record]:
    """Every input of the unit, as a sample or a reject; never raises for bad input."""
    spec = next(s for s in recipe.sources if s.name == unit["source"])
    reader = {"local": _read_local, "jsonl": _read_jsonl, "parquet": _read_parquet, "webdataset": _read_tar}
    yield from reader[unit["type"]](unit, spec, recipe)


def _relative(spec: SourceSpec, path: str) -> str:
    """Where an input sits inside its source, so ids survive moving the corpus elsewhere."""
    root = spec.path.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _reject(source: str, locator: str, reason: str, detail: str = "") -> Record:
    return Record(reject=Reject(locator_id(source, locator), reason, detail[:500], locator))


def _media_segment(modality: str, path: str, recipe: Recipe, meta: dict[str, Any] | None = None) -> Segment:
    """Media as bytes when small enough, else as a URI; raises ValueError for missing/empty files."""
    if not storage.exists(path):
        raise ValueError(f"missing media file: {path}")
    n = storage.size(path)
    if n == 0:
        raise ValueError(f"empty file: {path}")
    meta = {"ext": path.rsplit(".", 1)[-1].lower(), **(meta or {})}
    if n > recipe.max_inline_bytes:
        return Segment(modality, uri=path, meta={**meta, "bytes": n})
    return Segment(modality, bytes=storage.read_bytes(path), meta=meta)


def _read_local(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    root = unit["root"]
    for group in unit["groups"]:
        directory, base = posixpath.split(group[0])
        locator = posixpath.join(directory, base.split(".", 1)[0] if not base.startswith(".") else base)
        try:
            yield Record(sample=_local_group_sample(root, group, spec, recipe, locator))
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            yield _reject(spec.name, locator, reason, detail or ",".join(group))


def _local_group_sample(root: str, group: list[str], spec: SourceSpec, recipe: Recipe, locator: str) -> dict[str, Any]:
    by_modality: dict[str, list[str]] = {}
    meta: dict[str, Any] = {"files": group}
    for rel in group:
        ext = rel.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(rel) else ""
        if ext in SIDECAR_EXTS:
            try:
                meta["sidecar"] = json.loads(storage.read_bytes(storage.join(root, rel)).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"bad json sidecar: {rel}: {e}") from e
            continue
        modality = MODALITY_OF_EXT.get(ext)
        if modality is None:
            raise ValueError(f"unsupported file type: {rel}")
        by_modality.setdefault(modality, []).append(rel)
    if not by_modality:
        raise ValueError(f"no media or text: {','.join(group)}")
    segments = []
    for modality in FOREIGN_ORDER:
        for rel in by_modality.get(modality, []):
            path = storage.join(root, rel)
            if modality == "text":
                segments.append(Segment("text", text=_read_text(path, recipe.max_text_bytes)))
            else:
                segments.append(_media_segment(modality, path, recipe))
    return make_sample(spec.name, kind_for(s.modality for s in segments), segments, locator, meta)


def _read_text(path: str, max_bytes: int) -> str:
    if storage.size(path) > max_bytes:
        raise ValueError(f"text too large: {path}: over {max_bytes} bytes")
    data = storage.read_bytes(path)
    if not data.strip():
        raise ValueError(f"empty text: {path}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text is not utf-8: {path}: {e}") from e


def _record_sample(record: Any, spec: SourceSpec, recipe: Recipe, base: str, locator: str) -> dict[str, Any]:
    """A JSONL line or Parquet row → Sample; raises ValueError with 'reason: detail'."""
    if not isinstance(record, dict):
        raise ValueError(f"record is not an object: {type(record).__name__}")
    segments: list[Segment] = []
    if record.get("segments") is not None:
        if not isinstance(record["segments"], list):
            raise ValueError("bad segments: not a list")
        for i, seg in enumerate(record["segments"]):
            segments.append(_record_segment(seg, recipe, base, i))
    else:
        for modality in FOREIGN_ORDER:
            if record.get(modality) is not None:
                segments.append(_record_segment({"modality": modality, "value": record[modality]}, recipe, base, 0))
    if not segments:
        raise ValueError("empty record: no segments and no text/image/audio/video field")
    kind = record.get("kind") or kind_for(s.modality for s in segments)
    if kind not in KINDS:
        raise ValueError(f"unknown kind: {kind}")
    extra = {k: v for k, v in record.items() if k not in ("segments", "kind", *MODALITIES) and _jsonable(v)}
    return make_sample(spec.name, kind, segments, locator, extra)


def _jsonable(value: Any) -> bool:
    return not isinstance(value, bytes | bytearray)


def _record_segment(seg: Any, recipe: Recipe, base: str, index: int) -> Segment:
    if not isinstance(seg, dict) or seg.get("modality") not in MODALITIES:
        raise ValueError(f"bad segment: #{index} has no known modality")
    modality = seg["modality"]
    value = seg.get("value", seg.get("text") if modality == "text" else seg.get("path", seg.get("bytes")))
    meta = seg.get("meta") if isinstance(seg.get("meta"), dict) else {}
    if modality == "text":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty text: segment #{index}")
        return Segment("text", text=value, meta=meta)
    if seg.get("uri"):
        return Segment(modality, uri=str(seg["uri"]), meta=meta)
    if isinstance(value, bytes | bytearray):
        if not value:
            raise ValueError(f"empty file: {modality} segment #{index}")
        return Segment(modality, bytes=bytes(value), meta=meta)
    if isinstance(value, str) and value:
        path = value if storage.is_remote(value) or posixpath.isabs(value) else storage.join(base, value)
        return _media_segment(modality, path, recipe, meta)
    raise ValueError(f"bad segment: {modality} #{index} has no path, uri or bytes")


def _read_jsonl(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    path, start, end = unit["path"], unit["start"], unit["end"]
    base = posixpath.dirname(path)
    with storage.open_read(path) as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous unit
        pos = f.tell()
        while pos < end or (start == end == 0 and pos == 0):
            line = f.readline(recipe.max_text_bytes + 1)
            if not line:
                break
            locator = f"{_relative(spec, path)}@{pos}"
            pos += len(line)
            if len(line) > recipe.max_text_bytes and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest without holding it
                    line = f.readline(1 << 20)
                    pos += len(line)
                yield _reject(spec.name, locator, "line too long", f"over {recipe.max_text_bytes} bytes")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield _reject(spec.name, locator, "text is not utf-8", str(e))
                continue
            except json.JSONDecodeError as e:
                yield _reject(spec.name, locator, "broken json line", f"{e}: {line[:120]!r}")
                continue
            try:
                yield Record(sample=_record_sample(record, spec, recipe, base, locator))
            except ValueError as e:
                reason, _, detail = str(e).partition(": ")
                yield _reject(spec.name, locator, reason, detail)


def _read_parquet(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    path, rg = unit["path"], unit["row_group"]
    base = posixpath.dirname(path)
    with storage.open_read(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(rg)
    for i, record in enumerate(table.to_pylist()):
        locator = f"{_relative(spec, path)}#rg{rg}/{i}"
        try:
            yield Record(sample=_record_sample(record, spec, recipe, base, locator))
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            yield _reject(spec.name, locator, reason, detail)


def _read_tar(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    max_member = int(spec.options.get("max_member_bytes", max(recipe.max_inline_bytes, 1 << 20)))
    yield from iter_records(unit["path"], spec.name, max_member, name=_relative(spec, unit["path"]))
