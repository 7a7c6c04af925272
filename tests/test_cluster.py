"""A real two-node Ray cluster on loopback: ``ray start --head`` plus a worker node process, the
pipeline submitted with ``ray job submit``, the worker node killed mid-run. The job finishes or is
resubmitted, and the shards equal those of an uninterrupted run: nothing lost, nothing duplicated."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.audit import audit
from shards.manifest import read_shardset_manifest
from tests.conftest import N_CLIPS, UNIT_SIZE, write_speech_recipe
from tests.ray_worker_node import free_ports

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps every address on 127.0.0.1
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _nodes_alive(gcs: str) -> int:
    out = subprocess.run(
        [str(BIN / "ray"), "status", "--address", gcs], capture_output=True, text=True, env=ENV, timeout=60
    ).stdout
    active = out.split("Active:")[-1].split("Pending:")[0] if "Active:" in out else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, str, int]:
    """``ray start --head`` with every port it binds chosen free here, so a Ray another test left
    running (the session's local Ray) cannot collide on a default port; retried when a port we
    picked was taken in between. Its output goes to a log quoted on failure."""
    log = Path(temp_dir) / "head.log"
    for _attempt in range(3):
        gcs_port, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
        with open(log, "ab") as out:
            head = subprocess.Popen(
                [
                    str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=1",
                    "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    "--include-dashboard=true", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
                    f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                    "--min-worker-port=40000", "--max-worker-port=40999", "--object-store-memory=268435456",
                    "--disable-usage-stats",
                ],
                env=ENV, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        gcs = f"127.0.0.1:{gcs_port}"
        deadline = time.monotonic() + 120
        while head.poll() is None and _nodes_alive(gcs) < 1:
            assert time.monotonic() < deadline, "head node did not start: " + log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        if head.poll() is None:
            return head, gcs, dash
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever the failed start left behind
    raise AssertionError("head node did not start: " + log.read_text(errors="replace")[-3000:])


def _start_worker(gcs: str, temp_dir: str, deadline: float) -> subprocess.Popen:
    """The second node, retried when it exits during start-up (its log is quoted if all fail)."""
    log = Path(temp_dir) / "worker.log"
    for _attempt in range(3):
        with open(log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tests.ray_worker_node", gcs, "1", temp_dir, "41000"],
                env=ENV, cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        while worker.poll() is None and _nodes_alive(gcs) < 2:
            assert time.monotonic() < deadline, "worker node did not join: " + log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        if worker.poll() is None:
            return worker
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
    raise AssertionError("worker node did not join: " + log.read_text(errors="replace")[-3000:])


@pytest.fixture
def cluster() -> Iterator[dict[str, str]]:
    temp_dir = tempfile.mkdtemp(prefix="omniray-", dir="/tmp")  # short: Ray's socket paths have a limit
    head, gcs, dash_port = _start_head(temp_dir)
    worker = None
    try:
        deadline = time.monotonic() + 120
        worker = _start_worker(gcs, temp_dir, deadline)
        yield {"gcs": gcs, "dashboard": f"http://127.0.0.1:{dash_port}", "worker_pgid": str(worker.pid)}
    finally:
        for proc in (worker, head):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _job(dashboard: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ray"), "job", command, "--address", dashboard, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def _submit(dashboard: str, job_id: str, entry: list[str]) -> None:
    """Submit, retrying while the head's job agent is still starting."""
    deadline = time.monotonic() + 120
    while True:
        r = _job(dashboard, "submit", "--no-wait", "--submission-id", job_id, "--", *entry)
        if r.returncode == 0:
            return
        assert "No available agent" in r.stderr and time.monotonic() < deadline, r.stderr[-2000:]
        time.sleep(2)


def _state(dashboard: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(job_id).value)


def _wait_job(dashboard: str, job_id: str, timeout_s: float = 400) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _state(dashboard, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish: {_job(dashboard, 'logs', job_id).stdout[-2000:]}")


@pytest.mark.slow
def test_worker_node_killed_mid_run(cluster: dict[str, str], speech_dir: Path, uninterrupted: Path, tmp_path: Path):
    out = tmp_path / "run"
    recipe = write_speech_recipe(tmp_path / "cluster.yaml", speech_dir, out, "ray")
    entry = [sys.executable, "-m", "pipelines.cli", "run", str(recipe), "-q"]
    _submit(cluster["dashboard"], "omni-1", entry)
    units = out / "units"
    deadline = time.monotonic() + 300
    while not (units.is_dir() and any(units.iterdir())):
        failed = time.monotonic() > deadline or _state(cluster["dashboard"], "omni-1") in ("FAILED", "STOPPED")
        assert not failed, _job(cluster["dashboard"], "logs", "omni-1").stdout[-3000:]
        time.sleep(0.2)
    os.killpg(int(cluster["worker_pgid"]), signal.SIGKILL)
    total_units = -(-N_CLIPS // UNIT_SIZE)
    killed_at = len(list(units.iterdir()))
    state = _wait_job(cluster["dashboard"], "omni-1")
    if state != "SUCCEEDED":  # the documented recovery: submit the same command again
        assert (
            _job(cluster["dashboard"], "submit", "--no-wait", "--submission-id", "omni-2", "--", *entry).returncode == 0
        )
        assert _wait_job(cluster["dashboard"], "omni-2") == "SUCCEEDED", _job(
            cluster["dashboard"], "logs", "omni-2"
        ).stdout
    assert killed_at < total_units, "the worker node died while units were still running"
    report = audit(str(out))
    assert report.balanced and report.ingested == N_CLIPS, report.summary()
    a = read_shardset_manifest(str(uninterrupted / "shards"))["shards"]
    b = read_shardset_manifest(str(out / "shards"))["shards"]
    assert [(s["path"], s["sha256"]) for s in a] == [(s["path"], s["sha256"]) for s in b]
