"""Runs end to end: local loop and Ray Data give the same shards; resume; refusal; audit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import ResumeRefused, RunDir
from shards.manifest import read_shardset_manifest
from shards.reader import iter_samples
from tests.conftest import DEMO_BAD, DEMO_INPUTS, demo_recipe_dict


def shard_ids(run: Path) -> list[str]:
    return [s["id"] for tar in sorted((run / "shards").glob("*.tar")) for s in iter_samples(str(tar))]


def test_local_run_accounts_for_every_input(demo_recipe) -> None:
    manifest = run_recipe(demo_recipe, executor="local", progress=False)
    total = sum(DEMO_INPUTS.values())
    assert manifest["ingested"] == total
    run = Path(demo_recipe.output)
    ledger = RunDir(str(run)).read_ledger()
    ids = shard_ids(run) + ledger["id"].to_pylist()
    assert len(ids) == total and len(set(ids)) == total, "every input exactly once in shards or ledger"
    locators = set(ledger["locator"].to_pylist())
    assert {b.split(".")[0] for b in DEMO_BAD} <= locators
    assert Counter(ledger["stage"].to_pylist()) == {"ingest": 4, "00-validate": 2}
    assert manifest["written"] == len(shard_ids(run)) == total - 6
    report = audit(str(run))
    assert report.balanced, report.summary()
    shardset = read_shardset_manifest(str(run / "shards"))
    assert shardset["totals"]["samples"] == manifest["written"]
    assert set(shardset["totals"]["kinds"]) == {
        "asr",
        "image_caption",
        "interleaved_image_text",
        "text",
        "video_caption",
    }
    assert all(s["samples"] <= 4 for s in shardset["shards"])


def test_rerun_skips_committed_work_and_changed_recipe_is_refused(demo_sources, tmp_path: Path) -> None:
    doc = demo_recipe_dict(demo_sources, tmp_path / "run")
    recipe = recipe_from_dict(doc)
    run_recipe(recipe, executor="local", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "shards").glob("*.tar")}
    again = run_recipe(recipe, executor="local", progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "shards").glob("*.tar")}
    assert before == after and again["written"] == len(shard_ids(tmp_path / "run"))
    doc["shards"]["max_samples"] = 7
    with pytest.raises(ResumeRefused, match="different recipe"):
        run_recipe(recipe_from_dict(doc), executor="local", progress=False)


def test_ray_executor_writes_the_same_shards_as_the_local_loop(demo_sources, tmp_path: Path, ray_local) -> None:
    local = recipe_from_dict(demo_recipe_dict(demo_sources, tmp_path / "local"))
    on_ray = recipe_from_dict(demo_recipe_dict(demo_sources, tmp_path / "ray", executor="ray"))
    run_recipe(local, executor="local", progress=False)
    m = run_recipe(on_ray, progress=False)
    assert m["ingested"] == sum(DEMO_INPUTS.values())
    a = read_shardset_manifest(str(tmp_path / "local" / "shards"))["shards"]
    b = read_shardset_manifest(str(tmp_path / "ray" / "shards"))["shards"]
    assert [(s["path"], s["sha256"]) for s in a] == [(s["path"], s["sha256"]) for s in b]
    assert audit(str(tmp_path / "ray")).balanced


def test_a_failing_row_is_rejected_not_the_run(demo_sources, tmp_path: Path, ray_local) -> None:
    doc = demo_recipe_dict(demo_sources, tmp_path / "run", executor="ray")
    doc["pipeline"].append({"op": "test_explodes_on_cats"})
    doc["imports"] = ["tests.ops_for_tests"]
    m = run_recipe(recipe_from_dict(doc), progress=False)
    ledger = RunDir(str(tmp_path / "run")).read_ledger().to_pylist()
    errors = [r for r in ledger if r["reason"] == "operator error"]
    assert [r["locator"] for r in errors] == ["chelsea"]
    assert "cats are not allowed" in errors[0]["detail"] and errors[0]["stage"] == "01-test_explodes_on_cats"
    assert m["ingested"] == m["written"] + m["rejected"]
    sample = next(iter_samples(str(next((tmp_path / "run" / "shards").glob("*.tar")))))
    assert sample["cat_free"] is True, "score columns travel into the shard"


def test_model_steps_cannot_starve_a_small_cluster(demo_sources, tmp_path: Path, ray_local) -> None:
    """Three actor steps of one CPU each on 2 CPUs: reservations shrink so read/write tasks still run."""
    from pipelines.operator import get_operator
    from pipelines.ray_executor import cpu_reservations

    ops = [get_operator(n, ("tests.ops_for_tests",)) for n in ("validate", "test_holds_a_model", "test_holds_a_model")]
    resources, stateful, single = [op.resources for op in ops], [op.stateful for op in ops], [(1, 1)] * 3
    assert cpu_reservations(resources, stateful, single, 8.0) == [1.0, 1.0, 1.0]
    small = cpu_reservations(resources, stateful, single, 2.0)
    assert small[0] == 1.0 and sum(small[1:]) == pytest.approx(1.0)
    doc = demo_recipe_dict(demo_sources, tmp_path / "run", executor="ray")
    doc["imports"] = ["tests.ops_for_tests"]
    doc["pipeline"] += [{"op": "test_holds_a_model", "params": {"column": c}} for c in ("a", "b", "c")]
    m = run_recipe(recipe_from_dict(doc), progress=False)  # actors holding every CPU hung bench/e2e_bench.py
    assert m["written"] > 0 and m["ingested"] == m["written"] + m["rejected"]
