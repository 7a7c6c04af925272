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

from pipelines.audit import audit
from pipelines.rundir import RunDir
from shards.manifest import read_shardset_manifest
from shards.reader import iter_samples
from tests.conftest import N_CLIPS, UNIT_SIZE, write_speech_recipe


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
            done = len(list(units.glob("[!.]*.json"))) if units.is_dir() else 0  # not a marker mid-write
            if done >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = len(list(units.glob("[!.]*.json")))
    assert proc.returncode == -signal.SIGKILL
    assert 0 < committed < total_units, f"kill landed at {committed}/{total_units} units"
    return committed


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_killed_run_resumes_exactly(speech_dir: Path, uninterrupted: Path, tmp_path: Path, executor: str) -> None:
    total_units = -(-N_CLIPS // UNIT_SIZE)

    out = tmp_path / "killed"
    recipe = write_speech_recipe(tmp_path / "killed.yaml", speech_dir, out, executor)
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


def test_a_marker_cut_off_mid_write_is_not_a_commit(tmp_path: Path) -> None:
    """SIGKILL while a commit marker is written leaves an empty ``.tmp-`` file: it must neither
    count as committed nor break the resume that cleans it up."""
    from pipelines.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    run.commit_unit("a-0", {"shards": [], "ledger": []})
    (tmp_path / "run" / "units" / ".tmp-0123-b-0.json").write_bytes(b"")
    assert list(run.committed()) == ["a-0"]
    audit(str(tmp_path / "run"))  # raised JSONDecodeError on the empty file before
    assert run.clean_uncommitted() == 1
    assert sorted(p.name for p in (tmp_path / "run" / "units").iterdir()) == ["a-0.json"]
