"""The shards a dedup job reads: a finished run's committed shards, or any shard set.

Shards are numbered in path order and a sample's node id is ``shard_index << 32 | row``: a dense,
sortable integer that says where the sample lives, so later phases need no id lookups and "keep
the smallest node" means "keep the first copy in shard order".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from pipelines.rundir import RunDir
from shards import storage
from shards.manifest import SHARDSET_MANIFEST, read_shardset_manifest
from shards.verify import size_damage

ROW_BITS = 32


@dataclass(frozen=True)
class ShardInput:
    index: int
    path: str  # full path (or URL) of the tar
    name: str  # path relative to its shard directory
    sha256: str
    samples: int
    unit: str | None = None  # the run's work unit that owns the shard


@dataclass(frozen=True)
class Inputs:
    kind: str  # "run" | "shardset"
    root: str  # the run directory or the shard directory
    shards: tuple[ShardInput, ...]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "root": self.root, "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict) -> Inputs:
        return cls(d["kind"], d["root"], tuple(ShardInput(**s) for s in d["shards"]))


class NotReady(RuntimeError):
    """The target is not a finished run or a shard set."""


def node_of(shard_index: int, row: int) -> int:
    return (shard_index << ROW_BITS) | row


def split_node(node: int) -> tuple[int, int]:
    return node >> ROW_BITS, node & ((1 << ROW_BITS) - 1)


def _refuse_damaged(target: str, directory: str, entries: list[dict]) -> None:
    """Dedup reads every shard in Ray tasks; a truncated or missing one would fail the job midway,
    so shard sizes are checked against the manifest first (one listing) and damage is refused."""
    on_disk = storage.sizes(directory)

    def size(name: str) -> int | None:
        if "/" not in name:
            return on_disk.get(name)
        path = storage.join(directory, name)  # a nested shard: not in the listing
        return storage.size(path) if storage.exists(path) else None

    damaged = {e["path"]: why for e in entries if (why := size_damage(size(e["path"]), e))}
    if damaged:
        name, why = next(iter(sorted(damaged.items())))
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise NotReady(f"{target}: damaged shard {name} ({why}){more}; `omni run` on the run (or `omni audit`) first")


def resolve(target: str) -> Inputs:
    """A run directory (every planned unit committed) or a directory with a shard-set manifest."""
    target = target.rstrip("/")
    run = RunDir(target)
    if run.is_started():
        plan = json.loads(storage.read_bytes(run.path("plan.json")))
        markers = run.committed()
        missing = [u["id"] for u in plan if u["id"] not in markers]
        if missing:
            raise NotReady(
                f"{target}: {len(missing)} units are not committed (e.g. {missing[0]}); finish the run first"
            )
        entries = sorted(((s["path"], s, unit) for unit, m in markers.items() for s in m["shards"]), key=lambda e: e[0])
        _refuse_damaged(target, run.shards_dir, [s for _, s, _ in entries])
        shards = tuple(
            ShardInput(i, storage.join(run.shards_dir, p), p, s["sha256"], s["samples"], unit)
            for i, (p, s, unit) in enumerate(entries)
        )
        return Inputs("run", target, shards)
    manifest = target if target.endswith(".json") else storage.join(target, SHARDSET_MANIFEST)
    if not storage.exists(manifest):
        raise NotReady(f"{target} is neither a run directory (run.json) nor a shard set ({SHARDSET_MANIFEST})")
    directory = manifest.rsplit("/", 1)[0]
    doc = read_shardset_manifest(manifest)
    entries = sorted(doc["shards"], key=lambda s: s["path"])
    _refuse_damaged(target, directory, entries)
    shards = tuple(
        ShardInput(i, storage.join(directory, s["path"]), s["path"], s["sha256"], s["samples"])
        for i, s in enumerate(entries)
    )
    return Inputs("shardset", directory, shards)
