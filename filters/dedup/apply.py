"""The last phase: drop the duplicates from the shards and account for each in a rejects ledger.

For a run directory, in place and crash-safe, unit by unit (one task per affected unit):
the unit's affected shards are rewritten under new names without the duplicates, a ledger part
lists the duplicates (stage ``dedup``, reason ``exact duplicate`` or ``near-duplicate``, detail =
kept id, method, score), then the unit's commit marker is replaced atomically, recording the job.
Only then are the old shards unowned; ``RunDir.clean_uncommitted`` removes them, and the run's
manifests are rebuilt, so ``omni audit`` still balances: ingested = written + rejected.

A crash before a unit's marker is replaced leaves unowned new files (removed, the unit redone);
after it, unowned old files (removed). Before rewriting, each shard's sha256 is checked against
the one the features phase saw, so a dedup never drops the wrong rows.

For a shard set, a filtered copy with its own manifest and ledger is written to ``out``.

Each task reads its own shards' drops (the duplicates phase routes them by shard to
``duplicates-by-shard/``), so neither the driver nor a worker holds the drops of the whole corpus.
A work directory without that folder (made before it) has the driver hand each task its drops.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from filters.dedup.buckets import EXACT_MEDIA, EXACT_TEXT, METHODS
from filters.dedup.inputs import Inputs, ShardInput, split_node
from filters.dedup.partitioned import DROPS_BY_SHARD, KEPT_SCHEMA, parts_present, read_part
from filters.dedup.runner import Runner
from filters.dedup.workdir import WorkDir
from pipelines.rundir import LEDGER_SCHEMA, RunDir
from shards import storage
from shards.manifest import ShardInfo, write_shardset_manifest
from shards.reader import iter_samples
from shards.schema import loads_meta
from shards.writer import ShardWriter

STAGE = "dedup"
UNLIMITED = 1 << 62


def reason_of(method: int) -> str:
    return "exact duplicate" if method in (EXACT_TEXT, EXACT_MEDIA) else "near-duplicate"


def detail_of(root_id: str, method: int, score: float) -> str:
    return json.dumps({"kept": root_id, "method": METHODS[method], "score": round(float(score), 4)})


class ShardChanged(RuntimeError):
    """A shard is not the one the features phase read."""


def _read_verified(shard: ShardInput) -> Iterator[dict[str, Any]]:
    h = hashlib.sha256()
    with storage.open_read(shard.path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != shard.sha256:
        raise ShardChanged(f"{shard.path} changed since the dedup read it; start a new dedup work directory")
    yield from iter_samples(shard.path)


def filter_shard(
    shard: ShardInput, drops: dict[int, tuple[str, int, float]], out_dir: str, prefix: str, unit: str | None
) -> tuple[list[ShardInfo], list[dict[str, Any]]]:
    """Rewrite one shard without the rows in ``drops`` (row -> kept id, method, score)."""
    ledger = []
    writer = ShardWriter(out_dir, prefix, UNLIMITED, UNLIMITED)
    with writer:
        for row, sample in enumerate(_read_verified(shard)):
            if row in drops:
                root_id, method, score = drops[row]
                ledger.append(
                    {
                        "id": sample["id"],
                        "stage": STAGE,
                        "reason": reason_of(method),
                        "detail": detail_of(root_id, method, score),
                        "unit": unit,
                        "source": sample["source"],
                        "locator": loads_meta(sample.get("meta")).get("locator"),
                    }
                )
            else:
                writer.write(sample)
    if len(ledger) != len(drops):
        raise ShardChanged(f"{shard.path}: {len(drops)} duplicates planned, {len(ledger)} rows found")
    return writer.written, ledger


def shard_drops(drops_dir: str, index: int) -> dict[int, tuple[str, int, float]]:
    """The drops of one shard, from the duplicates phase's routing by shard."""
    return drops_by_shard_of(read_part(drops_dir, index, KEPT_SCHEMA)).get(index, {})


