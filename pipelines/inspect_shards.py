"""``omni inspect``: what a shard, a shard directory or a run holds, in counts and sample previews.

It also checks what it reads: every shard's size against the manifest (one listing), the sha256
of each shard the preview happens to read whole, and every record of shards without a manifest
(read whole for their counts anyway). Damage is listed as ``damaged: ...`` lines, never raised.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.manifest import SHARDSET_MANIFEST, ShardStats, read_shardset_manifest
from shards.schema import loads_meta
from shards.verify import ShardScan, size_damage


@dataclass
class Inspection:
    """What ``omni inspect`` prints, and the damage it found (exit status 1 when any)."""

    text: str
    damaged: list[str] = field(default_factory=list)


@dataclass
class _Shard:
    path: str
    entry: dict[str, Any] | None = None  # its manifest entry, when there is a manifest


def _shard_paths(target: str, damaged: list[str] | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """Shards under a run dir, a shard dir (with or without manifest) or a single tar, and the
    manifest when there is one. An unreadable manifest goes into ``damaged`` (the tars are listed)."""
    if target.endswith(".tar"):
        return [target], None
    for directory in (storage.join(target, "shards"), target):
        if storage.exists(storage.join(directory, SHARDSET_MANIFEST)):
            try:
                manifest = read_shardset_manifest(directory)
                paths = [storage.join(directory, s["path"]) for s in manifest["shards"]]
            except (ValueError, KeyError, TypeError) as e:
                if damaged is None:
                    raise
                damaged.append(f"{storage.join(directory, SHARDSET_MANIFEST)}: unreadable ({type(e).__name__}: {e})")
                break  # count the tars themselves
            return paths, manifest
    for directory in (storage.join(target, "shards"), target):
        tars = storage.listdir(directory, ".tar")
        if tars:
            return tars, None
    raise FileNotFoundError(f"no shards found at {target}")


def _check_sizes(shards: list[_Shard], damaged: list[str]) -> set[str]:
    """Size of every manifest-listed shard (one listing per directory); returns the damaged paths."""
    listings: dict[str, dict[str, int]] = {}
    bad = set()
    for s in shards:
        if s.entry is None:
            continue
        directory, name = s.path.rsplit("/", 1)
        if directory not in listings:
            try:
                listings[directory] = storage.sizes(directory)
            except OSError as e:
                damaged.append(f"{directory}: unreadable ({e})")
                listings[directory] = {}
        why = size_damage(listings[directory].get(name), s.entry)
        if why is not None:
            damaged.append(f"{s.path}: {why}")
            bad.add(s.path)
    return bad


def describe_segment(seg: dict[str, Any], width: int = 60) -> str:
    meta = loads_meta(seg.get("meta"))
    if seg["modality"] == "text":
        text = " ".join((seg["text"] or "").split())
        return f"text  {text[:width]!r}{'…' if len(text) > width else ''}"
    where = f"{len(seg['bytes'])} B" if seg.get("bytes") is not None else f"uri {seg.get('uri')}"
    keys = ("width", "height", "duration", "sample_rate", "video_codec", "audio_codec")
    facts = ", ".join(f"{k}={meta[k]}" for k in keys if k in meta)
    return f"{seg['modality']:<5} {where}" + (f" ({facts})" if facts else "")


def iter_preview(
    shards: list[_Shard], limit: int, damaged: list[str], skip: Collection[str] = ()
) -> Iterator[dict[str, Any]]:
    """The first ``limit`` samples; a shard read to its end has its sha256 checked on the way."""
    n = 0
    for s in shards:
        if n >= limit:
            return
        if s.path in skip:
            continue
        scan = ShardScan(s.path, s.entry)
        for rec in scan.records():
            if n >= limit:
                break
            if rec.sample is not None:
                n += 1
                yield rec.sample
        if scan.damage is not None:
            damaged.append(f"{s.path}: {scan.damage}")


def examine(target: str, limit: int = 5) -> Inspection:
    """Counts, kinds, modalities, a run's rejects, a preview of ``limit`` samples, and damage."""
    damaged: list[str] = []
    paths, manifest = _shard_paths(target, damaged)
    if manifest is not None:
        shards = [_Shard(p, e) for p, e in zip(paths, manifest["shards"], strict=True)]
    else:
        shards = [_Shard(p) for p in paths]
    bad = _check_sizes(shards, damaged)
    lines = [f"{target}: {len(shards)} shard(s)"]
    if manifest is not None:
        totals = manifest["totals"]
    else:
        stats = ShardStats()
        for s in shards:
            scan = ShardScan(s.path)
            for rec in scan.records():
                if rec.sample is not None:
                    stats.add(rec.sample)
            if scan.damage is not None:
                more = f" (and {scan.rejects - 1} more)" if scan.rejects > 1 else ""
                damaged.append(f"{s.path}: {scan.damage}{more}")
                bad.add(s.path)
        totals = stats.as_dict()
    lines.append(f"samples: {totals['samples']}")
    lines.append("kinds:   " + ", ".join(f"{k}={v}" for k, v in totals["kinds"].items()))
    lines.append(
        "modalities: " + ", ".join(f"{m}={v['segments']} segs/{v['bytes']} B" for m, v in totals["modalities"].items())
    )
    if totals.get("tokens"):
        lines.append("tokens:  " + json.dumps(totals["tokens"]))
    run_manifest = storage.join(target, "manifest.json")
    if not target.endswith(".tar") and storage.exists(run_manifest):
        try:
            run = json.loads(storage.read_bytes(run_manifest))
        except ValueError as e:
            damaged.append(f"{run_manifest}: unreadable ({e})")
            run = {}
        if run.get("kind") == "omnicorpus.run":
            lines.append(f"run:     ingested {run['ingested']}, written {run['written']}, rejected {run['rejected']}")
            for reason, n in run["rejects_by_reason"].items():
                lines.append(f"  rejected {n:>5} × {reason}")
    preview_damage: list[str] = []  # without a manifest every shard was read whole above already
    for sample in iter_preview(shards, limit, preview_damage, skip=bad):
        lines.append(f"- {sample['id']}  {sample['kind']}  [{sample['source']}]")
        for seg in sample["segments"]:
            lines.append(f"    {describe_segment(seg)}")
    if manifest is not None:
        damaged.extend(preview_damage)
    lines.extend(f"damaged: {d}" for d in damaged)
    if damaged:
        lines.append(f"{len(damaged)} damaged; `omni run` on the run redoes damaged units, `omni audit` lists all")
    return Inspection("\n".join(lines), damaged)


def inspect_target(target: str, limit: int = 5) -> str:
    """``examine``'s text (damage included), for callers that only print it."""
    return examine(target, limit).text
