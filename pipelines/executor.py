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
from pipelines.units import CommitTracker, apply_steps, build_operator, read_unit_table, stage_name, write_units
from shards import storage

log = logging.getLogger(__name__)
EXECUTORS = ("local", "ray")


def run_local(recipe: Recipe, pending: list[dict[str, Any]], tracker: CommitTracker, progress: bool) -> None:
    ops = [(stage_name(i, s), build_operator(s, recipe.imports)) for i, s in enumerate(recipe.steps)]
    for _, op in ops:
        op.setup()
    for unit in tqdm(pending, desc=f"{recipe.name} units", unit="unit", disable=not progress):
        table = apply_steps(ops, read_unit_table(unit, recipe))
        summaries = write_units(table, recipe)
        for s in summaries:
            tracker.add(s)
        if not summaries:
            tracker.commit_empty([unit["id"]])


def run_recipe(recipe: Recipe, executor: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) ``recipe``; returns the run manifest."""
    kind = executor or recipe.executor.get("type", "ray")
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r} (one of {', '.join(EXECUTORS)})")
    for step in recipe.steps:  # a typo or bad parameter fails here, before a run directory exists
        build_operator(step, recipe.imports)
    storage.configure(**recipe.storage)
    run = RunDir(recipe.output)
    plan = run.start(recipe, None if run.is_started() else sources.plan(recipe))
    removed = run.clean_uncommitted()
    if removed:
        log.info("removed %d files left by an interrupted run", removed)
    done = set(run.committed())
    pending = [u for u in plan if u["id"] not in done]
    log.info("%s: %d units planned, %d committed, %d to run", recipe.name, len(plan), len(done), len(pending))
    if pending:
        tracker = CommitTracker(run)
        if kind == "local":
            run_local(recipe, pending, tracker, progress)
        else:
            from pipelines.ray_executor import run_ray

            run_ray(recipe, pending, tracker, progress)
    return run.finish(plan)
