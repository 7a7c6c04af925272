"""Run a recipe resumably: plan or reopen the run, skip committed units, execute the rest, finish.

Two executors share the unit functions in ``pipelines.units``: ``local`` (a plain loop, for tests
and debugging) and ``ray`` (Ray Data, in ``pipelines.ray_executor``; the only module that imports
Ray). The choice comes from the recipe's ``executor.type`` or the CLI.
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

from pipelines import sources
from pipelines.recipe import Recipe
from pipelines.rundir import RunDir
from pipelines.units import (
    CommitTracker,
    apply_steps,
    build_operator,
    read_unit_table,
    stage_name,
    step_resources,
    write_units,
)
from shards import storage

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


def run_local(recipe: Recipe, pending: list[dict[str, Any]], tracker: CommitTracker, progress: bool) -> None:
    ops = [
        (stage_name(i, s), build_operator(s, recipe.imports), step_resources(s, recipe.imports).batch_size)
        for i, s in enumerate(recipe.steps)
    ]
    for _, op, _ in ops:
        op.setup()
    for unit in tqdm(pending, desc=f"{recipe.name} units", unit="unit", disable=not progress):
        table = apply_steps(ops, read_unit_table(unit, recipe))
        summaries = write_units(table, recipe)
        for s in summaries:
            tracker.add(s)
        if not summaries:
            tracker.commit_empty([unit["id"]])


def run_recipe(
    recipe: Recipe,
    executor: str | None = None,
    progress: bool = True,
    repair: bool = False,
    verbose: bool = False,
    dashboard: bool = False,
) -> dict[str, Any]:
    """Run (or resume) ``recipe``; returns the run manifest.

    The run directory is locked from start to finish (``RunLock``): a second run on it is refused
    before it touches anything, because its clean-up would delete this run's uncommitted files.
    Every resume checks the committed units' files against their markers (size; with ``repair``
    also sha256) and redoes the damaged units, so what comes out equals an undamaged run's."""
    kind = executor or recipe.executor.get("type", "ray")
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r} (one of {', '.join(EXECUTORS)})")
    from pipelines.operator import check_steps

    check_steps(recipe)  # an unknown operator or a bad parameter fails here, before a run directory exists
    storage.configure(**recipe.storage)
    run = RunDir(recipe.output)
    # plan a new run before taking the lock: a missing or refused source then leaves no directory behind
    fresh_plan = None if run.is_started() else sources.plan(recipe)
    with run.lock() as lock:
        plan = run.start(recipe, None if run.is_started() else fresh_plan)
        broken = run.markers()[1]
        if broken:
            log.warning("%d commit markers are unreadable (%s); redoing their units", len(broken), _some(broken))
        removed = run.clean_uncommitted()
        if removed:
            log.info("removed %d files left by an interrupted run", removed)
        redo_damaged(run, full=repair)
        done = set(run.committed())
        pending = [u for u in plan if u["id"] not in done]
        log.info("%s: %d units planned, %d committed, %d to run", recipe.name, len(plan), len(done), len(pending))
        if pending:
            tracker = CommitTracker(run)
            if kind == "local":
                run_local(recipe, pending, tracker, progress)
            else:
                from pipelines.ray_executor import run_ray

                run_ray(recipe, pending, tracker, progress, verbose=verbose, dashboard=dashboard)
        lock.check()
        return run.finish(plan)


def _some(problems: dict[str, str], n: int = 3) -> str:
    items = [f"{k}: {v}" for k, v in list(problems.items())[:n]]
    return "; ".join(items) + (f"; and {len(problems) - n} more" if len(problems) > n else "")


def redo_damaged(run: RunDir, full: bool = False) -> list[str]:
    """Uncommit the units whose shards or ledger parts are not what their markers say (missing,
    another size; with ``full`` another sha256), so this run writes them again; returns them."""
    damaged = run.damaged_units(full=full)
    if damaged:
        what = "; ".join(why for whys in list(damaged.values())[:3] for why in whys[:2])
        more = f"; and more in {len(damaged) - 3} other units" if len(damaged) > 3 else ""
        units = "1 unit has" if len(damaged) == 1 else f"{len(damaged)} units have"
        log.warning("%s damaged shards (%s%s); redoing them", units, what, more)
        run.uncommit(damaged)
    elif full:
        log.info("every committed shard matches its sha256")
    return sorted(damaged)
