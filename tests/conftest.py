"""Shared fixtures: real media built once per session, a local Ray on loopback, recipe helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import yaml  # noqa: E402

from pipelines.demo_data import asterisk_prompts, build_demo_sources  # noqa: E402
from pipelines.recipe import Recipe, recipe_from_dict  # noqa: E402

# What the demo sources hold, counted by hand from pipelines/demo_data.py.
DEMO_INPUTS = {
    "media": 6 + 6 + 3 + 1 + 4,  # photos+captions, prompts, espeak clips, slideshow, 4 bad files
    "docs": 10 + 1 + 1,  # multilingual lines, one interleaved document, one broken line
    "pairs": 4,
    "wds": 4 + 1,  # four img2dataset samples and one hostile member
}
DEMO_BAD = {"truncated.jpg", "not-utf8.txt", "empty.wav", "garbage.mp4"}


@pytest.fixture(scope="session")
def demo_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_demo_sources(tmp_path_factory.mktemp("demo_sources"))


def demo_recipe_dict(sources: dict[str, str], output: str | Path, executor: str = "local") -> dict[str, Any]:
    return {
        "name": "t",
        "output": str(output),
        "sources": [
            {"name": "media", "type": "local", "path": sources["media"], "unit_size": 5},
            {"name": "docs", "type": "jsonl", "path": sources["docs"], "unit_bytes": 700},
            {"name": "pairs", "type": "parquet", "path": sources["pairs"]},
            {"name": "wds", "type": "webdataset", "path": sources["wds"]},
        ],
        "pipeline": [{"op": "validate", "params": {"max_pixels": 4_000_000}}],
        "shards": {"max_samples": 4, "max_bytes": "8MB"},
        "executor": {"type": executor, "num_cpus": 2, "object_store_memory": "512MB"},
    }


@pytest.fixture
def demo_recipe(demo_sources: dict[str, str], tmp_path: Path) -> Recipe:
    return recipe_from_dict(demo_recipe_dict(demo_sources, tmp_path / "run"))


N_CLIPS = 60
UNIT_SIZE = 3


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real recorded prompts with transcripts; every tenth clip truncated, for validate to reject."""
    d = tmp_path_factory.mktemp("speech")
    prompts = asterisk_prompts(limit=N_CLIPS)
    for i, (wav, text) in enumerate(prompts):
        data = wav.read_bytes()
        if i % 10 == 7:
            data = data[: len(data) // 3]  # truncated: validate rejects it
        (d / f"{i:03d}-{wav.stem}.wav").write_bytes(data)
        (d / f"{i:03d}-{wav.stem}.txt").write_text(text)
    return d


def write_speech_recipe(path: Path, speech: Path, output: Path, executor: str) -> Path:
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


@pytest.fixture(scope="session")
def uninterrupted(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The speech clips run once without interruption: the reference for every fault test."""
    from pipelines.executor import run_recipe
    from pipelines.recipe import load_recipe

    d = tmp_path_factory.mktemp("clean")
    run_recipe(load_recipe(str(write_speech_recipe(d / "clean.yaml", speech_dir, d / "run", "local"))), progress=False)
    return d / "run"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session: 2 CPUs, 4 logical GPUs (GPU steps schedule; nothing uses CUDA),
    a capped object store, loopback only."""
    import ray

    ray.init(
        address="local",  # never join a cluster another test (or a user) started on this machine
        num_cpus=2,
        num_gpus=4,
        object_store_memory=512 << 20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trainer's tiny byte-level BPE, trained on the demo's multilingual text."""
    from pipelines.demo_data import MULTILINGUAL, PHOTOS, SPOKEN
    from trainer.tokenizer import train_tiny_tokenizer

    texts = [t for _, t in MULTILINGUAL + SPOKEN] + list(PHOTOS.values())
    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    train_tiny_tokenizer(texts * 4, out, vocab_size=600)
    return str(out)
