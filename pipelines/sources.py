"""Ingest: split each source into work units, and read one unit into Sample rows plus rejects.

Planning only lists and sizes inputs (cheap, on the driver); reading happens in workers. A unit is a
plain JSON dict so it can be stored in the run's plan and shipped to Ray.

- ``local``: a folder (or ``s3://`` prefix) of media; files sharing a stem form one sample
  (``cat.jpg`` + ``cat.txt`` → image_caption; ``a.wav`` + ``a.txt`` → asr; ``x.json`` is metadata).
- ``jsonl``: one record per line, split into byte ranges; a line belongs to the range its first
  byte is in.
- ``parquet``: one unit per row group; a file whose footer cannot be read is one unit of one reject.
- ``webdataset``: one unit per tar (``.tar``, or gzip/bzip2/xz compressed), ours or foreign
  (img2dataset/video2dataset layout).

Nothing in a source folder is skipped silently: files a source type does not read (a ``.txt`` in a
``webdataset`` folder), entries that resolve outside the folder, and directories that cannot be
listed go into "unread" units whose inputs are rejects with the reason.

Records (JSONL lines, Parquet rows) either list ``segments`` (``{"modality", "text" | "path" |
"uri"}``) or use the shorthand fields ``image``/``video``/``audio`` (a path, or bytes in Parquet)
and ``text``. Relative media paths resolve against the manifest's folder.

Confinement (``shards.confine``): a local source reads only under the real path of its root (or a
source's ``allow_paths``): symlinks that stay inside are fine, any other is rejected unopened, and
so is anything that is not a regular file (a fifo would block, ``/dev/zero`` never ends). A record's
path or ``uri`` must lie under its manifest's folder, its source's root, ``allow_paths`` or the
recipe's ``storage.allow_uris``; an ``http://`` or other-bucket URI is refused, never fetched.

Ids are ours: ``content_id(source, locator, content)``, with locators unique within a source (paths
are unique, line offsets and row numbers too, tar keys get ``~2`` when they come back). What an
input claims to be its id is kept as ``meta.claimed_id``.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.recipe import Recipe, SourceSpec
from shards import safejson, storage
from shards.codec import FOREIGN_ORDER, JSON_ENVELOPE_DEPTH, MODALITY_OF_EXT
from shards.confine import Confined, UriPolicy, confine_local, resolve_record_path
from shards.reader import Record, Reject, TarBounds, iter_records
from shards.schema import KINDS, MODALITIES, Segment, kind_for, locator_id, make_sample, printable

SIDECAR_EXTS = ("json",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "webdataset": TAR_SUFFIXES}
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def unit_id(source: str, locator: Any) -> str:
    digest = hashlib.sha256(json.dumps([source, locator], sort_keys=True).encode()).hexdigest()
    return f"{source}-{digest[:12]}"


# ---------------------------------------------------------------- where a source may read


def allow_paths(spec: SourceSpec, recipe: Recipe | None = None) -> list[str]:
    """The source's extra roots (``allow_paths``), relative ones resolved against the recipe's folder."""
    base = recipe.base_dir if recipe is not None else "."
    out = []
    for p in spec.options.get("allow_paths") or []:
        p = str(p)
        out.append(p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))
    return out


def _allow_uris(recipe: Recipe) -> list[str]:
    return [u if "://" in u or os.path.isabs(u) else os.path.join(recipe.base_dir, u) for u in recipe.allow_uris]


def _source_root(spec: SourceSpec, path: str) -> str:
    """The folder a source reads from: its path, or, when it names one file (``path``), that file's folder."""
    root = spec.path.rstrip("/")
    return (posixpath.dirname(path) or ".") if path.rstrip("/") == root else root or "."


# ---------------------------------------------------------------- planning


def plan_source(spec: SourceSpec, recipe: Recipe | None = None) -> list[dict[str, Any]]:
    planner = {"local": _plan_local, "jsonl": _plan_jsonl, "parquet": _plan_parquet, "webdataset": _plan_tars}
    units = planner[spec.type](spec, recipe)
    return [{"id": unit_id(spec.name, u), "source": spec.name, "type": spec.type, **u} for u in units]


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    return [u for spec in recipe.sources for u in plan_source(spec, recipe)]


