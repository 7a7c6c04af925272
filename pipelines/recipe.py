"""Pipeline recipes: YAML that names sources, operators with parameters, shard sizes and executor.

The config hash covers everything that changes what a run writes (sources, steps, shard sizes);
executor settings (Ray address, CPUs) and steps' ``resources`` (CPUs, GPUs, pool sizes) do not, so
the same run can resume on another cluster sized for it.

The recipe is a schema (``SCHEMA``): an unknown key, a wrong type or a size that is not > 0 is a
``RecipeError`` naming its path (``sources[1].unit_size``) before anything is created, so a typo can
never silently fall back to a default. Operator parameters are checked by ``pipelines.operator.check_steps``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

SOURCE_TYPES = ("local", "jsonl", "parquet", "webdataset", "csv", "conversations")
CONVERSATION_FORMATS = ("sharegpt", "llava", "openai")


class RecipeError(ValueError):
    """A recipe that cannot run; the message is meant for a one-line CLI error."""


@dataclass
class SourceSpec:
    name: str
    type: str
    path: str
    unit_size: int = 256  # samples per work unit (local folders, parquet row batches)
    unit_bytes: int = 64 << 20  # bytes per work unit (jsonl and csv byte ranges)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepSpec:
    op: str
    params: dict[str, Any] = field(default_factory=dict)
    # overrides of the operator's declared Resources: cpus, gpus, memory (bytes), batch_size, concurrency
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class Limits:
    """Bounds on every decode of untrusted input; each one that trips is a counted reject reason."""

    max_text_bytes: int = 16 << 20  # a text file or JSONL line longer than this is rejected
    max_json_depth: int = 64  # nesting of any JSON we parse (sidecars, JSONL lines, tar .json members)
    max_json_bytes: int = 16 << 20  # a JSON sidecar or tar .json member
    max_members_per_key: int = 1024  # tar members that form one sample
    max_key_bytes: int = 1 << 30  # bytes of one sample's members after decompression
    max_row_group_rows: int = 1_000_000  # rows of one Parquet row group (a unit is read whole)


@dataclass
class Recipe:
    name: str
    output: str
    sources: list[SourceSpec]
    steps: list[StepSpec]
    imports: list[str] = field(default_factory=list)  # modules that register extra operators
    max_shard_samples: int = 10_000
    max_shard_bytes: int = 1 << 30
    max_inline_bytes: int = 64 << 20  # media larger than this stay as URIs
    limits: Limits = field(default_factory=Limits)
    # URI prefixes a record may name (besides its own source's root); checked at ingest and by the trainer
    allow_uris: list[str] = field(default_factory=list)
    executor: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."
    # ``omni run --limit N``: a scratch run of the first N inputs of each source (part of the config
    # hash, so a limited run and a full one never share a run directory)
    sample_limit: int | None = None

    @property
    def max_text_bytes(self) -> int:
        return self.limits.max_text_bytes

    def config_hash(self) -> str:
        doc = {
            "sources": [vars(s) for s in self.sources],
            "steps": [{"op": s.op, "params": s.params} for s in self.steps],
            "imports": self.imports,
            "shards": [self.max_shard_samples, self.max_shard_bytes, self.max_inline_bytes],
            "limits": vars(self.limits),
            "allow_uris": self.allow_uris,
        }
        if self.sample_limit is not None:
            doc["sample_limit"] = self.sample_limit
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


_SIZE = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*([kmgtp]?)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: Any) -> int:
    """``512MB``, ``1GiB``, ``64k``, ``4096`` → bytes (binary units); anything else is a ``RecipeError``."""
    if isinstance(value, bool):
        raise RecipeError(f"{value!r} is not a size (like 64MB, 1GiB or 4096)")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise RecipeError(f"{_show(value)} is not a size (like 64MB, 1GiB or 4096)")
    return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])


# The recipe schema: one table, one checker. A kind is a scalar kind ("text", "count", "size", "bool",
# "mapping"), a section (another key of SCHEMA), "list:<kind>", or a tuple of allowed values.
Kind = str | tuple[str, ...]
EXECUTOR_TYPES = ("local", "ray")
SCHEMA: dict[str, dict[str, Kind]] = {
    "recipe": {
        "name": "text",
        "output": "text",
        "sources": "list:source",
        "pipeline": "list:step",
        "imports": "list:text",
        "shards": "shards",
        "limits": "limits",
        "executor": "executor",
        "storage": "storage",
        "dedup": "mapping",  # read by `omni dedup`, which checks it
    },
    "source": {
        "name": "text",
        "type": SOURCE_TYPES,
        "path": "text",
        "unit_size": "count",
        "unit_bytes": "size",
        "max_member_bytes": "size",
        "allow_paths": "list:text",
        "columns": "csv_columns",  # csv: which columns hold the caption and the media URL or path
        "delimiter": (",", "\t", ";", "|"),  # csv: default "\t" for .tsv, else ","
        "header": ("auto", True, False),  # csv: is the first row the header (false: columns.names names them)
        "layout": ("auto", "mmc4", "obelics"),  # jsonl/parquet records: interleaved document layout
        "format": CONVERSATION_FORMATS,  # conversations: the record layout (required there)
        "media_root": "text",  # conversations: the folder relative media paths resolve in (LLaVA's image_folder)
    },
    "csv_columns": {"text": "text", "url": "text", "modality": ("image", "audio", "video"), "names": "list:text"},
    "step": {"op": "text", "params": "mapping", "resources": "step_resources"},
    # per actor (or task): what Ray reserves, rows per operator call, actor-pool size (N or [min, max])
    "step_resources": {
        "cpus": "amount",
        "gpus": "amount",
        "memory": "size",
        "batch_size": "count",
        "concurrency": "pool",
    },
    "shards": {"max_samples": "count", "max_bytes": "size", "max_inline_bytes": "size"},
    "limits": {f.name: "size" if f.name.endswith("bytes") else "count" for f in fields(Limits)},
    "executor": {
        "type": EXECUTOR_TYPES,
        "num_cpus": "count",
        "num_gpus": "amount",  # a local Ray's GPUs; logical ones schedule GPU steps on a CPU machine
        "object_store_memory": "size",
        "address": "text",
        "log_to_driver": "bool",
        "dashboard": "bool",  # a local Ray's dashboard on 127.0.0.1 (as --dashboard)
        "dashboard_port": "count",
        "ray_progress_bars": "bool",
        "max_block_bytes": "size",
    },
    "storage": {  # s3fs.S3FileSystem arguments, plus our allow-list
        "endpoint_url": "text",
        "key": "text",
        "secret": "text",
        "token": "text",
        "anon": "bool",
        "client_kwargs": "mapping",
        "config_kwargs": "mapping",
        "allow_uris": "list:text",
    },
}
REQUIRED: dict[str, tuple[str, ...]] = {"recipe": ("sources",), "source": ("type", "path"), "step": ("op",)}
SHORTHAND = {"step": "op"}  # `- validate` in a pipeline means `- {op: validate}`
HINTS = {  # unknown keys a user is likely to try, with where they go instead
    "region_name": "put it under client_kwargs: {region_name: ...}",
    "num_gpus": "a step's GPUs go in its resources: {gpus: N}",
    "num_cpus": "a step's CPUs go in its resources: {cpus: N}",
}
# source keys kept in ``SourceSpec.options``
SOURCE_OPTIONS = ("max_member_bytes", "allow_paths", "columns", "delimiter", "header", "layout", "format", "media_root")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def suggest(word: Any, known: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, else the list of known names."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (one of {', '.join(map(str, known))})"


def _scalar(value: Any, kind: str, path: str) -> Any:
    """Check one scalar against its kind; returns the normalised value (sizes as ints)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "text" and (isinstance(value, str) or number):
        return str(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "mapping" and isinstance(value, dict):
        return value
    if kind == "amount" and number:
        if value < 0:
            raise RecipeError(f"{path}: must be >= 0, got {_show(value)}")
        return value
    if kind == "pool":
        return _pool(value, path)
    if kind == "count" and number and value == int(value):
        if value <= 0:
            raise RecipeError(f"{path}: must be > 0, got {_show(value)}")
        return int(value)
    if kind == "size" and (number or isinstance(value, str)):
        try:
            size = parse_size(value)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
        if size <= 0:
            raise RecipeError(f"{path}: must be > 0, got {_show(value)}")
        return size
    expected = {
        "text": "a string",
        "bool": "true or false",
        "mapping": "a mapping",
        "count": "a whole number > 0",
        "size": "a size > 0 (like 64MB or 4096)",
        "amount": "a number >= 0",
    }[kind]
    raise RecipeError(f"{path}: expected {expected}, got {_show(value)}")


def _pool(value: Any, path: str) -> int | tuple[int, int]:
    """An actor-pool size: ``N`` (fixed) or ``[min, max]`` (autoscaling), 1 <= min <= max."""
    sizes = value if isinstance(value, list) else [value]
    whole = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
    if not whole or len(sizes) not in (1, 2) or (len(sizes) == 2 and sizes[0] > sizes[1]):
        raise RecipeError(f"{path}: expected a pool size N >= 1 or [min, max] with 1 <= min <= max, got {_show(value)}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _check(value: Any, kind: Kind, path: str) -> Any:
    """Check ``value`` against ``kind`` (see SCHEMA); errors name the path, e.g. ``sources[1].unit_size``."""
    if isinstance(kind, tuple):
        if value not in kind:
            noun = path.rsplit(".", 1)[-1]
            raise RecipeError(f"{path}: unknown {noun} {_show(value)}{suggest(value, kind)}")
        return value
    if kind.startswith("list:"):
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_show(value)}")
        return [_check(v, kind[5:], f"{path}[{i}]") for i, v in enumerate(value)]
    if kind not in SCHEMA:
        return _scalar(value, kind, path)
    if kind in SHORTHAND and isinstance(value, str):
        value = {SHORTHAND[kind]: value}
    if not isinstance(value, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {_show(value)}")
    known = SCHEMA[kind]
    for key in value:
        if key not in known:
            where = f"{path}: unknown key {key!r}" if path else f"unknown key {key!r} in recipe"
            hint = f" ({HINTS[key]})" if key in HINTS else suggest(key, known)
            raise RecipeError(where + hint)
    for key in REQUIRED.get(kind, ()):
        if value.get(key) is None:
            raise RecipeError(f"{path}: missing {key!r}" if path else f"recipe has no {key!r}")
    # null means "not given": the default applies (a key whose value is commented out)
    return {k: _check(v, known[k], _at(path, k)) for k, v in value.items() if v is not None}


def _resolve(path: str, base_dir: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def recipe_from_dict(doc: dict[str, Any], base_dir: str = ".", output: str | None = None) -> Recipe:
    """Check ``doc`` against SCHEMA (unknown keys, types, ranges) and build the Recipe; nothing is touched on disk."""
    if not isinstance(doc, dict):
        raise RecipeError("recipe must be a YAML mapping")
    d = _check(doc, "recipe", "")
    if not (output or d.get("output")):
        raise RecipeError("recipe has no 'output'")
    sources = []
    for i, s in enumerate(d["sources"]):
        options = {k: s[k] for k in SOURCE_OPTIONS if k in s}
        if "allow_paths" in options:
            options["allow_paths"] = [_resolve(p, base_dir) for p in options["allow_paths"]]
        if "media_root" in options:
            options["media_root"] = _resolve(options["media_root"], base_dir)
        if ("format" in s) != (s["type"] == "conversations"):
            where = f"sources[{i}]"
            raise RecipeError(
                f"{where}.format: a conversations source needs format: {' | '.join(CONVERSATION_FORMATS)}"
                if s["type"] == "conversations"
                else f"{where}.format: only a conversations source has a format"
            )
        if "media_root" in s and s["type"] != "conversations":
            raise RecipeError(f"sources[{i}].media_root: only a conversations source has a media_root")
        sources.append(
            SourceSpec(
                name=s.get("name", f"{s['type']}{i}"),
                type=s["type"],
                path=_resolve(s["path"], base_dir),
                unit_size=s.get("unit_size", 256),
                unit_bytes=s.get("unit_bytes", 64 << 20),
                options=options,
            )
        )
    if not sources:
        raise RecipeError("recipe lists no sources")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"source names must be unique: {names}")
    shards = d.get("shards", {})
    storage = d.get("storage", {})
    return Recipe(
        name=d.get("name", "run"),
        output=_resolve(output or d["output"], base_dir),
        sources=sources,
        steps=[
            StepSpec(op=st["op"], params=dict(st.get("params", {})), resources=dict(st.get("resources", {})))
            for st in d.get("pipeline", [])
        ],
        imports=d.get("imports", []),
        max_shard_samples=shards.get("max_samples", 10_000),
        max_shard_bytes=shards.get("max_bytes", 1 << 30),
        max_inline_bytes=shards.get("max_inline_bytes", 64 << 20),
        limits=Limits(**d.get("limits", {})),
        allow_uris=storage.get("allow_uris", []),
        executor=d.get("executor", {}),
        storage={k: v for k, v in storage.items() if k != "allow_uris"},
        base_dir=base_dir,
    )


def apply_overrides(doc: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """``--set key.path=value`` assignments applied to a recipe document before it is checked, so a
    typo or a wrong type gets the schema's message. A pipeline step written as a bare name
    (``- validate``) is spelled out first (``{op: validate}``), so ``pipeline.0.params.x=1`` reaches it."""
    from pipelines.overrides import OverrideError, apply_override

    if not overrides:
        return doc
    if not isinstance(doc, dict):
        raise RecipeError("recipe must be a YAML mapping")
    if isinstance(doc.get("pipeline"), list):
        doc["pipeline"] = [{"op": s} if isinstance(s, str) else s for s in doc["pipeline"]]
    for assignment in overrides:
        try:
            apply_override(doc, assignment)
        except OverrideError as e:
            raise RecipeError(f"--set: {e}") from None
    return doc


def load_recipe(path: str, output: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (``--set``) and check a recipe file; nothing is touched on disk."""
    if not os.path.isfile(path):
        raise RecipeError(f"no such recipe file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    doc = apply_overrides(doc, overrides)
    return recipe_from_dict(doc, base_dir=os.path.dirname(os.path.abspath(path)), output=output)
