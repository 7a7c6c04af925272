"""Shard and shard-set manifests: what each tar holds, so a mixture can be planned and audited.

Per shard: path, sha256, bytes, samples, samples per kind, per modality the segment count and
payload bytes, and the model tokens per modality (from the ``tokens`` that the ``count_tokens``
step writes into each segment's meta) with a breakdown by kind, source and language; samples per
(kind, category) where the sample meta names a ``category`` (the image SFT categories of Table 5).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.schema import loads_meta

SHARDSET_MANIFEST = "manifest.json"


@dataclass
class ShardStats:
    """Counts for one shard; ``add`` is called once per sample as it is written."""

    samples: int = 0
    kinds: Counter = field(default_factory=Counter)
    segments: Counter = field(default_factory=Counter)
    payload_bytes: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    # (kind, source, lang, modality) -> tokens, for sums along any of those
    token_breakdown: Counter = field(default_factory=Counter)
    # (kind, category) -> samples, from the sample meta's ``category`` (the SFT categories of Table 5)
    categories: Counter = field(default_factory=Counter)

    def add(self, row: Mapping[str, Any]) -> None:
        self.samples += 1
        self.kinds[row["kind"]] += 1
        meta = loads_meta(row.get("meta"))
        lang = row.get("lang") or meta.get("lang") or "und"
        if meta.get("category"):
            self.categories[(row["kind"], str(meta["category"]))] += 1
        for seg in row["segments"]:
            m = seg["modality"]
            self.segments[m] += 1
            if seg.get("bytes") is not None:
                self.payload_bytes[m] += len(seg["bytes"])
            elif seg.get("text") is not None:
                self.payload_bytes[m] += len(seg["text"].encode())
            n = loads_meta(seg.get("meta")).get("tokens")
            if n is not None:
                self.tokens[m] += n
                self.token_breakdown[(row["kind"], row["source"], lang, m)] += n

    def merge(self, other: ShardStats) -> None:
        self.samples += other.samples
        self.kinds.update(other.kinds)
        self.segments.update(other.segments)
        self.payload_bytes.update(other.payload_bytes)
        self.tokens.update(other.tokens)
        self.token_breakdown.update(other.token_breakdown)
        self.categories.update(other.categories)

    def as_dict(self) -> dict[str, Any]:
        categories = (
            {"categories": [{"kind": k, "category": c, "samples": n} for (k, c), n in sorted(self.categories.items())]}
            if self.categories
            else {}
        )
        return {
            "samples": self.samples,
            "kinds": dict(sorted(self.kinds.items())),
            "modalities": {
                m: {"segments": self.segments[m], "bytes": self.payload_bytes[m]} for m in sorted(self.segments)
            },
            "tokens": dict(sorted(self.tokens.items())),
            "token_breakdown": [
                {"kind": k, "source": s, "lang": lang, "modality": m, "tokens": n}
                for (k, s, lang, m), n in sorted(self.token_breakdown.items())
            ],
            **categories,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardStats:
        mods = d.get("modalities", {})
        return cls(
            samples=d["samples"],
            kinds=Counter(d.get("kinds", {})),
            segments=Counter({m: v["segments"] for m, v in mods.items()}),
            payload_bytes=Counter({m: v["bytes"] for m, v in mods.items()}),
            tokens=Counter(d.get("tokens", {})),
            token_breakdown=Counter(
                {(r["kind"], r["source"], r["lang"], r["modality"]): r["tokens"] for r in d.get("token_breakdown", [])}
            ),
            categories=Counter({(r["kind"], r["category"]): r["samples"] for r in d.get("categories", [])}),
        )


@dataclass
class ShardInfo:
    path: str
    sha256: str
    bytes: int
    stats: ShardStats

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, **self.stats.as_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(path=d["path"], sha256=d["sha256"], bytes=d["bytes"], stats=ShardStats.from_dict(d))


def summarize(shards: Iterable[ShardInfo]) -> dict[str, Any]:
    total = ShardStats()
    n = size = 0
    for s in shards:
        total.merge(s.stats)
        n += 1
        size += s.bytes
    return {"shards": n, "bytes": size, **total.as_dict()}


def write_shardset_manifest(directory: str, shards: list[ShardInfo], extra: Mapping[str, Any] | None = None) -> str:
    """One manifest for a directory of shards (paths relative to it), with totals."""
    ordered = sorted(shards, key=lambda s: s.path)
    doc = {
        "kind": "omnicorpus.shardset",
        **(extra or {}),
        "totals": summarize(ordered),
        "shards": [s.as_dict() for s in ordered],
    }
    path = storage.join(directory, SHARDSET_MANIFEST)
    storage.write_bytes(path, json.dumps(doc, indent=1, ensure_ascii=False).encode())
    return path


def read_shardset_manifest(path: str) -> dict[str, Any]:
    """Read a shard-set manifest given the file or its directory."""
    if not path.endswith(".json"):
        path = storage.join(path, SHARDSET_MANIFEST)
    return json.loads(storage.read_bytes(path))


def shard_urls(manifest_path: str) -> list[str]:
    """Absolute shard paths listed by a shard-set manifest (for the trainer and readers)."""
    directory = manifest_path.rsplit("/", 1)[0] if manifest_path.endswith(".json") else manifest_path
    return [storage.join(directory, s["path"]) for s in read_shardset_manifest(manifest_path)["shards"]]
