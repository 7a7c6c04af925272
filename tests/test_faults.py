"""Faults a real run meets, each ending in a one-line error or a listed, repaired problem.

Two ``omni run`` on one output (local and S3): the second is refused in one line naming the
holder and touches nothing; the lock of a SIGKILLed run is taken over. Damaged shards and ledger
parts: ``omni audit`` lists them, ``omni inspect`` reports them, ``omni run`` redoes exactly the
damaged units (``--repair`` also catches a flipped byte) and the shards come out byte-identical
to an undamaged run's.

The first run of a lock test is held inside its first unit by ``test_gate`` (an operator this
module registers, loaded by the recipe's ``imports`` like a user's own) until the test opens the
gate, so "while the first runs" never depends on timing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pytest
import yaml

from pipelines.audit import audit
from pipelines.cli import main
from pipelines.operator import Operator, register
from shards import storage
from shards.manifest import read_shardset_manifest
from tests.conftest import write_speech_recipe
from tests.test_s3 import s3_endpoint  # noqa: F401 - the moto server fixture, shared

REPO = Path(__file__).resolve().parents[1]
GATE_TIMEOUT_S = 300.0


@register
class Gate(Operator):
    """Holds the run until ``wait_for`` exists: a run that is certainly still running. It creates
    ``wait_for + ".reached"`` on arrival, so the test knows the run has written all it writes first."""

    name = "test_gate"

    def __init__(self, wait_for: str) -> None:
        super().__init__(wait_for=wait_for)
        self.wait_for = wait_for

    def __call__(self, batch: pa.Table) -> pa.Table:
        Path(self.wait_for + ".reached").touch()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not os.path.exists(self.wait_for):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {self.wait_for} never opened")
            time.sleep(0.02)
        return batch


# ---------------------------------------------------------------- helpers


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.txt").write_text(f"note number {i}: the run lock keeps two runs apart.\n")
    return d


def gated_recipe(path: Path, source: Path, output: str, gate: Path, storage: dict[str, Any] | None = None) -> Path:
    doc: dict[str, Any] = {
        "name": "gated",
        "output": output,
        "imports": ["tests.test_faults"],
        "sources": [{"name": "texts", "type": "local", "path": str(source), "unit_size": 2}],
        "pipeline": [{"op": "test_gate", "params": {"wait_for": str(gate)}}, {"op": "validate"}],
        "executor": {"type": "local"},
    }
    if storage:
        doc["storage"] = storage
    path.write_text(yaml.safe_dump(doc))
    return path


def omni(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def wait_at_gate(read: Any, proc: subprocess.Popen[str], gate: Path) -> dict[str, Any]:
    """The lock's holder info once ``proc`` holds the lock and waits at ``gate`` (``read()``
    returns the lock's bytes or None)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the first run ended early: {proc.communicate()}"
        data = read() if Path(f"{gate}.reached").exists() else None
        if data:
            holder = json.loads(data)
            assert holder["pid"] == proc.pid, holder
            return holder
        time.sleep(0.02)
    raise AssertionError("the first run never reached the gate")


def read_local(path: Path) -> Any:
    return lambda: path.read_bytes() if path.exists() else None


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_line_refusal(err: str, holder: dict[str, Any]) -> None:
    assert err.count("\n") == 1 and err.startswith("omni: error: run directory "), err
    assert f"in use by {holder['host']}:{holder['pid']} (started {holder['started']}" in err, err
    assert "Traceback" not in err


def wait_until(condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.2)


def server_age(head: dict[str, Any], since: Any = None) -> float:
    """Seconds from ``since`` (default: the object's LastModified) to now, on the S3 server's clock."""
    now = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (now - (since or head["LastModified"])).total_seconds()


# ---------------------------------------------------------------- the run lock, local


def test_second_run_is_refused_while_the_first_runs(text_dir: Path, tmp_path: Path) -> None:
    out, gate = tmp_path / "run", tmp_path / "gate"
    recipe = gated_recipe(tmp_path / "r.yaml", text_dir, str(out), gate)
    first = omni("run", str(recipe), "-q")
    try:
        holder = wait_at_gate(read_local(out / "lock.json"), first, gate)
        assert holder["host"] == socket.gethostname() and "run" in holder["command"]
        before = tree(out)
        rc, _, err = finish(omni("run", str(recipe), "-q"))
        assert rc == 2
        one_line_refusal(err, holder)
        assert tree(out) == before, "the refused run touched the run directory"
        gate.touch()
        rc, stdout, err = finish(first)
    finally:
        gate.touch()
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert rc == 0, err[-2000:]
    assert "ingested 6, written 6, rejected 0" in stdout
    assert audit(str(out)).balanced
    assert not (out / "lock.json").exists(), "a finished run releases its lock"


