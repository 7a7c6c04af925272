"""``omni run RECIPE --dry-run``: check the recipe, plan it, and say what a run would do; write nothing.

The checks are the run's own (``check_steps``: operators, parameters, each operator built once; the
planner: listing, sizing and confining the sources), so a dry run that passes fails no sooner in a
real one. Nothing is created: no run directory, no lock, no Ray; an existing run is only read (how
many of its units are committed).
"""

from __future__ import annotations

from typing import Any

from pipelines import sources
from pipelines.catalogue import resource_fields
from pipelines.operator import check_steps, get_operator
from pipelines.recipe import Recipe
from pipelines.rundir import RunDir
from pipelines.units import stage_name, step_resources
from shards import storage

UNITS_SHOWN = 10  # per source; the rest are counted


def describe_unit(unit: dict[str, Any]) -> str:
    """A unit as the planner sees it: which files (or byte ranges, row groups, samples) it reads."""
    if "unread" in unit:
        reasons = sorted({reason for _, reason in unit["unread"]})
        text = f"{len(unit['unread'])} inputs not read, each a reject: {'; '.join(reasons)}"
    elif "error" in unit:
        text = f"{unit['path']}: unreadable parquet, one reject ({unit['error'][:80]})"
    elif unit["type"] == "local":
        groups = unit["groups"]
        first, last = groups[0][0], groups[-1][0]
        span = first if len(groups) == 1 else f"{first} .. {last}"
        text = f"{len(groups)} samples ({span})"
    elif unit.get("array"):
        text = f"{unit['path']} (one json array, read as a stream)"
    elif unit["type"] in ("jsonl", "csv") or "start" in unit:
        end = "end" if unit.get("end") is None else unit["end"]
        text = f"{unit['path']} bytes {unit['start']}-{end}"
    elif "row_group" in unit:
        text = f"{unit['path']} row group {unit['row_group']}"
    else:
        text = unit["path"]
    if unit.get("limit") is not None:
        text += f" (--limit: its first {unit['limit']} inputs)"
    return text


def dry_run(recipe: Recipe, executor: str | None = None) -> dict[str, Any]:
    """What ``omni run`` would do with ``recipe``: checked steps with resolved resources, the plan per
    source, the executor and the output. Raises what a run raises for a bad recipe or source."""
    check_steps(recipe)
    storage.configure(**recipe.storage)
    plan = sources.plan(recipe)
    run = RunDir(recipe.output)
    started = run.is_started()
    committed = len(run.committed()) if started else 0
    steps = []
    for i, step in enumerate(recipe.steps):
        cls = get_operator(step.op, tuple(recipe.imports))
        res = step_resources(step, recipe.imports)
        steps.append(
            {
                "stage": stage_name(i, step),
                "op": step.op,
                "params": step.params,
                "resources": dict(resource_fields(res, cls.stateful)),
                "overridden": sorted(step.resources),
            }
        )
    per_source = []
    for spec in recipe.sources:
        units = [u for u in plan if u["source"] == spec.name]
        per_source.append(
            {
                "name": spec.name,
                "type": spec.type,
                "path": spec.path,
                "units": [{"id": u["id"], "reads": describe_unit(u)} for u in units],
                "inputs": sum(u["limit"] for u in units) if recipe.sample_limit else None,
            }
        )
    kind = executor or recipe.executor.get("type", "ray")
    return {
        "name": recipe.name,
        "config_hash": recipe.config_hash(),
        "output": recipe.output,
        "output_exists": started,
        "committed_units": committed,
        "limit": recipe.sample_limit,
        "executor": {"type": kind, **{k: v for k, v in recipe.executor.items() if k != "type"}},
        "sources": per_source,
        "units": len(plan),
        "steps": steps,
    }


def format_dry_run(summary: dict[str, Any], units_shown: int = UNITS_SHOWN) -> str:
    out = [f"{summary['name']}: recipe valid (config hash {summary['config_hash']}); dry run, nothing written"]
    if summary["output_exists"]:
        out.append(f"output: {summary['output']} (exists: {summary['committed_units']} units committed)")
    else:
        out.append(f"output: {summary['output']} (would be created)")
    if summary["limit"]:
        out.append(f"limit: the first {summary['limit']} inputs of each source (a scratch run)")
    settings = ", ".join(f"{k} {v}" for k, v in summary["executor"].items() if k != "type")
    out.append(f"executor: {summary['executor']['type']}" + (f" ({settings})" if settings else ""))
    out += ["", f"sources: {len(summary['sources'])}, {summary['units']} work units"]
    for s in summary["sources"]:
        inputs = f", {s['inputs']} inputs" if s["inputs"] is not None else ""
        units = f"{len(s['units'])} unit{'s' if len(s['units']) != 1 else ''}"
        out.append(f"  {s['name']} ({s['type']}, {s['path']}): {units}{inputs}")
        for u in s["units"][:units_shown]:
            out.append(f"    {u['id']}: {u['reads']}")
        if len(s["units"]) > units_shown:
            out.append(f"    ... and {len(s['units']) - units_shown} more units")
    out += ["", f"steps: {len(summary['steps'])}" + ("" if summary["steps"] else " (ingest and shard only)")]
    for i, st in enumerate(summary["steps"], 1):
        params = ", ".join(f"{k}={v!r}" for k, v in st["params"].items()) or "defaults"
        out.append(f"  {i}. {st['op']} ({params})")
        res = "; ".join(f"{k} {v}" for k, v in st["resources"].items())
        over = f"  [from the recipe: {', '.join(st['overridden'])}]" if st["overridden"] else ""
        out.append(f"     {res}{over}")
    return "\n".join(out)
