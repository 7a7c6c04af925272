"""The three things done to a work unit, shared by every executor: read, apply steps, write.

Rows in flight are Sample rows plus the executor's columns: ``_unit``/``_unit_total`` (which unit a
row came from and how many inputs that unit had) and ``reason``/``detail``/``reject_stage`` (set
once a row is rejected; rejected rows ride along untouched so the writer can ledger them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.operator import Operator, Resources, get_operator
from pipelines.recipe import Recipe, StepSpec
from pipelines.rundir import RunDir, add_timings
from pipelines.sources import read_unit
from shards import storage
from shards.reader import Record
from shards.schema import (
    DETAIL_COLUMN,
    REASON_COLUMN,
    SAMPLE_SCHEMA,
    STAGE_COLUMN,
    UNIT_COLUMN,
    UNIT_TOTAL_COLUMN,
    dumps_meta,
    loads_meta,
    sample_columns,
)
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

FLIGHT_SCHEMA = pa.schema(
    [
        *SAMPLE_SCHEMA,
        pa.field(UNIT_COLUMN, pa.string()),
        pa.field(UNIT_TOTAL_COLUMN, pa.int64()),
        pa.field(REASON_COLUMN, pa.string()),
        pa.field(DETAIL_COLUMN, pa.string()),
        pa.field(STAGE_COLUMN, pa.string()),
    ]
)
ROUTING_COLUMNS = [UNIT_COLUMN, UNIT_TOTAL_COLUMN, REASON_COLUMN, DETAIL_COLUMN, STAGE_COLUMN]
TIMING_PREFIX = "_seconds:"  # per-row share of a stage's wall time, summed per unit by the writer


def _with_timing(table: pa.Table, stage: str, seconds: float, rows_mask: pa.Array | None = None) -> pa.Table:
    """Spread ``seconds`` over the rows the stage worked on (all rows when no mask)."""
    n = len(table) if rows_mask is None else pc.sum(rows_mask).as_py() or 0
    share = seconds / n if n else 0.0
    values = pa.array([share] * len(table), pa.float64())
    if rows_mask is not None:
        values = pc.if_else(rows_mask, values, pa.scalar(0.0))
    column = TIMING_PREFIX + stage
    if column in table.column_names:
        return table.set_column(table.schema.get_field_index(column), column, values)
    return table.append_column(column, values)


def _duplicate_id(sample_id: str, n: int) -> str:
    """A ledger id for the ``n``-th repeat of ``sample_id``: distinct from it and from every other id."""
    return hashlib.sha256(f"duplicate\0{sample_id}\0{n}".encode()).hexdigest()[:32]


def records_to_table(unit: str, records: Iterable[Record]) -> pa.Table:
    """One unit's inputs as rows in flight: samples, and rejects carrying their reason.

    Ids are computed from source + locator + content, and readers make locators unique within a
    source (paths, line offsets, row numbers, tar keys with ``~n`` for repeats), so ids cannot
    collide across units; units of different sources differ by source. Inside a unit this is the
    last guard: a second row with an id already seen is rejected as ``duplicate id`` under an id
    of its own, so the shards never hold an id twice and the audit stays exact."""
    rows = []
    seen: Counter = Counter()
    for rec in records:
        if rec.sample is not None:
            row = {**rec.sample, REASON_COLUMN: None, DETAIL_COLUMN: None, STAGE_COLUMN: None}
        else:
            r = rec.reject
            assert r is not None
            row = {
                "id": r.id,
                "source": "",
                "kind": "",
                "segments": [],
                "meta": dumps_meta({"locator": r.locator}),
                REASON_COLUMN: r.reason,
                DETAIL_COLUMN: r.detail,
                STAGE_COLUMN: "ingest",
            }
        seen[row["id"]] += 1
        if seen[row["id"]] > 1:
            locator = loads_meta(row["meta"]).get("locator")
            row = {
                "id": _duplicate_id(row["id"], seen[row["id"]]),
                "source": row["source"],
                "kind": "",
                "segments": [],
                "meta": dumps_meta({"locator": locator, "duplicate_of": row["id"]}),
                REASON_COLUMN: "duplicate id",
                DETAIL_COLUMN: f"an earlier input of this unit has id {row['id']}",
                STAGE_COLUMN: "ingest",
            }
        rows.append(row)
    for row in rows:
        row[UNIT_COLUMN] = unit
        row[UNIT_TOTAL_COLUMN] = len(rows)
    return pa.Table.from_pylist(rows, schema=FLIGHT_SCHEMA)


def read_unit_table(unit: dict[str, Any], recipe: Recipe) -> pa.Table:
    start = time.perf_counter()
    table = records_to_table(unit["id"], read_unit(unit, recipe))
    return _with_timing(table, "ingest", time.perf_counter() - start)


def build_operator(step: StepSpec, imports: tuple[str, ...] | list[str] = ()) -> Operator:
    return get_operator(step.op, tuple(imports))(**step.params)


def stage_name(index: int, step: StepSpec) -> str:
    return f"{index:02d}-{step.op}"


def _call_row_by_row(op: Operator, payload: pa.Table, error: Exception) -> pa.Table:
    """After a batch failed: find the rows that fail and reject them, keep the rest."""
    log.warning("%s failed on a batch of %d (%s); retrying row by row", op.name, len(payload), error)
    parts = []
    for i in range(len(payload)):
        row = payload.slice(i, 1)
        try:
            parts.append(op(row))
        except Exception as e:  # noqa: BLE001 - any failure of one row becomes its reject reason
            detail = f"{op.name}: {type(e).__name__}: {e}"[:500]
            parts.append(
                row.append_column(REASON_COLUMN, pa.array(["operator error"])).append_column(
                    DETAIL_COLUMN, pa.array([detail])
                )
            )
    return pa.concat_tables(parts, promote_options="default")


def _call_in_batches(op: Operator, payload: pa.Table, batch_size: int | None) -> pa.Table:
    """``op`` over ``payload`` in calls of at most ``batch_size`` rows (all at once when None); a call
    that raises is retried row by row, so one bad row rejects itself, not its batch."""
    size = batch_size or max(len(payload), 1)
    parts = []
    for start in range(0, len(payload), size):
        chunk = payload.slice(start, size)
        try:
            parts.append(op(chunk))
        except Exception as e:  # noqa: BLE001
            parts.append(_call_row_by_row(op, chunk, e))
    return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")


def apply_step(op: Operator, stage: str, table: pa.Table, batch_size: int | None = None) -> pa.Table:
    """Run one operator on the rows still flowing, ``batch_size`` rows per call; newly rejected rows get ``stage``."""
    flowing_mask = pc.is_null(table[REASON_COLUMN])
    flowing = table.filter(flowing_mask)
    if len(flowing) == 0:
        return table
    done = table.filter(pc.invert(flowing_mask))
    carried = [c for c in flowing.column_names if c.startswith(TIMING_PREFIX)]
    payload = flowing.drop_columns(ROUTING_COLUMNS + carried)
    start = time.perf_counter()
    result = _call_in_batches(op, payload, batch_size)
    seconds = time.perf_counter() - start
    if len(result) != len(payload):
        raise RuntimeError(f"operator {op.name} returned {len(result)} rows for {len(payload)}; operators are 1:1")
    if REASON_COLUMN not in result.column_names:
        result = result.append_column(REASON_COLUMN, pa.nulls(len(result), pa.string()))
    if DETAIL_COLUMN not in result.column_names:
        result = result.append_column(DETAIL_COLUMN, pa.nulls(len(result), pa.string()))
    rejected = pc.is_valid(result[REASON_COLUMN])
    stages = pc.if_else(rejected, pa.scalar(stage), pa.scalar(None, pa.string()))
    result = (
        result.append_column(UNIT_COLUMN, flowing[UNIT_COLUMN])
        .append_column(UNIT_TOTAL_COLUMN, flowing[UNIT_TOTAL_COLUMN])
        .append_column(STAGE_COLUMN, stages)
    )
    for c in carried:
        result = result.append_column(c, flowing[c])
    result = _with_timing(result, stage, seconds)
    return pa.concat_tables([result, done], promote_options="default")


def apply_steps(ops: list[tuple[str, Operator, int | None]], table: pa.Table) -> pa.Table:
    """The steps (stage, operator, batch size) one after another, as the local executor runs them."""
    for stage, op, batch_size in ops:
        table = apply_step(op, stage, table, batch_size)
    return table


def step_resources(step: StepSpec, imports: tuple[str, ...] | list[str] = ()) -> Resources:
    """The operator's declared resources with the recipe step's overrides."""
    return get_operator(step.op, tuple(imports)).resources.with_overrides(step.resources)


def _part_id(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:8]


def write_units(table: pa.Table, recipe: Recipe) -> list[dict[str, Any]]:
    """Write every unit's rows in ``table`` as shards + ledger part; one summary per unit part."""
    storage.configure(**recipe.storage)
    run = RunDir(recipe.output)
    summaries = []
    for unit in pc.unique(table[UNIT_COLUMN]).to_pylist():
        rows = table.filter(pc.equal(table[UNIT_COLUMN], unit))
        total = rows[UNIT_TOTAL_COLUMN][0].as_py()
        prefix = f"{unit}-{_part_id(rows['id'].to_pylist())}"
        rejected_mask = pc.is_valid(rows[REASON_COLUMN])
        kept = sample_columns(rows.filter(pc.invert(rejected_mask)))
        rejected = rows.filter(rejected_mask)
        writer = ShardWriter(run.shards_dir, prefix, recipe.max_shard_samples, recipe.max_shard_bytes)
        with writer:
            for row in kept.to_pylist():
                writer.write(row)
        ledger = []
        reasons: Counter = Counter()
        if len(rejected):
            ledger_rows = []
            for r in rejected.select(["id", "source", "meta", REASON_COLUMN, DETAIL_COLUMN, STAGE_COLUMN]).to_pylist():
                reasons[r[REASON_COLUMN]] += 1
                ledger_rows.append(
                    {
                        "id": r["id"],
                        "stage": r[STAGE_COLUMN],
                        "reason": r[REASON_COLUMN],
                        "detail": r[DETAIL_COLUMN],
                        "unit": unit,
                        "source": r["source"] or unit.rsplit("-", 1)[0],
                        "locator": loads_meta(r["meta"]).get("locator"),
                    }
                )
            ledger.append(run.write_ledger(f"{prefix}.parquet", ledger_rows))
        timings = {
            c[len(TIMING_PREFIX) :]: {
                "seconds": pc.sum(rows[c]).as_py() or 0.0,
                "rows": pc.sum(pc.greater(pc.fill_null(rows[c], 0.0), 0.0)).as_py() or 0,
            }
            for c in rows.column_names
            if c.startswith(TIMING_PREFIX)
        }
        summaries.append(
            {
                "unit": unit,
                "timings": json.dumps(timings),
                "total": total,
                "written": len(kept),
                "rejected": len(rejected),
                "shards": json.dumps([s.as_dict() for s in writer.written]),
                "ledger": json.dumps(ledger),
                "reasons": json.dumps(reasons),
            }
        )
    return summaries