def _walk_local(root: str) -> tuple[list[str], list[list[str]]]:
    """Every entry under a local folder, without following symlinks out of it (or round in a loop).

    Symlinks (to files or folders) are listed as entries, for the reader to confine; a folder that
    cannot be listed is returned as an unread entry (``path/``) instead of being skipped."""
    found: list[str] = []
    unread: list[list[str]] = []

    def failed(e: OSError) -> None:
        unread.append([str(e.filename).rstrip("/") + "/", "not read: unreadable directory"])

    for directory, dirs, files in os.walk(root, onerror=failed, followlinks=False):
        found.extend(os.path.join(directory, f) for f in files)
        found.extend(os.path.join(directory, d) for d in dirs if os.path.islink(os.path.join(directory, d)))
    # a name with undecodable bytes could not be a locator, an id or a ledger row: refuse it by name
    unread += [[f, "file name is not utf-8"] for f in found if printable(f) != f]
    return sorted(f for f in found if printable(f) == f), unread


def _find(path: str) -> tuple[list[str], list[list[str]]]:
    """Files under ``path`` (or ``path`` itself), and ``[entry, reason]`` for folders that could not be listed."""
    if not storage.is_remote(path):
        root = path.removeprefix("file://").rstrip("/") or "/"
        if os.path.isfile(root):
            return [path], []
        if not os.path.isdir(root):
            raise FileNotFoundError(f"source path does not exist: {path}")
        return _walk_local(root)
    fs, root = storage.filesystem(path)
    if fs.isfile(root):
        return [path], []
    if not fs.exists(root):
        raise FileNotFoundError(f"source path does not exist: {path}")
    prefix = path.split("://", 1)[0] + "://"
    return [prefix + p for p in sorted(fs.find(root))], []


def _unread_units(spec: SourceSpec, unread: list[list[str]]) -> list[dict[str, Any]]:
    """Units whose every input is a reject: ``[path, reason]`` entries the source will not read."""
    n = spec.unit_size
    return [{"unread": unread[i : i + n]} for i in range(0, len(unread), n)]


