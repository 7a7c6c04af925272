"""Pipeline recipes: YAML that names sources, operators with parameters, shard sizes and executor.

The config hash covers everything that changes what a run writes (sources, steps, shard sizes);
executor settings (Ray address, CPUs) do not, so the same run can resume on another cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

SOURCE_TYPES = ("local", "jsonl", "parquet", "webdataset")


class RecipeError(ValueError):
    """A recipe that cannot run; the message is meant for a one-line CLI error."""


@dataclass
class SourceSpec:
    name: str
    type: str
    path: str
    unit_size: int = 256  # samples per work unit (local folders, parquet row batches)
    unit_bytes: int = 64 << 20  # bytes per work unit (jsonl byte ranges)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepSpec:
    op: str
    params: dict[str, Any] = field(default_factory=dict)


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

    @property
    def max_text_bytes(self) -> int:
        return self.limits.max_text_bytes

    def config_hash(self) -> str:
        doc = {
            "sources": [vars(s) for s in self.sources],
            "steps": [vars(s) for s in self.steps],
            "imports": self.imports,
            "shards": [self.max_shard_samples, self.max_shard_bytes, self.max_inline_bytes],
            "limits": vars(self.limits),
            "allow_uris": self.allow_uris,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def parse_size(value: Any) -> int:
    """``512MB``, ``1GiB``, ``4096`` → bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace("IB", "B")
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def _resolve(path: str, base_dir: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def recipe_from_dict(doc: dict[str, Any], base_dir: str = ".", output: str | None = None) -> Recipe:
    if not isinstance(doc, dict):
        raise RecipeError("recipe must be a YAML mapping")
    for key in ("sources", "output"):
        if key not in doc and not (key == "output" and output):
            raise RecipeError(f"recipe has no '{key}'")
    sources = []
    for i, s in enumerate(doc["sources"] or []):
        if not isinstance(s, dict) or "path" not in s or "type" not in s:
            raise RecipeError(f"source #{i} needs 'type' and 'path'")
        if s["type"] not in SOURCE_TYPES:
            raise RecipeError(f"source #{i}: unknown type {s['type']!r} (one of {', '.join(SOURCE_TYPES)})")
        known = {"name", "type", "path", "unit_size", "unit_bytes"}
        sources.append(
            SourceSpec(
                name=str(s.get("name", f"{s['type']}{i}")),
                type=s["type"],
                path=_resolve(str(s["path"]), base_dir),
                unit_size=int(s.get("unit_size", 256)),
                unit_bytes=parse_size(s.get("unit_bytes", 64 << 20)),
                options={k: v for k, v in s.items() if k not in known},
            )
        )
    if not sources:
        raise RecipeError("recipe lists no sources")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"source names must be unique: {names}")
    steps = []
    for i, st in enumerate(doc.get("pipeline") or []):
        if isinstance(st, str):
            st = {"op": st}
        if not isinstance(st, dict) or "op" not in st:
            raise RecipeError(f"pipeline step #{i} needs an 'op'")
        steps.append(StepSpec(op=st["op"], params=dict(st.get("params") or {})))
    shards = doc.get("shards") or {}
    return Recipe(
        name=str(doc.get("name", "run")),
        output=_resolve(output or str(doc["output"]), base_dir),
        sources=sources,
        steps=steps,
        imports=[str(m) for m in doc.get("imports") or []],
        max_shard_samples=int(shards.get("max_samples", 10_000)),
        max_shard_bytes=parse_size(shards.get("max_bytes", 1 << 30)),
        max_inline_bytes=parse_size(shards.get("max_inline_bytes", 64 << 20)),
        limits=Limits(
            **{k: parse_size(v) if k.endswith("bytes") else int(v) for k, v in (doc.get("limits") or {}).items()}
        ),
        allow_uris=[str(u) for u in (doc.get("storage") or {}).get("allow_uris") or []],
        executor=dict(doc.get("executor") or {}),
        storage={k: v for k, v in (doc.get("storage") or {}).items() if k != "allow_uris"},
        base_dir=base_dir,
    )


def load_recipe(path: str, output: str | None = None) -> Recipe:
    if not os.path.isfile(path):
        raise RecipeError(f"no such recipe file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    return recipe_from_dict(doc, base_dir=os.path.dirname(os.path.abspath(path)), output=output)
