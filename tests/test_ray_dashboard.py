"""``--dashboard`` serves Ray's dashboard on loopback behind Ray's token, and a local Ray starts quietly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PROBE = r"""
import json, sys, time, urllib.error, urllib.request
import ray
from pipelines.ray_executor import init_ray

port = int(sys.argv[1])
init_ray({"num_cpus": 1, "dashboard_port": port}, dashboard=True)

def get(headers):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/version", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None

deadline, result = time.monotonic() + 60, None
while time.monotonic() < deadline:
    try:
        result = {"anonymous": get({})[0]}
        break
    except OSError:  # the dashboard's server is still starting
        time.sleep(0.5)
import subprocess
token = subprocess.run([sys.argv[2], "get-auth-token"], capture_output=True, text=True).stdout.strip()
status, doc = get({"Authorization": f"Bearer {token}"})
result.update(signed_in=status, ray_version=(doc or {}).get("ray_version"))
print("RESULT " + json.dumps(result), flush=True)
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_on_loopback_needs_the_token_and_the_start_is_quiet(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}  # Ray writes its token under ~/.ray
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(port), str(BIN / "ray")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    hint = "(sign in with the token `ray get-auth-token` prints)"
    assert f"omni: Ray dashboard at http://127.0.0.1:{port} {hint}" in lines
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    assert result["anonymous"] == 401, result  # nobody on this machine reaches it without the token
    assert result["signed_in"] == 200 and result["ray_version"], result
    assert (tmp_path / ".ray" / "auth_token").is_file()
    assert "Token authentication" not in done.stderr, done.stderr[-2000:]  # Ray's per-start warning is gone
    assert "Started a local Ray instance" not in done.stderr + done.stdout
