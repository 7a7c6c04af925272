"""The filter operators in a recipe run end to end (local executor), the example recipe's shape,
and ``omni dedup`` as the lead wires it (``filters.cli.register``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from filters.cli import load_config, register
from filters.dedup import DedupConfig
from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import load_recipe, recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.units import build_operator
from tests.conftest import DEMO_INPUTS, demo_recipe_dict

EXAMPLE = Path(__file__).resolve().parents[1] / "conf" / "recipes" / "filters-example.yaml"


def test_example_recipe_builds_every_operator_and_its_dedup_block() -> None:
    recipe = load_recipe(str(EXAMPLE))
    for step in recipe.steps:
        build_operator(step)  # constructing loads nothing; models load in setup()
    settings, executor = load_config(str(EXAMPLE))
    cfg = DedupConfig.from_dict(settings)
    assert cfg.minhash.verify == "exact" and cfg.phash.max_distance == 6 and executor["type"] == "ray"


def test_score_and_keep_steps_in_a_run_balance(demo_sources, tmp_path: Path) -> None:
    doc = demo_recipe_dict(demo_sources, tmp_path / "run")
    doc["pipeline"] += [
        {"op": "content_hash"},
        {"op": "langid"},
        {"op": "keep", "params": {"column": "lang_score", "min": 0.5, "reason": "low language confidence"}},
        {"op": "text_quality", "params": {"rules": ["gopher_length"], "kinds": ["text"]}},
        {"op": "keep", "params": {"column": "q_words", "min": 14, "reason": "too few words"}},
        {"op": "media_quality", "params": {"silence": False}},
        {"op": "keep", "params": {"column": "image_min_side", "min": 200, "reason": "image too small"}},
    ]
    manifest = run_recipe(recipe_from_dict(doc), executor="local", progress=False)
    assert manifest["ingested"] == sum(DEMO_INPUTS.values())
    report = audit(str(tmp_path / "run"))
    assert report.balanced, report.summary()
    ledger = RunDir(str(tmp_path / "run")).read_ledger().to_pylist()
    by_reason = {r["reason"]: r for r in ledger}
    assert {"too few words", "image too small"} <= set(by_reason)
    assert by_reason["too few words"]["detail"].startswith("q_words=")
    assert by_reason["too few words"]["stage"].endswith("-keep")
    # score columns travel with the kept samples into the shards
    from shards.reader import iter_samples

    sample = next(
        s for t in sorted((tmp_path / "run" / "shards").glob("*.tar")) for s in iter_samples(str(t)) if s.get("lang")
    )
    assert {"lang", "lang_score", "text_hash", "segment_langs"} <= set(sample)


def test_omni_dedup_command(tmp_path: Path, demo_sources, ray_local, capsys) -> None:
    parser = argparse.ArgumentParser(prog="omni")
    register(parser.add_subparsers(dest="command", required=True))
    run = tmp_path / "run"
    doc = demo_recipe_dict(demo_sources, run)
    doc["pipeline"] = []
    run_recipe(recipe_from_dict(doc), executor="local", progress=False)
    config = tmp_path / "dedup.yaml"
    config.write_text(yaml.safe_dump({"chromaprint": False, "partitions": 2}))
    args = parser.parse_args(["dedup", str(run), "--config", str(config), "--json", "-q"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("dedup: ") and json.loads(out.split("\n", 1)[1])["samples"] > 0
    assert audit(str(run)).balanced
    bad = parser.parse_args(["dedup", str(tmp_path / "nothing-here")])
    assert bad.fn(bad) == 2 and "omni: error:" in capsys.readouterr().err
    shard = sorted((run / "shards").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])  # truncated: refused before any Ray task reads it
    assert args.fn(args) == 2
    err = capsys.readouterr().err
    assert f"omni: error: {run}: damaged shard {shard.name} (size 700 B, manifest says" in err


@pytest.mark.parametrize("doc", [{"minhash": {"verify": "guess"}}, {"phash": {"radius": 3}}])
def test_bad_dedup_config_is_a_user_error(doc, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DedupConfig.from_dict(doc)
