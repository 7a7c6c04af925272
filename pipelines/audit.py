"""Prove a run lost and duplicated nothing: ingested = written + rejected, unit by unit.

The audit re-reads what is on disk rather than trusting the markers' counts: every shard's sha256,
every sample id in the shards and every id in the ledger. It reads each shard once (hash and parse
in one pass) and lists whatever is damaged; ``omni run`` on the run redoes the damaged units.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm import tqdm

from pipelines.rundir import LEDGER_SCHEMA, RunDir
from shards import storage
from shards.verify import ShardScan


@dataclass
class AuditReport:
    planned_units: int = 0
    committed_units: int = 0
    ingested: int = 0
    written: int = 0
    rejected: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    rejects_by_reason: Counter = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        return not self.problems and self.ingested == self.written + self.rejected

    def summary(self) -> str:
        verdict = "balanced" if self.balanced else "NOT balanced"
        line = (
            f"{verdict}: ingested {self.ingested} = written {self.written} + rejected {self.rejected} "
            f"({self.committed_units}/{self.planned_units} units, {self.shards} shards)"
        )
        return "\n".join([line, *(f"  problem: {p}" for p in self.problems[:20])])


def audit(root: str, progress: bool = False) -> AuditReport:
    """Re-read the run and account for every input; damage of any kind becomes a listed problem
    (``damaged shard X: why``, ``unreadable ledger part Y``), never an exception."""
    run = RunDir(root)
    report = AuditReport()
    if not run.is_started():
        report.problems.append(f"{root} is not a run directory (no run.json)")
        return report
    try:
        plan = json.loads(storage.read_bytes(run.path("plan.json")))
        planned = [u["id"] for u in plan]
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.problems.append(f"unreadable plan.json: {type(e).__name__}: {e}")
        planned = []
    markers, broken = run.markers()
    for unit, why in sorted(broken.items()):
        report.problems.append(f"unreadable commit marker units/{unit}.json: {why}")
    report.planned_units, report.committed_units = len(planned), len(markers)
    missing = [u for u in planned if u not in markers]
    if missing:
        report.problems.append(f"{len(missing)} units not committed (e.g. {missing[0]}): re-run to finish")
    parts, unreadable = run.read_ledger_parts()
    for name, why in sorted(unreadable.items()):
        report.problems.append(f"unreadable ledger part {name}: {why}")
    ledger = pa.concat_tables(parts.values()) if parts else LEDGER_SCHEMA.empty_table()
    ledger_ids = ledger["id"].to_pylist()
    ledger_by_unit = Counter(ledger["unit"].to_pylist())
    report.rejects_by_reason = Counter(ledger["reason"].to_pylist())
    seen: Counter = Counter()
    for unit, m in tqdm(sorted(markers.items()), desc="audit units", unit="unit", disable=not progress):
        ingested = m.get("ingested", 0)
        report.ingested += ingested
        written = 0
        damaged = False
        for s in m["shards"]:
            scan = ShardScan(storage.join(run.shards_dir, s["path"]), s, name=s["path"])
            ids = [rec.sample["id"] for rec in scan.records() if rec.sample is not None]
            if scan.damage is not None:
                report.problems.append(f"damaged shard {s['path']}: {scan.damage}")
                damaged = True
                continue
            if len(ids) != s.get("samples"):
                report.problems.append(f"{s['path']} holds {len(ids)} samples, manifest says {s.get('samples')}")
            written += len(ids)
            seen.update(ids)
            report.shards += 1
        for name in m["ledger"]:
            if name not in parts and name not in unreadable:
                report.problems.append(f"missing ledger part {name} (unit {unit})")
                damaged = True
            elif name in unreadable:
                damaged = True
        rejected = ledger_by_unit.get(unit, 0)
        report.written += written
        report.rejected += rejected
        if not damaged and written + rejected != ingested:
            report.problems.append(f"unit {unit}: ingested {ingested} != written {written} + rejected {rejected}")
    seen.update(ledger_ids)
    dupes = [i for i, n in seen.items() if n > 1]
    if dupes:
        report.problems.append(f"{len(dupes)} ids appear more than once (e.g. {dupes[0]})")
    orphans = sorted(set(ledger_by_unit) - set(markers))
    if orphans:
        report.problems.append(f"ledger rows for uncommitted units: {orphans[:3]}")
    return report
