"""``omni run`` with ``--set`` (recipe overrides), ``--limit N`` (a scratch sample run) and ``--dry-run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.overrides import OverrideError, apply_override
from tests.conftest import DEMO_INPUTS, demo_recipe_dict


def _recipe(demo_sources: dict[str, str], tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    doc = demo_recipe_dict(demo_sources, "run")  # relative to the recipe: tmp_path/run
    doc["pipeline"] = ["validate", {"op": "keep", "params": {"column": "x", "min": 0}}]
    path.write_text(yaml.safe_dump(doc))
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_override_syntax_dicts_lists_and_yaml_values() -> None:
    doc = {"a": {"b": 1}, "steps": [{"op": "x", "params": {}}, {"op": "y"}], "n": None}
    apply_override(doc, "a.b=0.3")
    apply_override(doc, "a.c.d=[1, two]")
    apply_override(doc, "steps.0.params.threshold=0.25")
    apply_override(doc, "steps.-1.op=z")
    apply_override(doc, "n.m=true")  # a null on the way becomes a mapping
    apply_override(doc, "steps.1={op: w}")
    assert doc == {
        "a": {"b": 0.3, "c": {"d": [1, "two"]}},
        "steps": [{"op": "x", "params": {"threshold": 0.25}}, {"op": "w"}],
        "n": {"m": True},
    }
    for bad, why in [
        ("novalue", "is not KEY=VALUE"),
        ("steps.2.op=q", "steps has 2 items, no index 2"),
        ("steps.first.op=q", "steps is a list; 'first' is not an index"),
        ("a.b.c=1", "a.b is not a mapping or a list"),
        ("a.b=[1", "the value is not valid YAML"),
    ]:
        with pytest.raises(OverrideError, match=why.replace(".", r"\.").replace("[", r"\[")):
            apply_override(doc, bad)


def test_train_and_run_share_one_override() -> None:
    import trainer.stages

    assert trainer.stages.apply_override is apply_override


def test_set_is_checked_by_the_schema(
    demo_sources: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(demo_sources, tmp_path)
    cases = [
        (["--set", "shards.max_sample=3"], "shards: unknown key 'max_sample' (did you mean 'max_samples'?)"),
        (["--set", "sources.0.unit_size=0"], "sources[0].unit_size: must be > 0, got 0"),
        (["--set", "sources.1.unit_bytes=lots"], "sources[1].unit_bytes: 'lots' is not a size"),
        (
            ["--set", "pipeline.1.params.colum=y"],
            "pipeline[1] (keep): unknown parameter 'colum' (did you mean 'column'?)",
        ),
        (["--set", "pipeline.0.params.max_pixels=big"], "pipeline[0] (validate): parameter 'max_pixels' expects int"),
        (["--set", "pipeline.7.op=keep"], "--set: override 'pipeline.7.op=keep': pipeline has 2 items, no index 7"),
        (["--set", "executor.type=spark"], "executor.type: unknown type 'spark'"),
        (["--set", "shards"], "--set: override 'shards' is not KEY=VALUE"),
    ]
    for flags, message in cases:
        assert main(["run", str(recipe), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"omni: error: {message}") and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "run").exists()  # recipe mistakes fail before a run directory exists


def test_dry_run_plans_prints_and_writes_nothing(
    demo_sources: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(demo_sources, tmp_path)
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch_tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # so tempfile would follow TMPDIR
    before, sources_before = _files(tmp_path), _files(Path(demo_sources["media"]).parent)
    flags = ["--set", "pipeline.0.params.max_pixels=1000000", "--set", "pipeline.1.resources={cpus: 2, batch_size: 64}"]
    assert main(["run", str(recipe), "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    assert _files(tmp_path) == before and not (tmp_path / "run").exists()
    assert list(scratch_tmp.iterdir()) == []
    assert _files(Path(demo_sources["media"]).parent) == sources_before
    assert "t: recipe valid (config hash " in out and "dry run, nothing written" in out
    assert f"output: {tmp_path / 'run'} (would be created)" in out
    assert "executor: local (num_cpus 2, object_store_memory 536870912)" in out
    assert "sources: 4, " in out
    media = Path(demo_sources["media"])
    assert f"  media (local, {media}): 4 units" in out  # 20 inputs, unit_size 5
    assert ": 5 samples (" in out
    assert "docs (jsonl, " in out and " bytes 0-700" in out and "row group 0" in out and ".tar" in out
    assert "  wds (webdataset, " in out and "1 unit\n" in out
    assert "  1. validate (max_pixels=1000000)\n     cpus 1; gpus 0; memory -; batch_size a whole unit" in out
    assert "  2. keep (column='x', min=0)\n     cpus 2; gpus 0; memory -; batch_size 64" in out
    assert "[from the recipe: batch_size, cpus]" in out
    # a bad step fails the dry run as it fails a run, before anything exists
    assert main(["run", str(recipe), "--dry-run", "--set", "pipeline.1.op=kep"]) == 2
    assert capsys.readouterr().err == "omni: error: pipeline[1]: unknown operator 'kep' (did you mean 'keep'?)\n"
    assert _files(tmp_path) == before


def test_limit_runs_the_first_n_inputs_of_each_source_into_a_scratch_run(
    demo_sources: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(demo_sources, tmp_path)
    n = 7  # more than one unit of media (unit_size 5) and of docs (700-byte ranges); more than pairs holds
    flags = ["--limit", str(n), "-q", "--set", "pipeline=[validate]"]
    assert main(["run", str(recipe), *flags, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"-> {tmp_path / 'run'}-limit-{n}" in out and "(--limit: its first 5 inputs)" in out
    assert "(--limit: its first 2 inputs)" in out and not (tmp_path / f"run-limit-{n}").exists()

    assert main(["run", str(recipe), *flags]) == 0
    out = capsys.readouterr().out
    scratch = tmp_path / f"run-limit-{n}"
    expected = {source: min(n, total) for source, total in DEMO_INPUTS.items()}
    assert out.startswith(f"omni run --limit {n}: a scratch run of the first {n} inputs of each source -> {scratch}\n")
    assert f"ingested {sum(expected.values())}, " in out and out.rstrip().endswith(
        f"(limited to {n} inputs per source)"
    )
    assert not (tmp_path / "run").exists()  # the recipe's own output is never touched
    ingested: dict[str, int] = {}
    for marker in (scratch / "units").glob("*.json"):
        m = json.loads(marker.read_text())
        source = m["unit"].rsplit("-", 1)[0]
        ingested[source] = ingested.get(source, 0) + m["ingested"]
    assert ingested == expected  # inputs past the limit were not read: neither written nor rejected
    manifest = json.loads((scratch / "manifest.json").read_text())
    assert manifest["limit"] == {"inputs_per_source": n} and manifest["ingested"] == sum(expected.values())
    assert manifest["written"] + manifest["rejected"] == manifest["ingested"]
    assert json.loads((scratch / "run.json").read_text())["limit"] == {"inputs_per_source": n}
    assert json.loads((scratch / "shards" / "manifest.json").read_text())["limit"] == {"inputs_per_source": n}
    assert main(["audit", str(scratch)]) == 0
    assert capsys.readouterr().out.startswith(f"balanced: ingested {sum(expected.values())} = ")

    # the same command again resumes (everything committed); another N into the same folder is refused
    assert main(["run", str(recipe), *flags]) == 0
    assert f"ingested {sum(expected.values())}, " in capsys.readouterr().out
    assert main(["run", str(recipe), "--limit", "3", "--output", str(scratch), "--set", "pipeline=[validate]"]) == 2
    assert "was made by a different recipe" in capsys.readouterr().err


def test_limit_refuses_the_real_output_and_bad_counts(
    demo_sources: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(demo_sources, tmp_path)
    assert main(["run", str(recipe), "--limit", "2", "--output", str(tmp_path / "run")]) == 2
    assert "--limit writes a scratch run; --output must not be the recipe's output" in capsys.readouterr().err
    assert main(["run", str(recipe), "--limit", "0"]) == 2
    assert capsys.readouterr().err == "omni: error: --limit must be at least 1, not 0\n"
    assert not (tmp_path / "run").exists() and not any(p.name.startswith("run-limit") for p in tmp_path.iterdir())
    # --output given explicitly: used as it is
    assert main(["run", str(recipe), "--limit", "1", "--output", str(tmp_path / "sample"), "--dry-run"]) == 0
    assert f"-> {tmp_path / 'sample'}\n" in capsys.readouterr().out


def test_a_limited_plan_is_what_every_executor_reads(demo_recipe) -> None:
    """The limit travels in the plan's units (to Ray workers too): ``read_unit_table`` reads exactly that many."""
    from pipelines import sources
    from pipelines.units import read_unit_table

    demo_recipe.sample_limit = 3
    plan = sources.plan(demo_recipe)
    assert {u["source"] for u in plan} == set(DEMO_INPUTS) and all(u["limit"] >= 1 for u in plan)
    per_source: dict[str, int] = {}
    for unit in plan:
        rows = len(read_unit_table(json.loads(json.dumps(unit)), demo_recipe))
        assert rows == unit["limit"]
        per_source[unit["source"]] = per_source.get(unit["source"], 0) + rows
    assert per_source == dict.fromkeys(DEMO_INPUTS, 3)
    full = sources.plan(type(demo_recipe)(**{**vars(demo_recipe), "sample_limit": None}))
    assert "limit" not in full[0] and len(full) > len(plan)
