"""``omni inspect``: what a shard, a shard directory or a run holds, in counts and sample previews."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from shards import storage
from shards.manifest import SHARDSET_MANIFEST, ShardStats, read_shardset_manifest
from shards.reader import iter_samples
from shards.schema import loads_meta


def _shard_paths(target: str) -> tuple[list[str], dict[str, Any] | None]:
    """Shards under a run dir, a shard dir (with or without manifest) or a single tar."""
    if target.endswith(".tar"):
        return [target], None
    for directory in (storage.join(target, "shards"), target):
        if storage.exists(storage.join(directory, SHARDSET_MANIFEST)):
            manifest = read_shardset_manifest(directory)
            return [storage.join(directory, s["path"]) for s in manifest["shards"]], manifest
    for directory in (storage.join(target, "shards"), target):
        tars = storage.listdir(directory, ".tar")
        if tars:
            return tars, None
    raise FileNotFoundError(f"no shards found at {target}")


def describe_segment(seg: dict[str, Any], width: int = 60) -> str:
    meta = loads_meta(seg.get("meta"))
    if seg["modality"] == "text":
        text = " ".join((seg["text"] or "").split())
        return f"text  {text[:width]!r}{'…' if len(text) > width else ''}"
    where = f"{len(seg['bytes'])} B" if seg.get("bytes") is not None else f"uri {seg.get('uri')}"
    keys = ("width", "height", "duration", "sample_rate", "video_codec", "audio_codec")
    facts = ", ".join(f"{k}={meta[k]}" for k in keys if k in meta)
    return f"{seg['modality']:<5} {where}" + (f" ({facts})" if facts else "")


def iter_preview(paths: list[str], limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    for p in paths:
        for sample in iter_samples(p):
            if n >= limit:
                return
            n += 1
            yield sample


def inspect_target(target: str, limit: int = 5) -> str:
    paths, manifest = _shard_paths(target)
    lines = [f"{target}: {len(paths)} shard(s)"]
    if manifest is not None:
        totals = manifest["totals"]
    else:
        stats = ShardStats()
        for p in paths:
            for sample in iter_samples(p):
                stats.add(sample)
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
        run = json.loads(storage.read_bytes(run_manifest))
        if run.get("kind") == "omnicorpus.run":
            lines.append(f"run:     ingested {run['ingested']}, written {run['written']}, rejected {run['rejected']}")
            for reason, n in run["rejects_by_reason"].items():
                lines.append(f"  rejected {n:>5} × {reason}")
    for sample in iter_preview(paths, limit):
        lines.append(f"- {sample['id']}  {sample['kind']}  [{sample['source']}]")
        for seg in sample["segments"]:
            lines.append(f"    {describe_segment(seg)}")
    return "\n".join(lines)
