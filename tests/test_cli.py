"""The ``omni`` command as a user types it: run, inspect, audit, and one-line errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import main
from pipelines.errors import describe_error
from tests.conftest import DEMO_INPUTS, demo_recipe_dict

REPO = Path(__file__).resolve().parents[1]


def test_run_inspect_audit(demo_sources, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(demo_recipe_dict(demo_sources, "run")))  # relative to the recipe
    assert main(["run", str(recipe), "-q"]) == 0
    out = capsys.readouterr().out
    total = sum(DEMO_INPUTS.values())
    assert f"ingested {total}, written {total - 6}, rejected 6" in out
    run = tmp_path / "run"
    assert main(["inspect", str(run), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"samples: {total - 6}" in out and "kinds:" in out and out.count("\n- ") == 2
    first_tar = sorted((run / "shards").glob("*.tar"))[0]
    assert main(["inspect", str(first_tar)]) == 0
    assert "1 shard(s)" in capsys.readouterr().out
    assert main(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"balanced: ingested {total} = written {total - 6} + rejected 6")
    assert "× unsafe tar member: parent path" in out
    (run / "units" / sorted(p.name for p in (run / "units").iterdir())[0]).unlink()
    assert main(["audit", str(run)]) == 1
    assert "NOT balanced" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path: Path) -> None:
    def omni(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True)

    r = omni("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("omni: error: no such recipe file")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"output": "o", "sources": [{"type": "jsonl", "path": "x"}], "pipeline": [{"op": "nope"}]})
    )
    (tmp_path / "x").write_text('{"text": "hi"}\n')
    r = omni("run", str(bad), "--executor", "local")
    assert r.returncode == 2 and r.stderr.startswith("omni: error: pipeline[0]: unknown operator 'nope'")
    assert not (tmp_path / "o").exists(), "a bad recipe leaves no run directory behind"
    r = omni("inspect", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no shards found" in r.stderr
    r = omni("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def _omni_run(
    recipe: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None, executor: str = "local"
) -> tuple[int, str]:
    """``omni run RECIPE --executor local`` in a subprocess: (exit status, stderr)."""
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(recipe), "--executor", executor, "-q"]
    r = subprocess.run([*(prefix or []), *cmd], capture_output=True, text=True, cwd=REPO, env=env)
    return r.returncode, r.stderr


def _write_recipe(path: Path, output: str, source: dict[str, Any], **extra: Any) -> Path:
    doc = {"name": "t", "output": output, "sources": [{"name": "docs", **source}], **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_disk_full_is_one_line(tmp_path: Path, executor: str) -> None:
    """A real ENOSPC: the output is a 256 KiB tmpfs (mounted in a private mount namespace) and the input ~800 KB.
    Under Ray the write task fails in a worker, whose exception reaches the driver without its cause."""
    if not _can_mount_tmpfs():
        pytest.skip("unshare -rm / mount -t tmpfs is not permitted here")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i} " + "word " * 400}) + "\n" for i in range(400)))
    small = tmp_path / "small"
    small.mkdir()
    ray = {"type": "ray", "num_cpus": 2, "object_store_memory": "256MB", "log_to_driver": False}
    source = {"type": "jsonl", "path": str(docs), "unit_bytes": "100KB"}
    recipe = _write_recipe(tmp_path / "r.yaml", str(small / "run"), source, executor=ray)
    mount = f'mount -t tmpfs -o size=256k tmpfs {small} && exec "$@"'
    status, stderr = _omni_run(recipe, prefix=["unshare", "-rm", "sh", "-c", mount, "sh"], executor=executor)
    assert status == 2, stderr
    line = f"omni: error: disk full: {small / 'run'} (free some space or choose another --output)\n"
    if executor == "local":
        assert stderr == line
    else:  # Ray logs its own start-up lines; the failure itself is still one line, no traceback
        assert stderr.endswith(line) and "Traceback" not in stderr, stderr


def test_output_on_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "taken").write_text("a file, not a folder")
    source = {"type": "jsonl", "path": "docs.jsonl"}
    status, stderr = _omni_run(_write_recipe(tmp_path / "a.yaml", "taken/run", source))
    assert (status, stderr) == (
        2,
        f"omni: error: not a directory: {tmp_path / 'taken' / 'run'} (a part of it is a file, not a folder)\n",
    )
    status, stderr = _omni_run(_write_recipe(tmp_path / "b.yaml", "taken", source))
    assert (status, stderr) == (
        2,
        f"omni: error: file exists: {tmp_path / 'taken'} (a file is where a folder must go)\n",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_with_auth(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 on loopback that checks credentials (it accepts any by default)."""
    from moto import settings
    from moto.server import ThreadedMotoServer

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # read on every request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}


