"""A run killed mid-way (SIGKILL to the whole process group) and re-run loses and duplicates nothing.

The proof is strict: after the resume, the shards are byte-identical to those of a run that was
never interrupted, and every input id is in exactly one shard or in the ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.audit import audit
from pipelines.demo_data import asterisk_prompts
from pipelines.executor import run_recipe
from pipelines.recipe import load_recipe
from pipelines.rundir import RunDir
from shards.manifest import read_shardset_manifest
from shards.reader import iter_samples

N_CLIPS = 60
UNIT_SIZE = 3


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real recorded prompts with transcripts, plus a few broken clips to reject."""
    d = tmp_path_factory.mktemp("speech")
    prompts = asterisk_prompts(limit=N_CLIPS)
    for i, (wav, text) in enumerate(prompts):
        data = wav.read_bytes()
        if i % 10 == 7:
            data = data[: len(data) // 3]  # truncated: validate rejects it
        (d / f"{i:03d}-{wav.stem}.wav").write_bytes(data)
        (d / f"{i:03d}-{wav.stem}.txt").write_text(text)
    return d


def _write_recipe(path: Path, speech: Path, output: Path, executor: str) -> Path:
    doc = {
        "name": "killme",
        "output": str(output),
        "sources": [{"name": "speech", "type": "local", "path": str(speech), "unit_size": UNIT_SIZE}],
        "pipeline": [{"op": "validate", "params": {"threads": 1}}],
        "shards": {"max_samples": 2},
        "executor": {"type": executor, "num_cpus": 2, "object_store_memory": "256MB", "log_to_driver": False},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _kill_midway(recipe: Path, output: Path, total_units: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", str(recipe), "-q"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )
    units = output / "units"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            done = len(list(units.glob("*.json"))) if units.is_dir() else 0
            if done >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = len(list(units.glob("*.json")))
    assert proc.returncode == -signal.SIGKILL
    assert 0 < committed < total_units, f"kill landed at {committed}/{total_units} units"
    return committed


@pytest.fixture(scope="module")
def uninterrupted(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("clean")
    run_recipe(load_recipe(str(_write_recipe(d / "clean.yaml", speech_dir, d / "run", "local"))), progress=False)
    return d / "run"


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_killed_run_resumes_exactly(speech_dir: Path, uninterrupted: Path, tmp_path: Path, executor: str) -> None:
    total_units = -(-N_CLIPS // UNIT_SIZE)

    out = tmp_path / "killed"
    recipe = _write_recipe(tmp_path / "killed.yaml", speech_dir, out, executor)
    _kill_midway(recipe, out, total_units)
    assert not audit(str(out)).balanced, "an interrupted run must not pass the audit"

    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", str(recipe), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]

    report = audit(str(out))
    assert report.balanced, report.summary()
    assert report.ingested == N_CLIPS and report.committed_units == total_units
    ids = [s["id"] for tar in sorted((out / "shards").glob("*.tar")) for s in iter_samples(str(tar))]
    ledger = RunDir(str(out)).read_ledger()
    assert set(ledger["reason"].to_pylist()) == {"undecodable media"}
    everything = ids + ledger["id"].to_pylist()
    assert len(everything) == len(set(everything)) == N_CLIPS
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
    a = read_shardset_manifest(str(uninterrupted / "shards"))["shards"]
    b = read_shardset_manifest(str(out / "shards"))["shards"]
    assert [(s["path"], s["sha256"]) for s in a] == [(s["path"], s["sha256"]) for s in b]
