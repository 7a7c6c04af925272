"""``omni stats``: token totals of runs or shard sets, summed by data type, modality, language, source."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from shards import storage
from shards.manifest import SHARDSET_MANIFEST, ShardStats, read_shardset_manifest

DIMENSIONS = ("kind", "modality", "lang", "source")


def find_shardset_manifests(target: str) -> list[str]:
    """Shard-set manifest paths for a run dir, a shard dir or a manifest file."""
    if target.endswith(".json"):
        return [target]
    for candidate in (storage.join(target, "shards", SHARDSET_MANIFEST), storage.join(target, SHARDSET_MANIFEST)):
        if storage.exists(candidate):
            return [candidate]
    raise FileNotFoundError(f"no shard-set manifest under {target} (is the run finished?)")


def collect(targets: Iterable[str]) -> ShardStats:
    total = ShardStats()
    for target in targets:
        for path in find_shardset_manifests(target):
            for shard in read_shardset_manifest(path)["shards"]:
                total.merge(ShardStats.from_dict(shard))
    return total


def token_sums(stats: ShardStats, by: str) -> Counter:
    index = {"kind": 0, "source": 1, "lang": 2, "modality": 3}[by]
    sums: Counter = Counter()
    for key, n in stats.token_breakdown.items():
        sums[key[index]] += n
    return sums


def stats_report(stats: ShardStats) -> dict[str, Any]:
    return {
        "samples": stats.samples,
        "tokens": sum(stats.tokens.values()),
        **{f"tokens_by_{d}": dict(token_sums(stats, d).most_common()) for d in DIMENSIONS},
        "samples_by_kind": dict(stats.kinds.most_common()),
    }


def format_stats(report: dict[str, Any]) -> str:
    total = report["tokens"] or 1
    lines = [f"samples {report['samples']:,}   tokens {report['tokens']:,}"]
    for d in DIMENSIONS:
        lines.append(f"\nby {d}:")
        for name, n in report[f"tokens_by_{d}"].items():
            lines.append(f"  {name:<28} {n:>16,}  {100 * n / total:6.2f}%")
    return "\n".join(lines)


def stats_json(targets: list[str]) -> str:
    return json.dumps(stats_report(collect(targets)), indent=1)