class CommitTracker:
    """Adds up unit parts as they arrive and commits a unit once every input is accounted for."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.parts: dict[str, list[dict[str, Any]]] = {}
        self.committed: set[str] = set()

    def add(self, summary: dict[str, Any]) -> bool:
        unit = summary["unit"]
        parts = self.parts.setdefault(unit, [])
        parts.append(summary)
        written = sum(p["written"] for p in parts)
        rejected = sum(p["rejected"] for p in parts)
        if written + rejected < summary["total"]:
            return False
        if written + rejected > summary["total"]:
            raise RuntimeError(f"unit {unit}: {written}+{rejected} samples for {summary['total']} inputs")
        reasons: Counter = Counter()
        timings: dict[str, dict[str, float]] = {}
        for p in parts:
            reasons.update(json.loads(p["reasons"]))
            add_timings(timings, json.loads(p.get("timings") or "{}"))
        marker = {
            "unit": unit,
            "ingested": summary["total"],
            "written": written,
            "rejected": rejected,
            "shards": [s for p in parts for s in json.loads(p["shards"])],
            "ledger": [name for p in parts for name in json.loads(p["ledger"])],
            "reasons": dict(reasons),
            "timings": timings,
        }
        self.run.commit_unit(unit, marker)
        self.committed.add(unit)
        return True

    def commit_empty(self, units: Iterable[str]) -> None:
        """Units that produced no rows at all (an empty input file) after a complete pass."""
        for unit in units:
            if unit in self.parts:
                raise RuntimeError(f"unit {unit} finished incomplete: {self.parts[unit]}")
            self.run.commit_unit(
                unit, {"unit": unit, "ingested": 0, "written": 0, "rejected": 0, "shards": [], "ledger": []}
            )
            self.committed.add(unit)
