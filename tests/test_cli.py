"""The ``omni`` command as a user types it: run, inspect, audit, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from tests.conftest import DEMO_INPUTS, demo_recipe_dict


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
    assert r.returncode == 2 and r.stderr.startswith("omni: error: unknown operator 'nope'")
    assert not (tmp_path / "o").exists(), "a bad recipe leaves no run directory behind"
    r = omni("inspect", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no shards found" in r.stderr
    r = omni("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
