"""Start the ranks of a training run: torchrun on one machine, the ``deepspeed`` launcher across machines.

Before any rank starts, the stages are validated and the tokenizer is made ready: a model config
with ``tokenizer.path: null`` (``tiny``) gets a byte-level BPE trained once on the mixture's texts
into ``<output>/tokenizer``; every rank and every later stage loads that same directory.

One machine (CPU or GPUs; ``DS_ACCELERATOR=cpu`` and gloo when there is no GPU)::

    omni train conf/stages/1.1-image-projector.yaml --nproc 2

Several machines (see trainer/README.md): a DeepSpeed hostfile lists ``host slots=N`` per line; the
``deepspeed`` launcher starts the ranks over ssh with the same command on every host::

    omni train-all --hostfile hosts.txt --master-addr 10.0.0.1

Torch extension builds: torch guards a JIT op build with a bare ``lock`` file in the op's build folder
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/pyXY_*``) and waits, silently and forever,
while it exists; a run killed mid-build leaves it behind. On CPU the ranks build nothing (see
``trainer.train.no_cpu_op_builds``); before any rank starts, a lock that no process on this machine
holds open (the builder keeps its descriptor open until it removes the file) is removed with a
warning, and in the ranks a wait on a lock ends after ``OMNI_BUILD_LOCK_TIMEOUT`` seconds (default
1200) with a one-line error instead of hanging.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from trainer.stages import StageConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("trainer.launch")
BUILD_LOCK_TIMEOUT_S = 1200.0
UNSURE_STALE_AFTER_S = 600.0  # when some processes cannot be inspected, only locks older than this go


class BuildLockTimeout(RuntimeError):
    """A rank waited too long on a torch extension build lock; the message is one line for the user."""


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, else its per-user cache folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """``lock`` files of op build folders: ``root/<op>/lock`` and, under the default root, ``root/pyXY_*/<op>/lock``."""
    if not root.is_dir():
        return []
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def lock_holders(lock: Path) -> tuple[list[int], bool]:
    """PIDs on this machine with ``lock`` open, and whether every process could be inspected.

    torch's ``FileBaton`` creates the lock with ``O_CREAT|O_EXCL`` and keeps that descriptor until the
    build ends and it deletes the file, so a lock nobody holds open was left by a killed builder."""
    target = os.path.realpath(lock)
    holders: list[int] = []
    complete = True
    proc = Path("/proc")
    for pid_dir in proc.iterdir() if proc.is_dir() else ():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except PermissionError:
            complete = False
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    holders.append(int(pid_dir.name))
                    break
            except OSError:
                continue
    return holders, complete and proc.is_dir()


def clear_stale_build_locks(root: Path | None = None) -> list[Path]:
    """Remove build locks left by killed builds (warning once each); returns the removed paths."""
    removed = []
    for lock in build_locks(root or extensions_root()):
        holders, complete = lock_holders(lock)
        if not holders:
            time.sleep(0.2)  # a finishing builder closes its descriptor just before deleting the file
            holders, complete = lock_holders(lock)
        if holders:
            log.warning("torch extension build running (pid %s) holds %s; this run may wait for it", holders, lock)
            continue
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        if not complete and age < UNSURE_STALE_AFTER_S:
            log.warning("cannot tell whether %s is held (some processes are not visible); left in place", lock)
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        removed.append(lock)
        log.warning("removed stale torch extension build lock %s (left by a killed build; no process holds it)", lock)
    return removed


def bound_build_waits(timeout: float | None = None) -> None:
    """Make torch's build-lock wait end after ``timeout`` s (``OMNI_BUILD_LOCK_TIMEOUT``) with ``BuildLockTimeout``."""
    from torch.utils import file_baton

    limit = float(timeout if timeout is not None else os.environ.get("OMNI_BUILD_LOCK_TIMEOUT", BUILD_LOCK_TIMEOUT_S))

    def wait(self: file_baton.FileBaton) -> None:
        deadline = time.monotonic() + limit
        while os.path.exists(self.lock_file_path):
            if time.monotonic() > deadline:
                raise BuildLockTimeout(
                    f"waited {limit:g} s on the torch extension build lock {self.lock_file_path}: another process "
                    "is building this op, or a killed build left the lock; remove it if no build is running"
                )
            time.sleep(self.wait_seconds)

    file_baton.FileBaton.wait = wait  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokenizer_dir(stages: list[StageConfig]) -> str:
    """The tokenizer every stage uses; trains the tiny one on the mixtures' texts when the config has none."""
    from trainer.data import corpus_texts
    from trainer.tokenizer import load_tokenizer, train_tiny_tokenizer

    cfg = stages[0].model_config()
    tok = cfg.get("tokenizer") or {}
    if tok.get("path"):
        path = str(tok["path"])
        if "${" in path:
            raise FileNotFoundError(f"tokenizer path {path} has an unset variable")
        load_tokenizer(path)  # fails early with a clear message
        return path
    out = Path(stages[0].output) / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        manifests = sorted({m for s in stages for e in s.mixture for m in (e.get("manifests") or [e["manifest"]])})
        out.parent.mkdir(parents=True, exist_ok=True)
        texts = corpus_texts(manifests, verify=stages[0].verify_shards)
        train_tiny_tokenizer(texts, out, int(tok.get("vocab_size", 2048)))
    return str(out)


def rank_env(cuda: bool, nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    return env


def command(
    stage_paths: list[str],
    overrides: list[str],
    tokenizer: str,
    nproc: int,
    hostfile: str | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    mixtures: str | None = None,
) -> list[str]:
    port = str(master_port or free_port())
    rank_args = ["--tokenizer", tokenizer]
    if mixtures:
        rank_args += ["--mixtures", str(Path(mixtures).resolve())]
    for p in stage_paths:
        rank_args += ["--stage", str(Path(p).resolve())]
    for o in overrides:
        rank_args += ["--set", o]
    if hostfile:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        return [
            launcher,
            "--hostfile",
            hostfile,
            "--master_addr",
            master_addr,
            "--master_port",
            port,
            "--module",
            "trainer.train",
            *rank_args,
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--nnodes",
        "1",
        "--master_addr",
        master_addr,
        "--master_port",
        port,
        "-m",
        "trainer.train",
        *rank_args,
    ]


def launch(
    stages: list[StageConfig],
    overrides: list[str],
    nproc: int | None = None,
    hostfile: str | None = None,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    mixtures: str | None = None,
) -> int:
    """Run the stages in order in one set of ranks; returns the launcher's exit status. ``mixtures``: a
    folder of ``omni plan --mixtures`` whose ``mixture-<stage>.yaml`` the ranks use (as the stages given)."""
    import torch

    cuda = torch.cuda.is_available()
    n = nproc or (torch.cuda.device_count() if cuda else min(2, os.cpu_count() or 1))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    clear_stale_build_locks()
    from trainer.pretrained import check_stages

    check_stages(stages)  # a first stage without the pretrained towers its model requires: one line, no ranks
    tok = tokenizer_dir(stages)
    cmd = command([str(s.path) for s in stages], overrides, tok, n, hostfile, master_addr, master_port, mixtures)
    proc = subprocess.Popen(cmd, env=rank_env(cuda, n), cwd=os.getcwd())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