def planned_drops(work: WorkDir) -> int:
    """Rows of the duplicates phase (footers only): every drop, applied now or by an earlier try."""
    total = 0
    for f in storage.listdir(work.path("duplicates"), ".parquet"):
        with storage.open_read(f) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def routed_shards(work: WorkDir) -> tuple[str, set[int]] | None:
    """(folder, shards with drops) when the duplicates phase routed its drops by shard."""
    folder = work.path(DROPS_BY_SHARD)
    return (folder, set(parts_present(folder))) if storage.exists(folder) else None


def drops_by_shard_of(table: pa.Table) -> dict[int, dict[int, tuple[str, int, float]]]:
    out: dict[int, dict[int, tuple[str, int, float]]] = {}
    for node, root_id, method, score in zip(
        table["node"].to_pylist(),
        table["root_id"].to_pylist(),
        table["method"].to_pylist(),
        table["score"].to_pylist(),
        strict=True,
    ):
        shard, row = split_node(node)
        out.setdefault(shard, {})[row] = (root_id, method, score)
    return out


def _stem(name: str) -> str:
    return name[: -len(".tar")] if name.endswith(".tar") else name


def apply_unit(run_root: str, unit: str, shards: list[ShardInput], drops: dict, job_id: str) -> dict[str, Any]:
    """Rewrite one unit of a run; idempotent (a unit whose marker records ``job_id`` is skipped)."""
    run = RunDir(run_root)
    marker_path = run.path("units", f"{unit}.json")
    marker = json.loads(storage.read_bytes(marker_path))
    if job_id in marker.get("dedup", []):
        return {"unit": unit, "dropped": 0, "skipped": True}
    by_name = {s.name: s for s in shards}
    new_shards, ledger = [], []
    for entry in marker["shards"]:
        shard = by_name.get(entry["path"])
        if shard is None or shard.index not in drops:
            new_shards.append(entry)
            continue
        if entry["sha256"] != shard.sha256:
            raise ShardChanged(f"{entry['path']}: the run's marker and the dedup inputs disagree")
        written, rows = filter_shard(shard, drops[shard.index], run.shards_dir, f"{_stem(shard.name)}-{job_id}", unit)
        new_shards.extend(s.as_dict() for s in written)
        ledger.extend(rows)
    if ledger:
        name = run.write_ledger(f"{unit}-{job_id}.parquet", ledger)
        marker["ledger"] = [*marker.get("ledger", []), name]
    reasons = Counter(marker.get("reasons", {}))
    reasons.update(r["reason"] for r in ledger)
    marker.update(
        shards=new_shards,
        written=marker["written"] - len(ledger),
        rejected=marker["rejected"] + len(ledger),
        reasons=dict(reasons),
        dedup=[*marker.get("dedup", []), job_id],
    )
    run.commit_unit(unit, marker)
    return {"unit": unit, "dropped": len(ledger), "skipped": False}


def apply_to_run(inputs: Inputs, work: WorkDir, job_id: str, runner: Runner) -> dict[str, Any]:
    """Under the run's lock (an ``omni run`` on it at the same time would delete our files, and we
    its): one task per unit with duplicates; then stale files go and the manifests are rebuilt."""
    with RunDir(inputs.root).lock():
        return _apply_to_run(inputs, work, job_id, runner)


@dataclass(frozen=True)
class UnitTask:
    run_root: str
    unit: str
    shards: tuple[ShardInput, ...]
    drops: dict
    job_id: str
    drops_dir: str | None = None  # read the drops of these shards from here (``drops`` is then empty)
    with_drops: tuple[int, ...] = ()


def unit_task(t: UnitTask) -> dict[str, Any]:
    drops = t.drops if t.drops_dir is None else {i: shard_drops(t.drops_dir, i) for i in t.with_drops}
    return apply_unit(t.run_root, t.unit, list(t.shards), drops, t.job_id)