def test_a_killed_runs_lock_is_taken_over(text_dir: Path, tmp_path: Path) -> None:
    out, gate = tmp_path / "run", tmp_path / "gate"
    recipe = gated_recipe(tmp_path / "r.yaml", text_dir, str(out), gate)
    first = omni("run", str(recipe), "-q")
    try:
        holder = wait_at_gate(read_local(out / "lock.json"), first, gate)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert json.loads((out / "lock.json").read_bytes())["pid"] == holder["pid"], "a SIGKILLed run leaves its lock"
    gate.touch()
    rc, stdout, err = finish(omni("run", str(recipe), "-q"))
    assert rc == 0, err[-2000:]
    assert f"taking over the lock of {holder['host']}:{holder['pid']}" in err
    assert "ingested 6, written 6, rejected 0" in stdout
    assert audit(str(out)).balanced
    assert not (out / "lock.json").exists()


# ---------------------------------------------------------------- the run lock, S3


@pytest.mark.slow
def test_s3_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(
    s3_endpoint: str,  # noqa: F811
    text_dir: Path,
    tmp_path: Path,
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="locks")
    gate = tmp_path / "gate"
    recipe = gated_recipe(tmp_path / "r.yaml", text_dir, "s3://locks/run", gate, {"endpoint_url": s3_endpoint})
    ttl = {"OMNI_LOCK_TTL": "4"}  # heartbeat every second

    def lock_head() -> dict[str, Any]:
        return s3.head_object(Bucket="locks", Key="run/lock.json")

    def read_lock() -> bytes | None:
        try:
            return s3.get_object(Bucket="locks", Key="run/lock.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    def objects() -> dict[str, str]:
        listing = s3.list_objects_v2(Bucket="locks", Prefix="run/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listing if o["Key"] != "run/lock.json"}

    first = omni("run", str(recipe), "-q", env=ttl)
    try:
        holder = wait_at_gate(read_lock, first, gate)
        created = lock_head()["LastModified"]
        # outlive the TTL: from now on only the heartbeat keeps the lock fresh
        wait_until(lambda: server_age(lock_head(), created) > 5)
        before = objects()
        rc, _, err = finish(omni("run", str(recipe), "-q", env=ttl))
        assert rc == 2
        one_line_refusal(err, holder)
        assert objects() == before, "the refused run touched the run directory"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    wait_until(lambda: server_age(lock_head()) > 5)  # the dead run's heartbeat is over: its lock goes stale
    gate.touch()
    rc, stdout, err = finish(omni("run", str(recipe), "-q", env=ttl))
    assert rc == 0, err[-2000:]
    assert f"taking over the stale lock of {holder['host']}:{holder['pid']}" in err
    assert "ingested 6, written 6, rejected 0" in stdout
    assert read_lock() is None, "a finished run removes its lock"
    storage.configure(endpoint_url=s3_endpoint)
    assert audit("s3://locks/run").balanced


# ---------------------------------------------------------------- damage: audit, inspect, repair


def _units_of(run: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_bytes()) for p in sorted((run / "units").glob("*.json"))}


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture
def damaged_run(uninterrupted: Path, speech_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """A copy of the reference run with one truncated shard, one deleted shard, one shard with a
    flipped byte (same size), one truncated ledger part and one unreadable commit marker, each in
    a unit of its own; returns (run, recipe, {what: unit})."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    recipe = write_speech_recipe(tmp_path / "r.yaml", speech_dir, run, "local")
    units = _units_of(run)
    with_ledger = [u for u, m in units.items() if m["ledger"] and m["shards"]]
    plain = [u for u, m in units.items() if not m["ledger"] and len(m["shards"]) >= 1]
    picked = {"ledger": with_ledger[0], "truncated": plain[0], "deleted": plain[1], "flipped": plain[2]}
    picked["marker"] = plain[3]
    shard = run / "shards"
    t = shard / units[picked["truncated"]]["shards"][0]["path"]
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    (shard / units[picked["deleted"]]["shards"][-1]["path"]).unlink()
    f = shard / units[picked["flipped"]]["shards"][0]["path"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    ledger = run / "rejects" / units[picked["ledger"]]["ledger"][0]
    ledger.write_bytes(ledger.read_bytes()[:-40])
    (run / "units" / f"{picked['marker']}.json").write_bytes(b'{"unit": "cut off')
    yield run, recipe, picked


def test_damage_is_listed_and_redone_exactly(
    damaged_run: tuple[Path, Path, dict[str, str]],
    uninterrupted: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run, recipe, picked = damaged_run
    units = _units_of(uninterrupted)
    name = {k: units[u]["shards"][0]["path"] for k, u in picked.items()}
    name["deleted"] = units[picked["deleted"]]["shards"][-1]["path"]
    ledger_name = units[picked["ledger"]]["ledger"][0]

    assert main(["audit", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"problem: damaged shard {name['truncated']}: size " in out
    assert f"problem: damaged shard {name['deleted']}: missing" in out
    assert f"problem: damaged shard {name['flipped']}: sha256 mismatch" in out
    assert f"problem: unreadable ledger part {ledger_name}: " in out
    assert f"problem: unreadable commit marker units/{picked['marker']}.json" in out

    assert main(["inspect", str(run), "-n", "1"]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {run}/shards/{name['truncated']}: size " in out
    assert f"damaged: {run}/shards/{name['deleted']}: missing" in out
    assert main(["report", str(run), "--out", str(run.parent / "report")]) == 0
    page = (run.parent / "report" / "report.html").read_text(encoding="utf-8")
    assert "Damaged shards" in page and name["truncated"] in page, "the report leaves damaged shards out, listed"

    untouched = {p.name: _stat(p) for p in (run / "shards").glob("*.tar")}
    redo = {u for k, u in picked.items() if k != "flipped"}
    for u in redo:
        for s in units[u]["shards"]:
            untouched.pop(s["path"], None)
    caplog.set_level(logging.WARNING)
    assert main(["run", str(recipe), "-q", "--executor", "local"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("1 commit markers are unreadable" in w for w in warnings), warnings
    assert any(w.startswith("3 units have damaged shards (") and w.endswith("; redoing them") for w in warnings)
    assert {p: _stat(run / "shards" / p) for p in untouched} == untouched, "only the damaged units are redone"
    report = audit(str(run))
    assert report.problems == [f"damaged shard {name['flipped']}: sha256 mismatch"], "a same-size flip needs --repair"

    caplog.clear()
    assert main(["run", str(recipe), "-q", "--executor", "local", "--repair"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(w.startswith(f"1 unit has damaged shards ({name['flipped']}: sha256 mismatch") for w in warnings)
    report = audit(str(run))
    assert report.balanced, report.summary()
    a = read_shardset_manifest(str(uninterrupted / "shards"))
    b = read_shardset_manifest(str(run / "shards"))
    assert [(s["path"], s["sha256"]) for s in a["shards"]] == [(s["path"], s["sha256"]) for s in b["shards"]]
    for s in a["shards"]:
        assert (run / "shards" / s["path"]).read_bytes() == (uninterrupted / "shards" / s["path"]).read_bytes()
    assert sorted(p.name for p in (run / "rejects").iterdir()) == sorted(
        p.name for p in (uninterrupted / "rejects").iterdir()
    )
    assert main(["inspect", str(run)]) == 0


def test_shard_manifest_records_where_records_may_point(uninterrupted: Path, speech_dir: Path) -> None:
    assert read_shardset_manifest(str(uninterrupted / "shards"))["allow_uris"] == [str(speech_dir)]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, BytesIO(data))
    return buf.getvalue()


def test_inspect_reports_a_broken_foreign_tar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [("000.txt", b"a caption"), ("000.json", b'{"url": "x"}')]
    broken = _tar([*good, ("001.txt", b"another"), ("../001.json", b"{}")])
    (tmp_path / "hostile.tar").write_bytes(broken)
    (tmp_path / "cut.tar").write_bytes(_tar([*good, ("002.txt", b"x" * 4000)])[:2600])  # cut in 002.txt
    assert main(["inspect", str(tmp_path / "hostile.tar")]) == 1
    out = capsys.readouterr().out
    assert "damaged: " in out and "unsafe tar member" in out
    assert main(["inspect", str(tmp_path / "cut.tar")]) == 1
    out = capsys.readouterr().out
    assert "damaged: " in out and "truncated or corrupt tar" in out
