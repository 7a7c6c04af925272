"""The wheel works outside the checkout: built from the sources, installed into a fresh venv, run from
another directory with the checkout off ``sys.path``, it finds its configs (``omnicorpus_conf``) and
``omni train 1.1 --smoke`` trains the tiny stage on the sample shard set it builds.

The fresh venv sees the test venv's site-packages through a ``.pth`` path line (so torch, DeepSpeed and
Ray are not installed again); path lines do not run that directory's own ``.pth`` files, so the
checkout's editable install stays inactive there, and the test checks where every module came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("shards", "pipelines", "filters", "synth", "trainer")


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMNI_SHARDS", "OMNI_RUNS", "VIRTUAL_ENV")}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"  # build from a copy: no build/ or egg-info left in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("conf", *PACKAGE_ROOTS):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = root / "dist"
    env = clean_env()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
        ],
        root,
        env,
    )
    (wheel,) = dist.glob("omnicorpus-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, env)
    py = venv / "bin" / "python"
    site = Path(
        run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root, env).stdout.strip()
    )
    (site / "omni_test_parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: the test venv's editable omnicorpus is visible here and must be neither reused
    # nor uninstalled
    run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], root, env)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"wheel": wheel, "python": py, "bin": venv / "bin", "site": site, "cwd": elsewhere}


def test_the_wheel_holds_every_package_and_config(installed: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for pkg in PACKAGE_ROOTS:  # pyproject lists packages by hand: a new subpackage must be added there
        for f in (REPO / pkg).rglob("*"):  # and package-data lists file types: a new asset type too
            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".md"):
                assert f.relative_to(REPO).as_posix() in names, f"{f} is not in the wheel"
    for f in (REPO / "conf").rglob("*"):
        if f.is_file():
            assert "omnicorpus_conf/" + f.relative_to(REPO / "conf").as_posix() in names, f"{f} is not in the wheel"
    assert "pipelines/viewer.html" in names


def test_installed_package_finds_its_configs_outside_the_checkout(installed: dict[str, Path]) -> None:
    code = """
import json, sys
import trainer, trainer.stages as st
from trainer.stages import CONF_DIR, discover_stages, load_model_config, load_deepspeed_config, resolve_stage_ref
print(json.dumps({
    "trainer": trainer.__file__, "conf": str(CONF_DIR), "path": sys.path,
    "stages": [s.stage for s in discover_stages(CONF_DIR / "stages")],
    "tiny": load_model_config("tiny")["name"], "zero2": sorted(load_deepspeed_config("zero2")),
    "1.1": str(resolve_stage_ref("1.1")),
}))
"""
    out = json.loads(run([str(installed["python"]), "-c", code], installed["cwd"], clean_env()).stdout)
    site = str(installed["site"])
    assert out["trainer"].startswith(site) and out["conf"] == str(installed["site"] / "omnicorpus_conf")
    assert not any(p and Path(p).resolve() == REPO for p in out["path"]), "the checkout is on sys.path"
    assert out["stages"] == ["0.1", "0.2", "0.3", "1.1", "1.2", "2.1", "2.2", "3", "4.1", "4.2"]
    assert out["tiny"] == "tiny" and "zero_optimization" in out["zero2"]
    assert out["1.1"] == str(installed["site"] / "omnicorpus_conf" / "stages" / "1.1-image-projector.yaml")


def test_installed_omni_train_smoke_runs_from_another_directory(installed: dict[str, Path]) -> None:
    cwd = installed["cwd"]
    env = clean_env(HF_HUB_OFFLINE="1", PATH=f"{installed['bin']}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = run([str(installed["bin"] / "omni"), "train", "1.1", "--smoke"], cwd, env, timeout=300)
    out = proc.stdout
    assert "smoke: stage 1.1 trained in" in out, out[-3000:] + proc.stderr[-3000:]
    assert "-> sample set" in out  # no OMNI_SHARDS: the mixture was pointed at the sample shards
    stage_dir = cwd / "runs" / "smoke" / "run" / "1.1"
    assert (stage_dir / "final" / "done.json").is_file() and (stage_dir / "final" / "model.pt").is_file()
    assert len((stage_dir / "steps.jsonl").read_text().splitlines()) == 5
    smoke_yaml = (cwd / "runs" / "smoke" / "stages" / "1.1-image-projector.yaml").read_text()
    assert str(installed["site"] / "omnicorpus_conf" / "models" / "tiny.yaml") in smoke_yaml