def _apply_to_run(inputs: Inputs, work: WorkDir, job_id: str, runner: Runner) -> dict[str, Any]:
    run = RunDir(inputs.root)
    run.clean_uncommitted()
    routed = routed_shards(work)
    units: dict[str, list[ShardInput]] = {}
    for shard in inputs.shards:
        units.setdefault(shard.unit or "", []).append(shard)
    if routed is not None:
        folder, present = routed
        affected = sorted({inputs.shards[i].unit or "" for i in present})
        tasks = [
            UnitTask(
                inputs.root,
                u,
                tuple(units[u]),
                {},
                job_id,
                folder,
                tuple(s.index for s in units[u] if s.index in present),
            )
            for u in affected
        ]
    else:
        dups = work.read_table("duplicates") if storage.listdir(work.path("duplicates"), ".parquet") else None
        by_shard = drops_by_shard_of(dups) if dups is not None else {}
        affected = sorted({inputs.shards[i].unit or "" for i in by_shard})
        tasks = [
            UnitTask(
                inputs.root,
                u,
                tuple(units[u]),
                {s.index: by_shard[s.index] for s in units[u] if s.index in by_shard},
                job_id,
            )
            for u in affected
        ]
    results, stats = runner.map(unit_task, tasks)
    removed = run.clean_uncommitted()
    plan = json.loads(storage.read_bytes(run.path("plan.json")))
    manifest = run.finish(plan)
    return {
        "units": len(affected),
        "units_already_applied": int(sum(bool(r["skipped"]) for r in results)),
        "dropped": planned_drops(work),
        "stale_files_removed": removed,
        "written": manifest["written"],
        "rejected": manifest["rejected"],
        **stats,
    }


@dataclass(frozen=True)
class ShardTask:
    shard: ShardInput
    drops: dict
    out_dir: str
    drops_dir: str | None = None  # read this shard's drops from here
    ledger_dir: str | None = None  # write this shard's ledger rows here as one part


def shard_task(t: ShardTask) -> dict[str, Any]:
    """Filter one shard; its ledger rows go to a part file, so the driver never holds them all."""
    drops = t.drops if t.drops_dir is None else shard_drops(t.drops_dir, t.shard.index)
    infos, ledger = filter_shard(t.shard, drops, t.out_dir, _stem(t.shard.name), t.shard.unit)
    part = None
    if ledger and t.ledger_dir is not None:
        part = storage.join(t.ledger_dir, f"{t.shard.index:08d}.parquet")
        with storage.atomic_write(part) as f:
            pq.write_table(pa.Table.from_pylist(ledger, schema=LEDGER_SCHEMA), f)
    return {"infos": infos, "ledger_part": part, "dropped": len(ledger)}


def apply_to_shardset(inputs: Inputs, work: WorkDir, out: str, runner: Runner) -> dict[str, Any]:
    """A filtered copy of a shard set: ``<name>-00000.tar`` per input shard that keeps samples, a
    manifest, and ``rejects/dedup.parquet``."""
    routed = routed_shards(work)
    if routed is None:
        dups = work.read_table("duplicates") if storage.listdir(work.path("duplicates"), ".parquet") else None
        by_shard = drops_by_shard_of(dups) if dups is not None else {}
    shards_out = storage.join(out, "shards")
    parts = storage.join(out, "rejects", ".dedup-parts")
    storage.makedirs(shards_out)
    storage.makedirs(parts)
    written: list[ShardInfo] = []
    if routed is None:
        tasks = [ShardTask(shard, by_shard.get(shard.index, {}), shards_out, None, parts) for shard in inputs.shards]
    else:
        folder, present = routed
        tasks = [ShardTask(s, {}, shards_out, folder if s.index in present else None, parts) for s in inputs.shards]
    results, stats = runner.map(shard_task, tasks)  # one task per shard, results in shard order
    for r in results:
        written.extend(r["infos"])
    write_shardset_manifest(shards_out, written, {"deduplicated_from": inputs.root})
    with storage.atomic_write(storage.join(out, "rejects", "dedup.parquet")) as f:  # the parts, one at a time
        with pq.ParquetWriter(f, LEDGER_SCHEMA) as ledger:
            for r in results:
                if r["ledger_part"]:
                    with storage.open_read(r["ledger_part"]) as part:
                        ledger.write_table(pq.read_table(part, schema=LEDGER_SCHEMA))
    fs, parts_path = storage.filesystem(parts)
    if fs.exists(parts_path):
        fs.rm(parts_path, recursive=True)
    kept = int(np.sum([i.stats.samples for i in written]))
    return {"shards": len(written), "written": kept, "dropped": int(sum(r["dropped"] for r in results)), **stats}
