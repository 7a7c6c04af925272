"""Ray Data executor: the recipe as a streaming DAG, units committed by the driver as they finish.

    units ─► read (tasks) ─► step 1 ─► ... ─► step N (tasks, or actor pools for stateful ops)
          ─► write shards + ledger part (tasks) ─► driver: commit unit when all inputs are counted

One unit is one block and ops take whole blocks, so units stay together; the writer still copes
with a unit split across blocks (each part gets its own files, the driver adds parts up). Nothing
here is needed to test operators: they are plain Python over Arrow tables.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pyarrow as pa
import ray
from tqdm import tqdm

from pipelines.errors import UserFixable, describe_error
from pipelines.operator import Operator, get_operator
from pipelines.recipe import Recipe, StepSpec, parse_size
from pipelines.units import CommitTracker, apply_step, build_operator, read_unit_table, stage_name, write_units
from shards import storage

log = logging.getLogger(__name__)


class _StepActor:
    """Holds one operator (and its model) for the lifetime of a Ray actor."""

    def __init__(self, step: dict[str, Any], stage: str, storage_opts: dict[str, Any], imports: list[str]) -> None:
        storage.configure(**storage_opts)
        self.op: Operator = build_operator(StepSpec(**step), imports)
        self.op.setup()
        self.stage = stage

    def __call__(self, table: pa.Table) -> pa.Table:
        return apply_step(self.op, self.stage, table)


def _stateless_step(step: dict[str, Any], stage: str, storage_opts: dict[str, Any], imports: list[str]):
    op_holder: list[Operator] = []

    def fn(table: pa.Table) -> pa.Table:
        if not op_holder:  # once per worker process, not per batch
            storage.configure(**storage_opts)
            op_holder.append(build_operator(StepSpec(**step), imports))
            op_holder[0].setup()
        return apply_step(op_holder[0], stage, table)

    return fn


def init_ray(settings: dict[str, Any]) -> None:
    """Join ``address`` (a cluster; ``auto`` or RAY_ADDRESS, which ``ray job submit`` sets) or start a
    private local Ray on loopback, never silently joining some other cluster on this machine."""
    if ray.is_initialized():
        return
    address = settings.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=settings.get("log_to_driver", True))
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        num_cpus=int(settings.get("num_cpus", os.cpu_count() or 1)),
        object_store_memory=parse_size(settings.get("object_store_memory", "1GB")),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=settings.get("log_to_driver", True),
    )


def cpu_reservations(ops: list[type[Operator]], cluster_cpus: float) -> list[float]:
    """Logical CPUs to reserve per step so the DAG can always make progress on this cluster.

    Actor pools hold their CPUs for the whole run; when they would hold every CPU, the read,
    stateless and write tasks could never be scheduled and the run would hang (two model steps
    on a 2-CPU laptop do exactly that). Then the actors' reservations shrink in proportion until
    one CPU is left for tasks. Reservations are scheduling tokens: an actor still uses a whole
    core when it runs. No step asks for more than the cluster has.
    """
    wanted = [min(op.resources.cpus, cluster_cpus) for op in ops]
    held = sum(c * (op.resources.concurrency or 1) for c, op in zip(wanted, ops, strict=True) if op.stateful)
    budget = max(cluster_cpus - 1, cluster_cpus / 2)
    if held <= budget:
        return wanted
    scale = budget / held
    log.warning(
        "actor steps would hold %.2g of %.2g CPUs and starve the other tasks; reserving %.0f%% of what they ask",
        held,
        cluster_cpus,
        100 * scale,
    )
    return [c * scale if op.stateful else c for c, op in zip(wanted, ops, strict=True)]


def run_ray(recipe: Recipe, pending: list[dict[str, Any]], tracker: CommitTracker, progress: bool) -> None:
    settings = recipe.executor
    init_ray(settings)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(settings.get("ray_progress_bars", False))
    ctx.target_max_block_size = parse_size(settings.get("max_block_bytes", "1GB"))
    opts = storage.storage_options()

    def read(batch: pa.Table) -> pa.Table:
        storage.configure(**opts)
        tables = [read_unit_table(json.loads(u), recipe) for u in batch["unit"].to_pylist()]
        return pa.concat_tables(tables)

    def write(table: pa.Table) -> pa.Table:
        try:
            return pa.Table.from_pylist(write_units(table, recipe))
        except Exception as e:
            # Ray hands the driver a UserCodeException without its cause, so a full disk or a refused
            # bucket would end in a traceback: describe it here and send the one line as a row.
            message = describe_error(e, recipe.output)
            if message is None:
                raise
            return pa.Table.from_pylist([{"unit": "", "error": message}])

    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True)
    op_classes = [get_operator(step.op, tuple(recipe.imports)) for step in recipe.steps]
    cpus = cpu_reservations(op_classes, float(ray.cluster_resources().get("CPU", 1)))
    for i, (step, op_cls, num_cpus) in enumerate(zip(recipe.steps, op_classes, cpus, strict=True)):
        res = op_cls.resources
        remote = {"num_cpus": num_cpus, "num_gpus": res.gpus or None}
        if res.memory_mb:
            remote["memory"] = res.memory_mb * (1 << 20)
        args = (vars(step), stage_name(i, step), opts, recipe.imports)
        if op_cls.stateful:
            ds = ds.map_batches(
                _StepActor,
                fn_constructor_args=args,
                batch_size=None,
                batch_format="pyarrow",
                concurrency=res.concurrency or 1,
                **remote,
            )
        else:
            ds = ds.map_batches(_stateless_step(*args), batch_size=None, batch_format="pyarrow", **remote)
    ds = ds.map_batches(write, batch_size=None, batch_format="pyarrow", udf_modifying_row_count=True)

    seen: set[str] = set()
    with tqdm(total=len(pending), desc=f"{recipe.name} units", unit="unit", disable=not progress) as bar:
        for summary in ds.iter_rows():
            if summary.get("error"):
                raise UserFixable(summary["error"])
            seen.add(summary["unit"])
            if tracker.add(dict(summary)):
                bar.update(1)
    tracker.commit_empty(u["id"] for u in pending if u["id"] not in seen)
