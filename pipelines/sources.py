"""Ingest: split each source into work units, and read one unit into Sample rows plus rejects.

Planning only lists and sizes inputs (cheap, on the driver); reading happens in workers. A unit is a
plain JSON dict so it can be stored in the run's plan and shipped to Ray.

- ``local``: a folder (or ``s3://`` prefix) of media; files sharing a stem form one sample
  (``cat.jpg`` + ``cat.txt`` → image_caption; ``a.wav`` + ``a.txt`` → asr; ``x.json`` is metadata).
- ``jsonl``: one record per line, split into byte ranges; a line belongs to the range its first
  byte is in.
- ``parquet``: one unit per row group; a file whose footer cannot be read is one unit of one reject.
- ``webdataset``: one unit per tar (``.tar``, or gzip/bzip2/xz/zstd compressed), ours or foreign
  (img2dataset/video2dataset layout).
- ``csv``: ``.csv``/``.tsv`` manifests with a header (img2dataset ``url,caption``, WebVid
  ``videoid,contentUrl,...,name``), split into byte ranges at row starts; a row is a record. Without
  a header (``header: false``), ``columns.names`` names the columns in order; with ``header: auto``
  (the default) the first row is the header, or, when ``columns.names`` is given, only if it holds
  exactly those names.
- ``conversations``: chat (SFT) records in the ShareGPT, LLaVA or OpenAI layout (``format``), from
  JSON lines (as ``jsonl``), Parquet (as ``parquet``) or a ``.json`` array read as a stream; the
  record → sample step is ``pipelines.conversations``.

JSONL and CSV/TSV manifests may come compressed (``urls.csv.gz``, ``docs.jsonl.zst``: gzip, bzip2,
xz, zstd, by the last suffix). A compressed file cannot be sought into, so it is one unit, read as
a stream: offsets in its locators count decompressed bytes, a line or row is bounded by
``max_text_bytes`` as in a plain file, and where the stream breaks (``corrupt gzip``) is one reject
after the rows before it.

Nothing in a source folder is skipped silently: files a source type does not read (a ``.txt`` in a
``webdataset`` folder), entries that resolve outside the folder, and directories that cannot be
listed go into "unread" units whose inputs are rejects with the reason.

Records (JSONL lines, Parquet rows, CSV rows) either list ``segments`` (``{"modality", "text" | "path" |
"uri"}``), use the shorthand fields ``image``/``video``/``audio`` (a path, or bytes in Parquet)
and ``text``, or are interleaved documents in the mmc4 or OBELICS layout (``_interleaved``).
Relative media paths resolve against the manifest's folder. An ``http(s)://`` value is never fetched
here: it stays a ``uri`` segment when ``storage.allow_uris`` holds it, for a download step.

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

import contextlib
import csv
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.recipe import Recipe, RecipeError, SourceSpec
from shards import safejson, storage
from shards.codec import (
    COMPRESSIONS,
    DECOMPRESS_ERRORS,
    FOREIGN_ORDER,
    JSON_ENVELOPE_DEPTH,
    MODALITY_OF_EXT,
    compression_of,
    decompressing,
)
from shards.confine import Confined, UriPolicy, confine_local, resolve_record_path
from shards.reader import Record, Reject, TarBounds, iter_records
from shards.schema import KINDS, MODALITIES, Segment, kind_for, locator_id, make_sample, printable

SIDECAR_EXTS = ("json",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar.zst", ".tzst")


def _or_compressed(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    return (*suffixes, *(f"{s}.{c}" for s in suffixes for c in COMPRESSIONS))


SUFFIXES = {
    "jsonl": _or_compressed((".jsonl", ".json", ".ndjson")),
    "parquet": (".parquet",),
    "webdataset": TAR_SUFFIXES,
    "csv": _or_compressed((".csv", ".tsv")),
    "conversations": (*_or_compressed((".jsonl", ".json", ".ndjson")), ".parquet"),
}
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def unit_id(source: str, locator: Any) -> str:
    digest = hashlib.sha256(json.dumps([source, locator], sort_keys=True).encode()).hexdigest()
    return f"{source}-{digest[:12]}"


# ---------------------------------------------------------------- where a source may read


def allow_paths(spec: SourceSpec, recipe: Recipe | None = None) -> list[str]:
    """The source's extra roots (``allow_paths``), relative ones resolved against the recipe's folder."""
    base = recipe.base_dir if recipe is not None else "."
    out = []
    extra = [spec.options["media_root"]] if spec.options.get("media_root") else []  # conversations
    for p in [*(spec.options.get("allow_paths") or []), *extra]:
        p = str(p)
        out.append(p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))
    return out


def _allow_uris(recipe: Recipe) -> list[str]:
    return [u if "://" in u or os.path.isabs(u) else os.path.join(recipe.base_dir, u) for u in recipe.allow_uris]


def _source_root(spec: SourceSpec, path: str) -> str:
    """The folder a source reads from: its path (a pattern's fixed folder), or, when it names one file
    (``path``), that file's folder."""
    root = _root(spec).rstrip("/")
    return (posixpath.dirname(path) or ".") if path.rstrip("/") == root else root or "."


# ---------------------------------------------------------------- planning


def plan_source(spec: SourceSpec, recipe: Recipe | None = None) -> list[dict[str, Any]]:
    planner = {
        "local": _plan_local,
        "jsonl": _plan_jsonl,
        "parquet": _plan_parquet,
        "webdataset": _plan_tars,
        "csv": _plan_csv,
        "conversations": _plan_conversations,
    }
    units = planner[spec.type](spec, recipe)
    return [{"id": unit_id(spec.name, u), "source": spec.name, "type": spec.type, **u} for u in units]


def plan(recipe: Recipe) -> list[dict[str, Any]]:
    units = [u for spec in recipe.sources for u in plan_source(spec, recipe)]
    return limit_plan(units, recipe, recipe.sample_limit) if recipe.sample_limit else units


def limit_plan(units: list[dict[str, Any]], recipe: Recipe, n: int) -> list[dict[str, Any]]:
    """``--limit N``: the units that hold the first ``n`` inputs of each source, in plan order, each
    with ``limit``: how many of its inputs to read (``read_unit`` stops there).

    An input is what ingest counts: a sample or a reject (a broken file is one input). How many a
    unit holds is only known by reading it (a JSONL byte range, a tar), so each unit is read here up
    to what its source still lacks, on the driver; for a sample run that is a few inputs per source.
    Units read empty are left out; so are the inputs past the limit: they are not read, so a limited
    run neither writes nor rejects them."""
    left = {spec.name: n for spec in recipe.sources}
    out = []
    for unit in units:
        want = left[unit["source"]]
        if want <= 0:
            continue
        with contextlib.closing(read_unit(unit, recipe)) as records:
            got = sum(1 for _ in itertools.islice(records, want))
        if got:
            out.append({**unit, "limit": got})
            left[unit["source"]] -= got
    return out


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


PATTERN_CHARS = "*?[{"
MAX_BRACE_NAMES = 100_000
_BRACE = re.compile(r"\{([^{}]*)\}")


@functools.lru_cache(maxsize=256)
def _pattern_root(path: str) -> str | None:
    """The folder above a path pattern's first wildcard segment (``data/*.jsonl`` → ``data``); None for
    a plain path, or one that exists as written (a file named ``a[1].jsonl`` is read as named)."""
    if not any(c in path for c in PATTERN_CHARS) or storage.exists(path):
        return None
    parts = path.split("/")
    i = next(i for i, part in enumerate(parts) if any(c in part for c in PATTERN_CHARS))
    return "/".join(parts[:i]) or ("/" if path.startswith("/") else ".")


def _root(spec: SourceSpec) -> str:
    return _pattern_root(spec.path) or spec.path


def _braces(path: str, start: int = 0) -> list[str]:
    """WebDataset-style brace expansion: ``{000..009}`` (zero-padded as written) and ``{a,b}``."""
    m = _BRACE.search(path, start)
    if not m:
        return [path]
    body = m[1]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        a, b = int(span[1]), int(span[2])
        width = len(span[1]) if span[1].startswith("0") else 0
        if abs(b - a) >= MAX_BRACE_NAMES:
            raise RecipeError(f"source path {path!r}: {{{body}}} names over {MAX_BRACE_NAMES} files")
        options = [f"{n:0{width}d}" for n in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    elif "," in body:
        options = body.split(",")
    else:
        return _braces(path, m.end())  # a literal {x}
    out = [q for o in options for q in _braces(path[: m.start()] + o + path[m.end() :], m.start() + len(o))]
    if len(out) > MAX_BRACE_NAMES:
        raise RecipeError(f"source path {path!r} names over {MAX_BRACE_NAMES} files")
    return out


def _expand(path: str) -> tuple[list[str], list[list[str]]]:
    """Files a path pattern names (braces, then ``*``/``?``/``[...]``/``**`` globs; a matched folder is
    walked), and unread entries: a file a brace names that does not exist is ``missing file``."""
    files: list[str] = []
    unread: list[list[str]] = []
    for name in _braces(path):
        if not any(c in name for c in "*?["):
            if storage.exists(name):
                found, bad = _find(name)
                files, unread = files + found, unread + bad
            else:
                unread.append([name, "missing file"])
            continue
        if storage.is_remote(name):
            fs, pattern = storage.filesystem(name)
            prefix = name.split("://", 1)[0] + "://"
            matches = [prefix + m for m in fs.glob(pattern)]
        else:
            matches = glob.glob(name.removeprefix("file://"), recursive=True)
        for m in matches:
            found, bad = _find(m)
            files, unread = files + found, unread + bad
    if not files and not unread:
        raise FileNotFoundError(f"source path matches no file: {path}")
    return sorted(set(files)), unread


def _unread_units(spec: SourceSpec, unread: list[list[str]]) -> list[dict[str, Any]]:
    """Units whose every input is a reject: ``[path, reason]`` entries the source will not read."""
    n = spec.unit_size
    return [{"unread": unread[i : i + n]} for i in range(0, len(unread), n)]


def _plan_files(spec: SourceSpec, recipe: Recipe | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The files a jsonl/parquet/webdataset source reads, plus units for everything else in its folder.

    Files in a local folder are confined before the planner opens any (Parquet footers): one that
    resolves outside the folder or is not a regular file is unread with that reason. A path pattern
    (``data/*.jsonl``, ``shards/{000..009}.tar``) reads what it matches, confined to its fixed folder."""
    root = _pattern_root(spec.path)
    if root is None:
        files, unread = _find(spec.path)
        if files == [spec.path]:
            return files, []
    else:
        files, unread = _expand(spec.path)
    suffixes = SUFFIXES[spec.type]
    policy = UriPolicy.of([root or spec.path], allow_paths(spec, recipe))
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
    units = [u for f in files for u in _jsonl_units(f, spec)]
    return units + unread


def _jsonl_units(f: str, spec: SourceSpec) -> list[dict[str, Any]]:
    """A JSON-lines file's byte ranges (a compressed one: one unit, its whole stream)."""
    if compression_of(f):
        return [WHOLE_STREAM | {"path": f}]
    total = storage.size(f)
    return [
        {"path": f, "start": start, "end": min(start + spec.unit_bytes, total)}
        for start in range(0, max(total, 1), spec.unit_bytes)
    ]


def _plan_conversations(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    """JSON lines as ``jsonl`` (byte ranges), Parquet as ``parquet`` (row groups), and a ``.json`` file
    holding one JSON array (LLaVA's and ShareGPT's releases) as one unit read as a stream."""
    from pipelines.conversations import is_json_array

    files, unread = _plan_files(spec, recipe)
    units: list[dict[str, Any]] = []
    for f in files:
        if f.lower().endswith(".parquet"):
            units += _parquet_units([f])
        elif is_json_array(f):
            units.append(WHOLE_STREAM | {"path": f, "array": True})
        else:
            units += _jsonl_units(f, spec)
    return units + unread


CSV_CHUNK = 4 << 20  # bytes the row-start scan reads at a time
WHOLE_STREAM = {"start": 0, "end": None}  # a compressed manifest: one unit, read to its end


def _plan_csv(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    """Byte ranges cut at row starts. A quoted field may hold newlines, so where a row starts depends
    on every quote before it: a file longer than ``unit_bytes`` is scanned once here (quotes counted
    at C speed per chunk), and readers split rows by the same rule (``_csv_rows``), so they agree."""
    files, unread = _plan_files(spec, recipe)
    if _csv_header_mode(spec) is False and not _csv_names(spec):
        raise RecipeError(f"source {spec.name!r}: header: false needs columns.names (the column names, in order)")
    units = []
    for f in files:
        if compression_of(f):
            units.append(WHOLE_STREAM | {"path": f})
            continue
        total = storage.size(f)
        cuts = [0, *_csv_row_starts(f, spec.unit_bytes, total), total] if total else [0, 0]
        units += [{"path": f, "start": a, "end": b} for a, b in zip(cuts, cuts[1:], strict=False) if a < b or not total]
    return units + unread


def _csv_row_starts(path: str, step: int, total: int) -> list[int]:
    """For each multiple of ``step`` (> 0), the first row start at or after it: the byte after a
    newline outside quotes (an even count of ``"`` since the file began). Sorted, unique, < ``total``."""
    starts: list[int] = []
    target, pos, odd = step, 0, 0  # odd: quote parity at ``pos``
    with storage.open_read(path) as f:
        while target < total:
            chunk = f.read(CSV_CHUNK)
            if not chunk:
                break
            i = max(target - 1 - pos, 0)  # a newline at target-1 makes target a row start
            parity = odd ^ (chunk.count(b'"', 0, i) & 1)
            while i < len(chunk) and target < total:
                nl = chunk.find(b"\n", i)
                if nl < 0:
                    break
                parity ^= chunk.count(b'"', i, nl) & 1
                i = nl + 1
                if not parity and pos + i < total:
                    starts.append(pos + i)
                    target = (pos + i) // step * step + step  # the next cut past this row start
                    i = max(i, target - 1 - pos)
                    parity ^= chunk.count(b'"', nl + 1, i) & 1 if i > nl + 1 else 0
            odd ^= chunk.count(b'"') & 1
            pos += len(chunk)
    return starts


def _plan_parquet(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    """One unit per row group; a file whose metadata cannot be read is one unit (one reject), so a
    corrupt or truncated file never fails the plan of the whole run."""
    files, unread = _plan_files(spec, recipe)
    return _parquet_units(files) + unread


def _parquet_units(files: list[str]) -> list[dict[str, Any]]:
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
    return units


def _plan_tars(spec: SourceSpec, recipe: Recipe | None) -> list[dict[str, Any]]:
    files, unread = _plan_files(spec, recipe)
    return [{"path": f} for f in files] + unread


# ---------------------------------------------------------------- reading


def read_unit(unit: dict[str, Any], recipe: Recipe) -> Iterator[Record]:
    """Every input of the unit (its first ``unit["limit"]`` in a ``--limit`` run), as a sample or a
    reject; never raises for bad input."""
    if unit.get("limit") is None:
        yield from _read_unit(unit, recipe)
        return
    with contextlib.closing(_read_unit(unit, recipe)) as records:
        yield from itertools.islice(records, unit["limit"])


def _read_unit(unit: dict[str, Any], recipe: Recipe) -> Iterator[Record]:
    spec = next(s for s in recipe.sources if s.name == unit["source"])
    if "unread" in unit:
        for path, reason in unit["unread"]:
            yield _reject(spec.name, _relative(spec, path), reason, path)
        return
    if "error" in unit:
        yield _reject(spec.name, _relative(spec, unit["path"]), "unreadable parquet", unit["error"])
        return
    reader = {
        "local": _read_local,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
        "webdataset": _read_tar,
        "csv": _read_csv,
        "conversations": _read_conversations,
    }
    yield from reader[unit["type"]](unit, spec, recipe)


def _read_conversations(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """A conversations unit is read as the jsonl or parquet one it is shaped like (``_record_sample``
    hands its records to ``pipelines.conversations``), or as a JSON array."""
    if unit.get("array"):
        from pipelines.conversations import read_json_array

        yield from read_json_array(unit, spec, recipe)
    elif "row_group" in unit:
        yield from _read_parquet(unit, spec, recipe)
    else:
        yield from _read_jsonl(unit, spec, recipe)


def _quote(part: str) -> str:
    """``%``, ``#`` and ``@`` escaped, so a path never reads like a path plus a ``#key``/``@offset`` suffix."""
    return part.replace("%", "%25").replace("#", "%23").replace("@", "%40")


def _relative(spec: SourceSpec, path: str) -> str:
    """Where an input sits inside its source, so ids survive moving the corpus elsewhere."""
    root = _root(spec).rstrip("/")
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
    if spec.type == "conversations":
        from pipelines.conversations import conversation_sample

        return conversation_sample(record, spec, recipe, base, locator, policy)
    if not isinstance(record, dict):
        raise ValueError(f"record is not an object: {type(record).__name__}")
    if record.get("segments") is None:
        layout = str(spec.options.get("layout", "auto"))
        record = _interleaved(record, layout, base, policy) or _mapped(record, spec) or record
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


def _interleaved(record: dict[str, Any], layout: str, base: str, policy: UriPolicy) -> dict[str, Any] | None:
    """An mmc4 (``text_list`` + ``image_info``) or OBELICS (``texts`` + ``images``) document as a record
    with ordered ``segments``; None when the record is in neither layout (and ``layout`` is ``auto``)."""
    if layout == "mmc4" or (layout == "auto" and "text_list" in record):
        segments, consumed = _mmc4_segments(record, base, policy), ("text_list", "image_info")
    elif layout == "obelics" or (layout == "auto" and "texts" in record and "images" in record):
        segments, consumed = _obelics_segments(record), ("texts", "images")
    else:
        return None
    rest = {k: v for k, v in record.items() if k not in consumed}
    if "kind" not in rest and any(s["modality"] != "text" for s in segments):
        rest["kind"] = "interleaved_image_text"  # even one image and one sentence: it is a document
    return {**rest, "segments": segments}


def _mmc4_segments(record: dict[str, Any], base: str, policy: UriPolicy) -> list[dict[str, Any]]:
    """mmc4: each image goes *before* its matched sentence (``matched_text_index``), as OpenFlamingo
    interleaves mmc4; runs of sentences between images join with a space into one text segment."""
    texts, infos = record.get("text_list"), record.get("image_info") or []
    if not isinstance(texts, list) or not isinstance(infos, list):
        raise ValueError("bad interleaved document: mmc4 text_list and image_info must be lists")
    before: dict[int, list[dict[str, Any]]] = {}
    for j, info in enumerate(infos):
        if not isinstance(info, dict):
            raise ValueError(f"bad interleaved document: image_info[{j}] is not an object")
        i = info.get("matched_text_index")
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"bad interleaved document: image_info[{j}].matched_text_index is not an integer")
        if not 0 <= i < len(texts):
            raise ValueError(f"image index out of range: image_info[{j}].matched_text_index {i} of {len(texts)}")
        before.setdefault(i, []).append(_mmc4_image(info, j, base, policy))
    segments: list[dict[str, Any]] = []
    run: list[str] = []
    for i, sentence in enumerate(texts):
        if not isinstance(sentence, str):
            raise ValueError(f"bad interleaved document: text_list[{i}] is not a string")
        if i in before:
            if run:
                segments.append({"modality": "text", "text": " ".join(run)})
                run = []
            segments += before[i]
        if sentence.strip():  # a blank sentence carries nothing; its images keep their place
            run.append(sentence)
    if run:
        segments.append({"modality": "text", "text": " ".join(run)})
    return segments


def _mmc4_image(info: dict[str, Any], j: int, base: str, policy: UriPolicy) -> dict[str, Any]:
    """The image of one ``image_info`` entry: the file ``image_name`` when it exists where the record
    may read (mmc4's downloaded images beside the manifest), else ``raw_url`` (or ``url``), a uri.
    Only allowed paths are probed, so a record cannot learn what exists elsewhere."""
    name, url = info.get("image_name") or info.get("path"), info.get("raw_url") or info.get("url")
    if name is not None and not isinstance(name, str) or url is not None and not isinstance(url, str):
        raise ValueError(f"bad interleaved document: image_info[{j}] image_name/raw_url is not a string")
    if not name and not url:
        raise ValueError(f"bad interleaved document: image_info[{j}] has no image_name, raw_url or url")
    target = resolve_record_path(name, base) if name else ""
    local = bool(name) and (not url or (policy.allows(target) and storage.exists(target)))
    meta = {k: info[k] for k in ("matched_text_index", "matched_sim") if k in info}
    if name and url:  # where the other reference went
        meta["raw_url" if local else "image_name"] = url if local else name
    return {"modality": "image", "value": name if local else url, "meta": meta}


def _obelics_segments(record: dict[str, Any]) -> list[dict[str, Any]]:
    """OBELICS: parallel ``texts``/``images`` lists in document order, exactly one of each pair set."""
    texts, images = record.get("texts"), record.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise ValueError("bad interleaved document: obelics texts and images must be lists")
    if len(texts) != len(images):
        raise ValueError(f"interleaved lists differ in length: texts has {len(texts)}, images has {len(images)}")
    segments: list[dict[str, Any]] = []
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        if (text is None) == (image is None):
            both = "neither" if text is None else "both"
            raise ValueError(f"interleaved pair not exactly one: position {i} has {both}")
        if text is not None:
            if not isinstance(text, str):
                raise ValueError(f"bad interleaved document: texts[{i}] is not a string")
            if text.strip():  # a blank paragraph carries nothing
                segments.append({"modality": "text", "text": text})
            continue
        if isinstance(image, dict):  # a Hugging Face Image value: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, str | bytes | bytearray):
            raise ValueError(f"bad interleaved document: images[{i}] is not a url, path or bytes")
        segments.append({"modality": "image", "value": image})
    return segments


def _plain(value: Any) -> Any:
    """A metadata value as JSON can hold it: what JSON cannot (dates, decimals, bytes in a list) becomes text."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)[:1000]
    return value


WEB_SCHEMES = ("http://", "https://")


def _is_web(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(WEB_SCHEMES)


def _uri_hint(uri: str) -> str:
    """What to do about a refused URI, for the ledger's detail."""
    if _is_web(uri):
        return "never fetched at ingest: add its prefix to storage.allow_uris to keep it as a uri, or download it first"
    return "not under the source's root, its allow_paths or storage.allow_uris"


def _record_segment(seg: Any, recipe: Recipe, base: str, index: int, policy: UriPolicy) -> Segment:
    if not isinstance(seg, dict) or seg.get("modality") not in MODALITIES:
        raise ValueError(f"bad segment: #{index} has no known modality")
    modality = seg["modality"]
    value = seg.get("value", seg.get("text") if modality == "text" else seg.get("path", seg.get("bytes")))
    meta = {str(k): _plain(v) for k, v in seg["meta"].items()} if isinstance(seg.get("meta"), dict) else {}
    if modality == "text":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty text: segment #{index}")
        if len(value) * 4 > recipe.max_text_bytes and len(value.encode("utf-8")) > recipe.max_text_bytes:
            raise ValueError(f"text too large: segment #{index}: over {recipe.max_text_bytes} bytes")
        return Segment("text", text=value, meta=meta)
    uri = seg.get("uri") or (value if _is_web(value) else None)  # a web URL is never fetched here
    if uri:
        if not isinstance(uri, str):
            raise ValueError(f"bad segment: {modality} #{index} uri is not a string")
        target = resolve_record_path(uri, base)
        try:
            policy.check(target)
        except Confined as e:
            raise ValueError(f"uri not allowed: {uri[:200]} ({_uri_hint(uri)})") from e
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


@contextlib.contextmanager
def _open_manifest(path: str) -> Iterator[IO[bytes]]:
    """A manifest's bytes: the file, or the stream it decompresses to when its name says it is compressed."""
    compression = compression_of(path)
    with storage.open_read(path) as f:
        if compression is None:
            yield f
            return
        with decompressing(f, compression) as stream:
            yield stream


class _Broken(Exception):
    """A compressed manifest's stream broke while the line or row at ``offset`` was being read."""

    def __init__(self, offset: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.offset = offset
        self.error = error


def _broken_reject(spec: SourceSpec, path: str, e: _Broken) -> Record:
    """The reject standing for a compressed manifest from where its stream broke to its end."""
    compression = COMPRESSIONS[compression_of(path) or ""]
    detail = f"{type(e.error).__name__}: {e.error}"
    return _reject(spec.name, f"{_relative(spec, path)}@{e.offset}", f"corrupt {compression}", detail)


def _read_jsonl(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    path = unit["path"]
    try:
        yield from _jsonl_records(unit, spec, recipe)
    except _Broken as e:
        yield _broken_reject(spec, path, e)


def _jsonl_records(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """The lines whose first byte lies in the unit's range (``end`` None: to the end of the stream)."""
    path, start, end = unit["path"], unit["start"], unit["end"]
    base = posixpath.dirname(path)
    policy = _record_policy(spec, recipe, path)
    limits = recipe.limits
    broken = DECOMPRESS_ERRORS if compression_of(path) else ()
    with _open_manifest(path) as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous unit
        pos = f.tell() if start > 0 else 0  # a decompressing stream cannot tell
        while end is None or pos < end or (start == end == 0 and pos == 0):
            line_at, locator = pos, f"{_relative(spec, path)}@{pos}"
            try:
                line = f.readline(recipe.max_text_bytes + 1)
                if not line:
                    break
                pos += len(line)
                if len(line) > recipe.max_text_bytes and not line.endswith(b"\n"):
                    while line and not line.endswith(b"\n"):  # skip the rest without holding it
                        line = f.readline(1 << 20)
                        pos += len(line)
                    yield _reject(spec.name, locator, "line too long", f"over {recipe.max_text_bytes} bytes")
                    continue
            except broken as e:
                raise _Broken(line_at, e) from e
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


CSV_TEXT_COLUMNS = ("text", "caption", "TEXT", "name")  # ours, img2dataset, LAION, WebVid
CSV_URL_COLUMNS = ("url", "URL", "contentUrl")  # img2dataset, LAION, WebVid
CSV_RESERVED = ("segments", "kind", *MODALITIES)  # record keys a plain column must not play


def _csv_rows(
    f: Any, limit: int, pos: int, broken: tuple[type[BaseException], ...] = ()
) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, row)`` from ``f``'s position ``pos``; a row ends at a newline outside quotes (an even
    count of ``"`` since it began: the rule ``_csv_row_starts`` cuts by). A row over ``limit`` bytes
    comes back as None, read past without being held. A ``broken`` error while a row is read is
    raised as ``_Broken`` at the row's offset."""
    while True:
        start, parts, size, odd = pos, [], 0, 0
        while True:
            try:
                line = f.readline(1 << 20)
            except broken as e:
                raise _Broken(start, e) from e
            if not line:
                break
            pos += len(line)
            size += len(line)
            odd ^= line.count(b'"') & 1
            if size <= limit:
                parts.append(line)
            if line.endswith(b"\n") and not odd:
                break
        if not size:
            return
        yield start, b"".join(parts) if size <= limit else None


def _csv_fields(row: bytes, delimiter: str) -> list[str]:
    """One row's fields; raises ValueError for undecodable bytes or broken quoting."""
    try:
        text = row.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"text is not utf-8: {e}") from e
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as e:
        raise ValueError(f"malformed csv row: {e}") from e
    if len(rows) != 1:  # a stray quote in an unquoted field swallowed the lines after it
        raise ValueError(f"malformed csv row: unbalanced quote, the row spans {len(rows)} rows")
    return rows[0]


def _csv_mapping(header: list[str], spec: SourceSpec) -> tuple[str | None, list[tuple[str, str]]]:
    """The text column and the ``(column, modality)`` media columns: the source's ``columns`` option,
    else detected from the header (``text``/``caption``/``TEXT``/``name``; ``url``/``URL``/``contentUrl``
    as images, as videos when there is a ``videoid`` column; ``image``/``video``/``audio`` as named)."""
    if len(set(header)) != len(header) or not any(header):
        raise ValueError(f"bad csv header: empty or repeated column names: {header[:20]}")
    columns = spec.options.get("columns") or {}
    for key in ("text", "url"):
        if columns.get(key) and columns[key] not in header:
            raise ValueError(f"column not found: columns.{key} {columns[key]!r} is not in {header[:20]}")
    text = columns.get("text") or next((c for c in CSV_TEXT_COLUMNS if c in header), None)
    url = columns.get("url") or next((c for c in CSV_URL_COLUMNS if c in header), None)
    modality = columns.get("modality") or ("video" if "videoid" in header else "image")
    media = [(url, modality)] if url else []
    media += [(c, c) for c in ("image", "video", "audio") if c in header and c not in (url, text)]
    return text, media


def _csv_record(fields: list[str], header: list[str], text: str | None, media: list[tuple[str, str]]) -> dict[str, Any]:
    if len(fields) != len(header):
        raise ValueError(f"malformed csv row: {len(fields)} fields, the header has {len(header)}")
    return _columns_record(dict(zip(header, fields, strict=True)), text, media)


def _columns_record(values: dict[str, Any], text: str | None, media: list[tuple[str, str]]) -> dict[str, Any]:
    """A row of named columns (a CSV row, a LAION-style Parquet row) as a record with ``segments``:
    the media cells, then the caption; the other columns are metadata."""

    def cell(column: str) -> Any:
        v = values.get(column)
        return v if isinstance(v, str) and v.strip() or isinstance(v, bytes | bytearray) and v else None

    segments = [{"modality": m, "value": cell(c)} for c, m in media if cell(c) is not None]
    if media and not segments:
        raise ValueError(f"empty media cell: column {', '.join(c for c, _ in media)}")
    segments.sort(key=lambda seg: FOREIGN_ORDER.index(seg["modality"]))
    if text is not None and isinstance(cell(text), str):
        segments.append({"modality": "text", "text": values[text]})
    if not segments:
        raise ValueError(f"empty record: no text or media cell (columns {list(values)[:20]}; set the source's columns)")
    used = {text, *(c for c, _ in media)}
    record = {f"{k}_column" if k in CSV_RESERVED else k: v for k, v in values.items() if k not in used}
    return {**record, "segments": segments}


def _mapped(record: dict[str, Any], spec: SourceSpec) -> dict[str, Any] | None:
    """A JSONL/Parquet record of named columns (img2dataset ``url``/``caption``, LAION ``URL``/``TEXT``)
    mapped as a CSV row is; None when it has shorthand fields, or no URL column and no ``columns`` option."""
    if any(record.get(m) is not None for m in MODALITIES):
        return None
    if not spec.options.get("columns") and not any(c in record for c in CSV_URL_COLUMNS):
        return None
    values = {str(k): v for k, v in record.items()}
    text, media = _csv_mapping(list(values), spec)
    return _columns_record(values, text, media)


def _csv_header_mode(spec: SourceSpec) -> bool | str:
    """The source's ``header``: True, False or ``"auto"``."""
    mode = spec.options.get("header", "auto")
    return "auto" if mode == "auto" else bool(mode)


def _csv_names(spec: SourceSpec) -> list[str]:
    return [str(n) for n in (spec.options.get("columns") or {}).get("names") or []]


def _csv_header(
    first: tuple[int, bytes | None] | None, spec: SourceSpec, delimiter: str, limit: int
) -> tuple[list[str], bool]:
    """The column names, and whether the first row is a record rather than the header: ``header:
    false`` names them by ``columns.names``; ``true`` by the first row (``columns.names`` renames);
    ``auto`` as ``true``, except that with ``columns.names`` the first row is the header only when it
    holds exactly those names. Raises ValueError ``bad csv header: ...`` when the header cannot be read."""
    mode, names = _csv_header_mode(spec), _csv_names(spec)
    if mode is False:
        if not names:
            raise ValueError("bad csv header: header: false needs columns.names")
        return names, True
    if mode == "auto" and names:
        try:
            is_header = first is not None and first[1] is not None and _csv_fields(first[1], delimiter) == names
        except ValueError:
            is_header = False
        return names, not is_header
    if names:
        return names, False
    if first is None or first[1] is None:
        raise ValueError(f"bad csv header: over {limit} bytes")
    try:
        return _csv_fields(first[1], delimiter), False
    except ValueError as e:
        raise ValueError(f"bad csv header: {e}") from e


def _read_csv(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    try:
        yield from _csv_records(unit, spec, recipe)
    except _Broken as e:
        yield _broken_reject(spec, unit["path"], e)


def _csv_records(unit: dict[str, Any], spec: SourceSpec, recipe: Recipe) -> Iterator[Record]:
    """The rows whose first byte lies in the unit's range (``end`` None: to the end of the stream);
    the header (the file's first row, or ``columns.names``: ``_csv_header``) names the columns. When
    the header cannot be read (or lacks a configured column) every row is a reject with that reason:
    rows are still split, so each is counted."""
    path, start, end = unit["path"], unit["start"], unit["end"]
    base, where = posixpath.dirname(path), _relative(spec, path)
    compression = compression_of(path)
    plain = path[: -len(compression) - 1] if compression else path
    delimiter = str(spec.options.get("delimiter") or ("\t" if plain.lower().endswith(".tsv") else ","))
    limit = recipe.max_text_bytes
    csv.field_size_limit(max(csv.field_size_limit(), limit))  # a row is bounded by limit already
    policy = _record_policy(spec, recipe, path)
    broken = DECOMPRESS_ERRORS if compression else ()
    with _open_manifest(path) as f:
        rows = _csv_rows(f, limit, 0, broken)
        first = next(rows, None)
        if first is None:
            return  # an empty file holds no input
        header: list[str] = []
        text, media, refused = None, [], None  # refused: (reason, detail) of a header no row can be read by
        first_is_record = _csv_header_mode(spec) is False
        try:
            header, first_is_record = _csv_header(first, spec, delimiter, limit)
            text, media = _csv_mapping(header, spec)
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            refused = (reason, detail)
        if start > 0:
            f.seek(start)
            rows = _csv_rows(f, limit, start, broken)
        elif first_is_record:
            rows = itertools.chain([first], rows)
        for offset, row in rows:
            if end is not None and offset >= end:
                break
            locator = f"{where}@{offset}"
            if refused is not None and (row is None or row.strip()):
                yield _reject(spec.name, locator, *refused)
                continue
            if row is None:
                yield _reject(spec.name, locator, "csv row too long", f"over {limit} bytes")
                continue
            if not row.strip():
                continue
            yield _guarded(
                spec.name,
                locator,
                lambda r=row, loc=locator: _record_sample(
                    _csv_record(_csv_fields(r, delimiter), header, text, media), spec, recipe, base, loc, policy
                ),
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
