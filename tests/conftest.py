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

from pipelines.demo_data import build_demo_sources  # noqa: E402
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


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session: 2 CPUs, a capped object store, loopback only."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=512 << 20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real byte-level BPE trained on the demo's multilingual text, saved as a HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipelines.demo_data import MULTILINGUAL, PHOTOS, SPOKEN

    texts = [t for _, t in MULTILINGUAL + SPOKEN] + list(PHOTOS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts * 4, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return str(out)
