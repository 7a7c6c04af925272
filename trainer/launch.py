"""Start the ranks of a training run: torchrun on one machine, the ``deepspeed`` launcher across machines.

Before any rank starts, the stages are validated and the tokenizer is made ready: a model config
with ``tokenizer.path: null`` (``tiny``) gets a byte-level BPE trained once on the mixture's texts
into ``<output>/tokenizer``; every rank and every later stage loads that same directory.

One machine (CPU or GPUs; ``DS_ACCELERATOR=cpu`` and gloo when there is no GPU)::

    omni train conf/stages/1.1-image-projector.yaml --nproc 2

Several machines (see trainer/README.md): a DeepSpeed hostfile lists ``host slots=N`` per line; the
``deepspeed`` launcher starts the ranks over ssh with the same command on every host::

    omni train-all --hostfile hosts.txt --master-addr 10.0.0.1
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from trainer.stages import StageConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        train_tiny_tokenizer(corpus_texts(manifests), out, int(tok.get("vocab_size", 2048)))
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
) -> list[str]:
    port = str(master_port or free_port())
    rank_args = ["--tokenizer", tokenizer]
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
) -> int:
    """Run the stages in order in one set of ranks; returns the launcher's exit status."""
    import torch

    cuda = torch.cuda.is_available()
    n = nproc or (torch.cuda.device_count() if cuda else min(2, os.cpu_count() or 1))
    tok = tokenizer_dir(stages)
    cmd = command([str(s.path) for s in stages], overrides, tok, n, hostfile, master_addr, master_port)
    proc = subprocess.Popen(cmd, env=rank_env(cuda, n), cwd=os.getcwd())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
