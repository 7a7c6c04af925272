"""Every step sized by the recipe (issue 13): ``resources`` override an operator's declared defaults,
GPU steps fill the GPUs a cluster has (4 logical GPUs in the session's local Ray), and a recipe that
asks for what the cluster cannot give is one line before anything runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipelines.executor import run_recipe
from pipelines.operator import Resources, get_operator
from pipelines.recipe import RecipeError, recipe_from_dict
from pipelines.units import step_resources
from shards.reader import iter_samples
from tests.conftest import demo_recipe_dict

IMPORTS = ("tests.ops_for_tests",)


def _recipe(demo_sources: dict[str, str], out: Path, executor: str, step: dict[str, Any]) -> dict[str, Any]:
    doc = demo_recipe_dict(demo_sources, out, executor=executor)
    doc["imports"] = list(IMPORTS)
    doc["pipeline"].append(step)
    return doc


def _shard_rows(run: Path, *columns: str) -> list[tuple[Any, ...]]:
    return [
        tuple(s.get(c) for c in columns)
        for tar in sorted((run / "shards").glob("*.tar"))
        for s in iter_samples(str(tar))
    ]


def test_recipe_resources_override_the_operators_defaults() -> None:
    doc = {
        "output": "/tmp/x",
        "sources": [{"type": "jsonl", "path": "/tmp/x.jsonl"}],
        "imports": list(IMPORTS),
        "pipeline": [
            {"op": "test_where_am_i"},
            {
                "op": "test_where_am_i",
                "resources": {"cpus": 2, "gpus": 0.5, "memory": "4GB", "batch_size": 32, "concurrency": [1, 16]},
            },
            {"op": "langid", "resources": {"concurrency": 3}},
        ],
    }
    recipe = recipe_from_dict(doc)
    declared, overridden, fixed = (step_resources(s, IMPORTS) for s in recipe.steps)
    assert declared == get_operator("test_where_am_i", IMPORTS).resources == Resources(cpus=1, gpus=1)
    assert overridden == Resources(cpus=2, gpus=0.5, memory_mb=4096, concurrency=(1, 16), batch_size=32)
    assert fixed.concurrency == 3 and fixed.memory_mb == get_operator("langid").resources.memory_mb
    # resources size the run, they do not change what it writes: a resume on another cluster is allowed
    doc["pipeline"][1]["resources"] = {"gpus": 1, "concurrency": 64}
    assert recipe_from_dict(doc).config_hash() == recipe.config_hash()


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"concurrency": [4, 1]}, "pipeline[0].resources.concurrency: expected a pool size N >= 1 or [min, max]"),
        ({"concurrency": 0}, "pipeline[0].resources.concurrency: expected a pool size"),
        ({"concurrency": [1, 2, 3]}, "pipeline[0].resources.concurrency: expected a pool size"),
        ({"gpus": -1}, "pipeline[0].resources.gpus: must be >= 0, got -1"),
        ({"gpus": "one"}, "pipeline[0].resources.gpus: expected a number >= 0, got 'one'"),
        ({"batch_size": 0}, "pipeline[0].resources.batch_size: must be > 0, got 0"),
        ({"memory": "lots"}, "pipeline[0].resources.memory: 'lots' is not a size"),
        ({"gpu": 1}, "pipeline[0].resources: unknown key 'gpu' (did you mean 'gpus'?)"),
    ],
)
def test_bad_resources_are_one_line_errors(resources: dict[str, Any], message: str) -> None:
    doc = {"output": "/tmp/x", "sources": [{"type": "jsonl", "path": "/x"}], "pipeline": [{"op": "langid"}]}
    doc["pipeline"][0]["resources"] = resources
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(doc)
    assert str(e.value).startswith(message)


def test_batch_size_caps_the_rows_of_every_call_in_the_local_executor(demo_sources, tmp_path: Path) -> None:
    step = {"op": "test_where_am_i", "resources": {"batch_size": 2}}
    m = run_recipe(recipe_from_dict(_recipe(demo_sources, tmp_path / "run", "local", step)), progress=False)
    rows = _shard_rows(tmp_path / "run", "call_rows")
    assert len(rows) == m["written"] > 4 and {r for (r,) in rows} <= {1, 2} and (2,) in rows


def test_a_gpu_step_with_an_autoscaling_pool_runs_on_four_actors(demo_sources, tmp_path: Path, ray_local) -> None:
    """``concurrency: [1, 4]`` on a cluster of 4 GPUs: 4 actors start, one GPU each, and share the work."""
    marks = tmp_path / "actors"
    marks.mkdir()
    pool = {"concurrency": [1, 4], "cpus": 0.1, "batch_size": 1}  # a row per call: every actor can get work
    step = {"op": "test_where_am_i", "params": {"delay_s": 0.3, "mark_dir": str(marks)}, "resources": pool}
    doc = _recipe(demo_sources, tmp_path / "run", "ray", step)
    m = run_recipe(recipe_from_dict(doc), progress=False)
    started = [p.name.split("-", 1)[1] for p in marks.iterdir()]
    # four actor processes, each given its own GPU (Ray may retire an idle one and start it again later)
    assert set(started) == {"gpu0", "gpu1", "gpu2", "gpu3"}, started
    workers = Counter(w for (w,) in _shard_rows(tmp_path / "run", "worker"))
    assert sum(workers.values()) == m["written"] and len(workers) >= 2, workers
    assert {r for (r,) in _shard_rows(tmp_path / "run", "call_rows")} == {1}
    assert m["ingested"] == m["written"] + m["rejected"]


def test_gpu_steps_fill_the_cluster_by_default() -> None:
    from pipelines.ray_executor import pool_sizes

    assert pool_sizes(Resources(gpus=1), share=1.0, cluster_gpus=64) == (64, 64)
    assert pool_sizes(Resources(gpus=0.5), share=1.0, cluster_gpus=4) == (8, 8)
    assert pool_sizes(Resources(cpus=2), share=30.0, cluster_gpus=0) == (1, 15)  # CPU models: up to their share
    assert pool_sizes(Resources(concurrency=(2, 6)), share=1.0, cluster_gpus=0) == (2, 6)
    assert pool_sizes(Resources(gpus=1, concurrency=3), share=1.0, cluster_gpus=64) == (3, 3)


def test_a_gpu_step_on_a_cluster_without_gpus_is_refused_before_it_waits_forever(tmp_path: Path) -> None:
    from pipelines.ray_executor import check_fits

    recipe = recipe_from_dict(
        {
            "output": str(tmp_path / "run"),
            "sources": [{"type": "jsonl", "path": "/x"}],
            "imports": list(IMPORTS),
            "pipeline": ["validate", {"op": "test_where_am_i", "resources": {"gpus": 2}}],
        }
    )
    resources = [step_resources(s, IMPORTS) for s in recipe.steps]
    with pytest.raises(Exception, match=r"pipeline\[1\] \(test_where_am_i\) asks for 2 GPUs per actor but the Ray "):
        check_fits(recipe, resources, {"CPU": 8.0})
    check_fits(recipe, resources, {"CPU": 8.0, "GPU": 2.0})


def test_cpu_steps_share_a_ray_stage_and_sized_steps_stand_alone() -> None:
    from pipelines.ray_executor import group_resources, stage_groups

    recipe = recipe_from_dict(
        {
            "output": "/tmp/x",
            "sources": [{"type": "jsonl", "path": "/x"}],
            "imports": list(IMPORTS),
            "pipeline": [
                "validate",
                "content_hash",
                "langid",
                "test_where_am_i",  # a GPU step: its own stage
                "text_quality",
                {"op": "count_tokens", "resources": {"concurrency": 2}},  # sized by the recipe: its own stage
                "keep",
            ],
        }
    )
    resources = [step_resources(s, IMPORTS) for s in recipe.steps]
    assert stage_groups(recipe.steps, resources) == [[0, 1, 2], [3], [4], [5], [6]]
    fused = group_resources(resources[:3])
    assert fused.cpus == 1 and fused.gpus == 0 and fused.memory_mb == sum(r.memory_mb for r in resources[:3])
