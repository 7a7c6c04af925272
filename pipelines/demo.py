"""``omni demo``: build real multimodal sources, run the pipeline on a local Ray, show the result."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from pipelines.audit import audit
from pipelines.demo_data import build_demo_sources
from pipelines.executor import run_recipe
from pipelines.inspect_shards import inspect_target
from pipelines.recipe import load_recipe


def demo_recipe(sources: dict[str, str], output: str, executor: str) -> dict:
    return {
        "name": "demo",
        "output": output,
        "sources": [
            {"name": "media", "type": "local", "path": sources["media"], "unit_size": 8},
            {"name": "docs", "type": "jsonl", "path": sources["docs"], "unit_bytes": 2048},
            {"name": "pairs", "type": "parquet", "path": sources["pairs"]},
            {"name": "wds", "type": "webdataset", "path": sources["wds"]},
        ],
        "pipeline": [{"op": "validate", "params": {"max_pixels": 16_000_000}}],
        "shards": {"max_samples": 16, "max_bytes": "64MB"},
        "executor": {"type": executor, "num_cpus": 2, "object_store_memory": "512MB"},
    }


def run_demo(out: str, executor: str = "ray") -> int:
    t0 = time.perf_counter()
    root = Path(out).resolve()
    sources = build_demo_sources(root / "sources")
    recipe_path = root / "demo.yaml"
    run_dir = root / "run"
    recipe_path.write_text(yaml.safe_dump(demo_recipe(sources, str(run_dir), executor), sort_keys=False))
    t1 = time.perf_counter()
    print(f"built demo sources in {root / 'sources'} ({t1 - t0:.1f}s)")
    manifest = run_recipe(load_recipe(str(recipe_path)))
    t2 = time.perf_counter()
    print(f"ran recipe {recipe_path} on {executor} ({t2 - t1:.1f}s)")
    print(inspect_target(str(run_dir), limit=4))
    report = audit(str(run_dir))
    print(report.summary())
    print(f"shards: {run_dir / 'shards'}  (manifest: {run_dir / 'shards' / 'manifest.json'})")
    print(f"rejects ledger: {run_dir / 'rejects'}  ({manifest['rejected']} rejected)")
    print(f"try: omni inspect {run_dir}   omni audit {run_dir}")
    print(f"demo wall time {time.perf_counter() - t0:.1f}s")
    return 0 if report.balanced else 1
