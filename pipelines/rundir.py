"""The run directory: plan, committed work units, shards, rejects ledger, manifests.

    RUN/run.json             recipe, its config hash, code version, created time
    RUN/plan.json            the work units, frozen at the first start
    RUN/shards/*.tar         committed shards (<unit>-<part>-NNNNN.tar) + shards/manifest.json
    RUN/rejects/*.parquet    the rejects ledger (id, stage, reason, detail, unit, source, locator)
    RUN/units/<unit>.json    a unit's commit marker: what it ingested, wrote and rejected
    RUN/manifest.json        run totals, written when the run finishes

A unit counts as done only when its marker exists; the marker is written (atomically) after its
shards and ledger part. Files of units without a marker are leftovers of a killed run and are
removed before the unit runs again, so a re-run never duplicates or loses a sample.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.recipe import Recipe
from shards import storage
from shards.manifest import ShardInfo, summarize, write_shardset_manifest

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("unit", pa.string()),
        pa.field("source", pa.string()),
        pa.field("locator", pa.string()),
    ]
)


def add_timings(total: dict[str, dict[str, float]], more: dict[str, dict[str, float]]) -> None:
    """Sum per-stage ``{seconds, rows}`` (from unit parts, or from unit markers)."""
    for stage, t in more.items():
        acc = total.setdefault(stage, {"seconds": 0.0, "rows": 0})
        acc["seconds"] += t["seconds"]
        acc["rows"] += t["rows"]


class ResumeRefused(RuntimeError):
    """The run directory belongs to a different recipe; resuming would mix two corpora."""


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnicorpus")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunDir:
    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def shards_dir(self) -> str:
        return self.path("shards")

    @property
    def rejects_dir(self) -> str:
        return self.path("rejects")

    # ------------------------------------------------------------ start / resume

    def start(self, recipe: Recipe, plan: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Create or reopen the run; returns the frozen plan. Refuses a changed recipe."""
        run_json = self.path("run.json")
        if storage.exists(run_json):
            info = json.loads(storage.read_bytes(run_json))
            if info["config_hash"] != recipe.config_hash():
                raise ResumeRefused(
                    f"{self.root} was made by a different recipe (config hash {info['config_hash']}, "
                    f"now {recipe.config_hash()}); use a new output directory"
                )
            return json.loads(storage.read_bytes(self.path("plan.json")))
        if plan is None:
            raise ValueError("a new run needs a plan")
        for d in ("shards", "rejects", "units"):
            storage.makedirs(self.path(d))
        storage.write_bytes(self.path("plan.json"), json.dumps(plan, indent=1).encode())
        info = {
            "name": recipe.name,
            "config_hash": recipe.config_hash(),
            "code_version": code_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": [vars(s) for s in recipe.sources],
            "steps": [vars(s) for s in recipe.steps],
            "units": len(plan),
        }
        storage.write_bytes(run_json, json.dumps(info, indent=1).encode())
        return plan

    def is_started(self) -> bool:
        return storage.exists(self.path("run.json"))

    def committed(self) -> dict[str, dict[str, Any]]:
        return {
            m.rsplit("/", 1)[-1][: -len(".json")]: json.loads(storage.read_bytes(m))
            for m in storage.listdir(self.path("units"), ".json")
        }

    def clean_uncommitted(self) -> int:
        """Remove shards and ledger parts that no commit marker owns; returns how many files."""
        owned = set()
        for marker in self.committed().values():
            owned.update(s["path"] for s in marker["shards"])
            owned.update(marker["ledger"])
        removed = 0
        removed += storage.remove_stale_temporaries(self.path("units"))  # a marker cut off mid-write
        for d in (self.shards_dir, self.rejects_dir):
            removed += storage.remove_stale_temporaries(d)
            for f in storage.listdir(d):
                name = f.rsplit("/", 1)[-1]
                if name.endswith((".tar", ".parquet")) and name not in owned:
                    storage.remove(f)
                    removed += 1
        return removed

    # ------------------------------------------------------------ writing a unit

    def write_ledger(self, name: str, rows: list[dict[str, Any]]) -> str:
        table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
        path = self.path("rejects", name)
        with storage.atomic_write(path) as f:
            pq.write_table(table, f)
        return name

    def commit_unit(self, unit: str, marker: dict[str, Any]) -> None:
        storage.write_bytes(self.path("units", f"{unit}.json"), json.dumps(marker, indent=1).encode())

    # ------------------------------------------------------------ finishing

    def finish(self, plan: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the shard-set and run manifests from the commit markers."""
        markers = self.committed()
        shards = [ShardInfo.from_dict(s) for m in markers.values() for s in m["shards"]]
        info = json.loads(storage.read_bytes(self.path("run.json")))
        write_shardset_manifest(self.shards_dir, shards, {"run": info["name"], "config_hash": info["config_hash"]})
        reasons: Counter = Counter()
        timings: dict[str, dict[str, float]] = {}
        for m in markers.values():
            reasons.update(m.get("reasons", {}))
            add_timings(timings, m.get("timings", {}))
        manifest = {
            "kind": "omnicorpus.run",
            **{k: info[k] for k in ("name", "config_hash", "code_version", "created", "sources")},
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "units": {"planned": len(plan), "committed": len(markers)},
            "ingested": sum(m["ingested"] for m in markers.values()),
            "written": sum(m["written"] for m in markers.values()),
            "rejected": sum(m["rejected"] for m in markers.values()),
            "rejects_by_reason": dict(reasons.most_common()),
            "stage_timings": {
                stage: {**t, "rows_per_s": t["rows"] / t["seconds"] if t["seconds"] else None}
                for stage, t in timings.items()
            },
            "shardset": summarize(shards),
        }
        storage.write_bytes(self.path("manifest.json"), json.dumps(manifest, indent=1).encode())
        return manifest

    def read_ledger(self) -> pa.Table:
        parts = [pq.read_table(storage.open_read(f)) for f in storage.listdir(self.rejects_dir, ".parquet")]
        return pa.concat_tables(parts) if parts else LEDGER_SCHEMA.empty_table()