FAST_S3 = {"config_kwargs": {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}}


def test_wrong_s3_credentials_are_one_line(s3_with_auth: str, tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hi"}\n')
    storage = {"endpoint_url": s3_with_auth, "key": "AKIAWRONGWRONGWRONG1", "secret": "not-the-secret", **FAST_S3}
    source = {"type": "jsonl", "path": "docs.jsonl"}
    status, stderr = _omni_run(
        _write_recipe(tmp_path / "r.yaml", "s3://corpus/run", source, storage=storage), _s3_env()
    )
    refused = (  # a PUT or LIST names the reason; a HEAD (is the run started?) gets a bare 403
        "omni: error: S3 rejected the credentials (InvalidAccessKeyId): check storage key and secret "
        "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)\n",
        "omni: error: S3 denied access (403 Forbidden): "
        "check the credentials (storage key, secret) and the bucket policy\n",
    )
    assert status == 2 and stderr in refused, stderr
    source = {"type": "jsonl", "path": "s3://corpus/docs.jsonl"}  # a HEAD: S3 sends 403 and no reason
    status, stderr = _omni_run(_write_recipe(tmp_path / "s.yaml", "run", source, storage=storage), _s3_env())
    assert (status, stderr) == (
        2,
        "omni: error: S3 denied access (403 Forbidden): "
        "check the credentials (storage key, secret) and the bucket policy\n",
    )
    assert not (tmp_path / "run").exists()


def test_missing_s3_bucket_is_one_line(s3_with_auth: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # any credentials do
    (tmp_path / "docs.jsonl").write_text('{"text": "hi"}\n')
    storage = {"endpoint_url": s3_with_auth, "key": "k", "secret": "s", **FAST_S3}
    source = {"type": "jsonl", "path": "docs.jsonl"}
    status, stderr = _omni_run(
        _write_recipe(tmp_path / "r.yaml", "s3://nobucket/run", source, storage=storage), _s3_env()
    )
    assert (status, stderr) == (2, "omni: error: no such S3 bucket nobucket: create it or fix the path\n")


def test_unreachable_s3_endpoint_is_one_line(tmp_path: Path) -> None:
    port = _free_port()  # bound, then closed: nobody listens there
    storage = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s", **FAST_S3}
    source = {"type": "jsonl", "path": "s3://corpus/docs.jsonl"}
    recipe = _write_recipe(tmp_path / "r.yaml", "s3://corpus/run", source, storage=storage)
    status, stderr = _omni_run(recipe, env=_s3_env())
    assert (status, stderr) == (
        2,
        f"omni: error: cannot reach S3 endpoint http://127.0.0.1:{port}: check storage endpoint_url and the network\n",
    )


def test_describe_error_looks_through_wrappers() -> None:
    """Errors from Ray tasks arrive as RayTaskError (``cause``) and chained exceptions; bugs stay None."""
    from ray.exceptions import RayTaskError

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RayTaskError("write", "Traceback ...", full)
    assert describe_error(wrapped, "/runs/a") == "disk full: /runs/a (free some space or choose another --output)"
    assert describe_error(wrapped.as_instanceof_cause(), "/runs/a").startswith("disk full: /runs/a")
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/data/secret.jsonl")
        except PermissionError as e:
            raise RuntimeError("unit failed") from e
    except RuntimeError as chained:
        assert describe_error(chained) == "permission denied: /data/secret.jsonl (check its permissions)"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/a/shards/x.tar")
    assert (
        describe_error(quota)
        == "disk quota exceeded: /runs/a/shards/x.tar (free some space or choose another --output)"
    )
    assert describe_error(IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/a/run.json")) == (
        "is a directory: /runs/a/run.json (it must be a file)"
    )
    assert describe_error(RayTaskError("f", "tb", KeyError("bug"))) is None
    assert describe_error(ZeroDivisionError("bug")) is None
    assert describe_error(BrokenPipeError(errno.EPIPE, "Broken pipe")) is None
