"""Prove a run lost and duplicated nothing: ingested = written + rejected, unit by unit.

The audit re-reads what is on disk rather than trusting the markers' counts: every shard's sha256,
every sample id in the shards and every id in the ledger.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from pipelines.rundir import RunDir
from shards import storage
from shards.reader import iter_samples


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audit(root: str, progress: bool = False) -> AuditReport:
    run = RunDir(root)
    report = AuditReport()
    if not run.is_started():
        report.problems.append(f"{root} is not a run directory (no run.json)")
        return report
    plan = json.loads(storage.read_bytes(run.path("plan.json")))
    markers = run.committed()
    report.planned_units, report.committed_units = len(plan), len(markers)
    missing = [u["id"] for u in plan if u["id"] not in markers]
    if missing:
        report.problems.append(f"{len(missing)} units not committed (e.g. {missing[0]}): re-run to finish")
    seen: Counter = Counter()
    ledger = run.read_ledger()
    ledger_ids = ledger["id"].to_pylist()
    ledger_by_unit = Counter(ledger["unit"].to_pylist())
    report.rejects_by_reason = Counter(ledger["reason"].to_pylist())
    for unit, m in tqdm(sorted(markers.items()), desc="audit units", unit="unit", disable=not progress):
        report.ingested += m["ingested"]
        written = 0
        for s in m["shards"]:
            path = storage.join(run.shards_dir, s["path"])
            if not storage.exists(path):
                report.problems.append(f"missing shard {s['path']}")
                continue
            if _sha256(path) != s["sha256"]:
                report.problems.append(f"sha256 mismatch for {s['path']}")
            ids = [sample["id"] for sample in iter_samples(path)]
            if len(ids) != s["samples"]:
                report.problems.append(f"{s['path']} holds {len(ids)} samples, manifest says {s['samples']}")
            written += len(ids)
            seen.update(ids)
            report.shards += 1
        rejected = ledger_by_unit.get(unit, 0)
        report.written += written
        report.rejected += rejected
        if written + rejected != m["ingested"]:
            report.problems.append(f"unit {unit}: ingested {m['ingested']} != written {written} + rejected {rejected}")
    seen.update(ledger_ids)
    dupes = [i for i, n in seen.items() if n > 1]
    if dupes:
        report.problems.append(f"{len(dupes)} ids appear more than once (e.g. {dupes[0]})")
    committed_units = set(markers)
    orphans = sorted(set(ledger_by_unit) - committed_units)
    if orphans:
        report.problems.append(f"ledger rows for uncommitted units: {orphans[:3]}")
    return report