def _plan_files(spec: SourceSpec, recipe: Recipe | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The files a jsonl/parquet/webdataset source reads, plus units for everything else in its folder.

    Files in a local folder are confined before the planner opens any (Parquet footers): one that
    resolves outside the folder or is not a regular file is unread with that reason."""
    files, unread = _find(spec.path)
    if files == [spec.path]:
        return files, []
    suffixes = SUFFIXES[spec.type]
    policy = UriPolicy.of([spec.path], allow_paths(spec, recipe))
    planned = []
    for f in files:
        if not f.lower().endswith(suffixes):
            unread.append([f, f"not read: unsupported file for {spec.type} source"])
            continue
        try:
            confine_local(f, policy, "path outside source root")
        except Confined as e:
            unread.append([f, e.reason])
            continue
        planned.append(f)
    return planned, _unread_units(spec, unread)


def _plan_local(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    root = spec.path.removeprefix("file://").rstrip("/")
    groups: dict[str, list[str]] = {}
    files, unread = _find(root)
    for f in files:
        rel = f[len(root) :].lstrip("/")
        directory, base = posixpath.split(rel)
        stem = base.split(".", 1)[0] if not base.startswith(".") else base
        groups.setdefault(posixpath.join(directory, stem), []).append(rel)
    keys = sorted(groups)
    return [
        {"root": root, "groups": [sorted(groups[k]) for k in keys[i : i + spec.unit_size]]}
        for i in range(0, len(keys), spec.unit_size)
    ] + _unread_units(spec, unread)


def _plan_jsonl(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    files, unread = _plan_files(spec, recipe)
    units = []
    for f in files:
        total = storage.size(f)
        for start in range(0, max(total, 1), spec.unit_bytes):
            units.append({"path": f, "start": start, "end": min(start + spec.unit_bytes, total)})
    return units + unread


def _plan_parquet(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    """One unit per row group; a file whose metadata cannot be read is one unit (one reject), so a
    corrupt or truncated file never fails the plan of the whole run."""
    files, unread = _plan_files(spec, recipe)
    units: list[dict[str, Any]] = []
    for f in files:
        try:
            with storage.open_read(f) as fh:
                meta = pq.ParquetFile(fh).metadata
        except PARQUET_ERRORS as e:
            units.append({"path": f, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        for rg in range(meta.num_row_groups):
            units.append({"path": f, "row_group": rg})
    return units + unread


def _plan_tars(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    files, unread = _plan_files(spec, recipe)
    return [{"path": f} for f in files] + unread


# ---------------------------------------------------------------- reading


def read_unit(unit: dict[str, Any], recipe: Recipe) -> Iterator[Record]:
    """Every input of the unit, as a sample or a reject; never raises for bad input."""
    spec = next(s for s in recipe.sources if s.name == unit["source"])
    if "unread" in unit:
        for path, reason in unit["unread"]:
            yield _reject(spec.name, _relative(spec, path), reason, path)
        return
    if "error" in unit:
        yield _reject(spec.name, _relative(spec, unit["path"]), "unreadable parquet", unit["error"])
        return
    reader = {"local": _read_local, "jsonl": _read_jsonl, "parquet": _read_parquet, "webdataset": _read_tar}
    yield from reader[unit["type"]](unit, spec, recipe)


def _quote(part: str) -> str:
    """``%``, ``#`` and ``@`` escaped, so a path never reads like a path plus a ``#key``/``@offset`` suffix."""
    return part.replace("%", "%25").replace("#", "%23").replace("@", "%40")


def _relative(spec: SourceSpec, path: str) -> str:
    """Where an input sits inside its source, so ids survive moving the corpus elsewhere."""
    root = spec.path.rstrip("/")
    if path == root:
        return _quote(posixpath.basename(path))
    return _quote(path[len(root) + 1 :] if path.startswith(root + "/") else path)


def _reject(source: str, locator: str, reason: str, detail: str = "") -> Record:
    return Record(reject=Reject(locator_id(source, locator), reason, detail[:500], locator))


def _guarded(source: str, locator: str, make: Callable[[], dict[str, Any]]) -> Record:
    """One input's sample, or its reject: ``ValueError('reason: detail')`` is the reader's verdict;
    an OS error (permission, I/O) or an unforeseen error still ends in the ledger, not in a crash."""
    try:
        return Record(sample=make())
    except Confined as e:
        return _reject(source, locator, e.reason, e.detail)
    except ValueError as e:
        reason, _, detail = str(e).partition(": ")
        return _reject(source, locator, reason, detail)
    except OSError as e:
        return _reject(source, locator, "unreadable file", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - one hostile input must not stop the run
        return _reject(source, locator, "ingest error", f"{type(e).__name__}: {e}")


def _media_segment(modality: str, path: str, recipe: Recipe, meta: dict[str, Any] | None = None) -> Segment:
    """Media as bytes when small enough, else as a URI; raises ValueError for missing/empty files.

    ``path`` has been confined (``confine_local``) by the caller."""
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
    policy = UriPolicy.of([root], allow_paths(spec, recipe))
    for group in unit["groups"]:
        directory, base = posixpath.split(group[0])
        locator = posixpath.join(directory, base.split(".", 1)[0] if not base.startswith(".") else base)
        yield _guarded(
            spec.name, locator, lambda g=group, loc=locator: _local_group_sample(root, g, spec, recipe, loc, policy)
        )


def _local_group_sample(
    root: str, group: list[str], spec: SourceSpec, recipe: Recipe, locator: str, policy: UriPolicy
) -> dict[str, Any]:
    """One sample from the files sharing a stem; every file is confined before any is opened."""
    real = {rel: confine_local(storage.join(root, rel), policy, "path outside source root") for rel in group}
    by_modality: dict[str, list[str]] = {}
    meta: dict[str, Any] = {"files": group}
    limits = recipe.limits
    for rel in group:
        ext = rel.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(rel) else ""
        if ext in SIDECAR_EXTS:
            if storage.size(real[rel]) > limits.max_json_bytes:  # refused before it is read
                raise ValueError(f"json too large: {rel}: over {limits.max_json_bytes} bytes")
            try:
                meta["sidecar"] = safejson.loads(
                    storage.read_bytes(real[rel]), limits.max_json_depth, limits.max_json_bytes
                )
            except safejson.JsonBound as e:
                raise ValueError(f"{e.reason}: {rel}: {e.detail}") from e
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
            if modality == "text":
                segments.append(Segment("text", text=_read_text(real[rel], recipe.max_text_bytes)))
                continue
            seg = _media_segment(modality, real[rel], recipe, {"ext": _ext(rel)})
            if seg.uri is not None:  # a URI names the file as the source does, inside its root
                seg.uri = storage.join(root, rel)
            segments.append(seg)
    return make_sample(spec.name, kind_for(s.modality for s in segments), segments, locator, meta)


def _ext(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower()


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


def _record_policy(spec: SourceSpec, recipe: Recipe, path: str) -> UriPolicy:
    """Where a manifest's records may point: its folder, its source's root, ``allow_paths``, ``allow_uris``."""
    return UriPolicy.of(
        [posixpath.dirname(path) or ".", _source_root(spec, path)], allow_paths(spec, recipe), _allow_uris(recipe)
    )


def _record_sample(
    record: Any, spec: SourceSpec, recipe: Recipe, base: str, locator: str, policy: UriPolicy
) -> dict[str, Any]:
    """A JSONL line or Parquet row → Sample; raises ValueError with 'reason: detail'."""
    if not isinstance(record, dict):
        raise ValueError(f"record is not an object: {type(record).__name__}")
    segments: list[Segment] = []
    if record.get("segments") is not None:
        if not isinstance(record["segments"], list):
            raise ValueError("bad segments: not a list")
        for i, seg in enumerate(record["segments"]):
            segments.append(_record_segment(seg, recipe, base, i, policy))
    else:
        for modality in FOREIGN_ORDER:
            if record.get(modality) is not None:
                seg = {"modality": modality, "value": record[modality]}
                segments.append(_record_segment(seg, recipe, base, 0, policy))
    if not segments:
        raise ValueError("empty record: no segments and no text/image/audio/video field")
    kind = record.get("kind") or kind_for(s.modality for s in segments)
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown kind: {str(kind)[:50]}")
    extra = {
        str(k): _plain(v)
        for k, v in record.items()
        if k not in ("segments", "kind", *MODALITIES) and not isinstance(v, bytes | bytearray)
    }
    if "locator" in extra:  # the locator is ours; what the record says is only a claim
        extra["claimed_locator"] = extra.pop("locator")
    claimed = record.get("id")
    if isinstance(claimed, str | int) and not isinstance(claimed, bool):
        extra["claimed_id"] = str(claimed)
    return make_sample(spec.name, kind, segments, locator, extra)


def _plain(value: Any) -> Any:
    """A metadata value as JSON can hold it: what JSON cannot (dates, decimals, bytes in a list) becomes text."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)[:1000]
    return value


def _record_segment(seg: Any, recipe: Recipe, base: str, index: int, policy: UriPolicy) -> Segment:
    if not isinstance(seg, dict) or seg.get("modality") not in MODALITIES:
        raise ValueError(f"bad segment: #{index} has no known modality")
    modality = seg["modality"]
    value = seg.get("value", seg.get("text") if modality == "text" else seg.get("path", seg.get("bytes")))
    meta = {str(k): _plain(v) for k, v in seg["meta"].items()} if isinstance(seg.get("meta"), dict) else {}
    if modality == "text":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty text: segment #{index}")
        if len(value) > recipe.max_text_bytes and len(value.encode("utf-8")) > recipe.max_text_bytes:
            raise ValueError(f"text too large: segment #{index}: over {recipe.max_text_bytes} bytes")
        return Segment("text", text=value, meta=meta)
    if seg.get("uri"):
        uri = seg["uri"]
        if not isinstance(uri, str):
            raise ValueError(f"bad segment: {modality} #{index} uri is not a string")
        target = resolve_record_path(uri, base)
        try:
            policy.check(target)
        except Confined as e:
            raise ValueError(f"uri not allowed: {uri[:200]}") from e
        return Segment(modality, uri=target, meta=meta)
    if isinstance(value, bytes | bytearray):
        if not value:
            raise ValueError(f"empty file: {modality} segment #{index}")
        return Segment(modality, bytes=bytes(value), meta=meta)
    if isinstance(value, str) and value:
        path = resolve_record_path(value, base)
        real = confine_local(path, policy, "path outside allowed roots")
        seg_out = _media_segment(modality, real, recipe, {"ext": _ext(path), **meta})
        if seg_out.uri is not None:
            seg_out.uri = path
        return seg_out
    raise ValueError(f"bad segment: {modality} #{index} has no path, uri or bytes")


def _read_jsonl(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    path, start, end = unit["path"], unit["start"], unit["end"]
    base = posixpath.dirname(path)
    policy = _record_policy(spec, recipe, path)
    limits = recipe.limits
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
                record = safejson.loads(line, limits.max_json_depth, limits.max_json_bytes)
            except safejson.JsonBound as e:
                yield _reject(spec.name, locator, e.reason, e.detail)
                continue
            except UnicodeDecodeError as e:
                yield _reject(spec.name, locator, "text is not utf-8", str(e))
                continue
            except json.JSONDecodeError as e:
                yield _reject(spec.name, locator, "broken json line", f"{e}: {line[:120]!r}")
                continue
            yield _guarded(
                spec.name, locator, lambda r=record, loc=locator: _record_sample(r, spec, recipe, base, loc, policy)
            )


def _read_parquet(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """One row group; one that is too large or cannot be read is one reject standing for it."""
    path, rg = unit["path"], unit["row_group"]
    base = posixpath.dirname(path)
    limit = recipe.limits.max_row_group_rows
    where = f"{_relative(spec, path)}#rg{rg}"
    try:
        with storage.open_read(path) as fh:
            pf = pq.ParquetFile(fh)
            rows = pf.metadata.row_group(rg).num_rows
            records = pf.read_row_group(rg).to_pylist() if rows <= limit else None
    except PARQUET_ERRORS as e:
        yield _reject(spec.name, where, "unreadable parquet", f"{type(e).__name__}: {e}")
        return
    if records is None:
        yield _reject(spec.name, where, "row group too large", f"{rows} rows, over {limit}")
        return
    policy = _record_policy(spec, recipe, path)
    for i, record in enumerate(records):
        locator = f"{where}/{i}"
        yield _guarded(
            spec.name, locator, lambda r=record, loc=locator: _record_sample(r, spec, recipe, base, loc, policy)
        )


def _read_tar(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """A tar read as input: bounded by the recipe's limits, ids computed by us, uris confined."""
    limits = recipe.limits
    bounds = TarBounds(
        max_member_bytes=int(spec.options.get("max_member_bytes", max(recipe.max_inline_bytes, 1 << 20))),
        max_members_per_key=limits.max_members_per_key,
        max_key_bytes=limits.max_key_bytes,
        max_json_depth=limits.max_json_depth + JSON_ENVELOPE_DEPTH,
        max_json_bytes=limits.max_json_bytes,
    )
    path = unit["path"]
    policy = UriPolicy.of([_source_root(spec, path)], allow_paths(spec, recipe), _allow_uris(recipe))
    for rec in iter_records(path, spec.name, name=_relative(spec, path), bounds=bounds, trust_id=False):
        yield _confine_uris(rec, policy, posixpath.dirname(path)) if rec.sample is not None else rec


def _confine_uris(rec: Record, policy: UriPolicy, base: str) -> Record:
    """A tar sample whose segments name a URI outside what the recipe allows becomes a reject."""
    sample = rec.sample
    assert sample is not None
    for seg in sample["segments"]:
        if seg.get("uri") is None:
            continue
        target = resolve_record_path(seg["uri"], base)
        if not policy.allows(target):
            locator = json.loads(sample["meta"] or "{}").get("locator", "")
            return _reject(sample["source"], locator, "uri not allowed", str(seg["uri"])[:200])
        seg["uri"] = target
    return rec
