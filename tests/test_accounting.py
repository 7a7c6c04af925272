"""Token accounting: manifests carry per-modality counts that match an independent recount."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.cli import main
from pipelines.executor import run_recipe
from pipelines.plan import load_corpus, make_plan
from pipelines.recipe import recipe_from_dict
from pipelines.stats import collect, stats_report, token_sums
from shards.manifest import read_shardset_manifest
from shards.reader import iter_samples
from shards.schema import loads_meta
from synth.media import decode_audio, sample_frames
from tests.conftest import demo_recipe_dict
from trainer.data import resolve_entry
from trainer.stages import CONF_DIR, load_stage
from trainer.tokenizer import load_tokenizer

STAGES = CONF_DIR / "stages"


def _qwen2vl_tokens(width: int, height: int, max_pixels: int, min_pixels: int = 3136) -> int:
    """Qwen2-VL's smart_resize, written out again from its reference code, then 28×28 per token."""
    factor = 28
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor)


def _recount(samples: list[dict], tokenizer: Any) -> Counter:
    """Independent count from the media bytes themselves, not from probed metadata."""
    counts: Counter = Counter()
    for sample in samples:
        for seg in sample["segments"]:
            m = seg["modality"]
            if m == "text":
                counts[m] += len(tokenizer(seg["text"], add_special_tokens=False)["input_ids"])
            elif m == "image":
                w, h = Image.open(io.BytesIO(seg["bytes"])).size
                counts[m] += _qwen2vl_tokens(w, h, 3_211_264) + 2
            elif m == "video":
                frames = sample_frames(seg["bytes"])  # decoded at 1 fps, <=32, within 602,112 px
                counts[m] += int(np.prod(frames.shape[1:3]) // 784) * len(frames) + 2
            else:
                rate = loads_meta(seg["meta"])["sample_rate"]
                seconds = len(decode_audio(seg["bytes"], sample_rate=rate)) / rate
                counts[m] += math.ceil(seconds * 12.5) + 2
    return counts


@pytest.fixture(scope="module")
def counted_run(demo_sources, text_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo sources through validate + count_tokens."""
    run = tmp_path_factory.mktemp("counted") / "run"
    doc = demo_recipe_dict(demo_sources, run)
    doc["pipeline"].append({"op": "count_tokens", "params": {"tokenizer": text_tokenizer_dir}})
    run_recipe(recipe_from_dict(doc), progress=False)
    return run


def test_manifest_tokens_match_an_independent_count(counted_run: Path, text_tokenizer_dir: str) -> None:
    tmp_path = counted_run.parent
    shardset = read_shardset_manifest(str(tmp_path / "run" / "shards"))
    samples = [s for tar in sorted((tmp_path / "run" / "shards").glob("*.tar")) for s in iter_samples(str(tar))]
    expected = _recount(samples, load_tokenizer(text_tokenizer_dir))
    assert set(expected) == {"text", "image", "audio", "video"}
    assert shardset["totals"]["tokens"] == dict(expected)
    stats = collect([str(tmp_path / "run")])
    assert token_sums(stats, "modality") == expected
    by_kind = token_sums(stats, "kind")
    assert by_kind["video_caption"] > 0 and sum(by_kind.values()) == sum(expected.values())
    assert token_sums(stats, "lang")["de"] > 0, "JSONL 'lang' fields carry into the language breakdown"
    report = stats_report(stats)
    assert report["tokens"] == sum(expected.values()) and report["samples"] == len(samples)


def test_omni_stats_cli(counted_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(counted_run)]) == 0
    out = capsys.readouterr().out
    assert "by kind:" in out and "image_caption" in out and "by lang:" in out
    assert main(["stats", str(counted_run / "shards" / "manifest.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_by_modality"]["video"] > 0


def test_plan_against_demo_manifests(counted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus_path = Path(__file__).resolve().parents[1] / "conf" / "corpus" / "omni500b.yaml"
    corpus = load_corpus(str(corpus_path))
    plan = make_plan(corpus, [str(counted_run)])
    rows = {k.kind: k for k in plan.kinds}
    stats = collect([str(counted_run)])
    held = token_sums(stats, "kind")
    assert rows["image_caption"].have_tokens == held["image_caption"] > 0
    assert rows["image_caption"].measured and not rows["video_audio_text"].measured
    assert rows["image_caption"].gap_tokens == 120e9 - held["image_caption"]
    assert rows["asr"].target_tokens == 221e3 * 112.7e3
    run_manifest = json.loads((counted_run / "manifest.json").read_text())
    assert plan.yield_ratio == run_manifest["written"] / run_manifest["ingested"]
    per_sample = held["image_caption"] / stats.kinds["image_caption"]
    assert rows["image_caption"].raw_inputs_needed == pytest.approx(
        (120e9 - held["image_caption"]) / per_sample / plan.yield_ratio
    )
    totals = plan.totals()
    assert totals["gpu_hours"] > 0 and totals["cpu_core_hours"] > 0
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"stage": "validate.image", "ours_per_s": 2000.0, "cores": 2}]))
    measured = make_plan(corpus, [str(counted_run)], bench_path=str(bench))
    assert measured.compute["validate"]["source"] == "measured"
    assert measured.compute["validate"]["hours"] == pytest.approx(measured.compute["validate"]["items"] / 1000 / 3600)
    assert main(["plan", str(corpus_path), "--have", str(counted_run), "--mixtures", str(tmp_path / "mix")]) == 0
    out = capsys.readouterr().out
    assert "image_caption" in out and "GPU-hours" in out and "CPU-core-hours" in out
    mixture = yaml.safe_load((tmp_path / "mix" / "mixture-1.2.yaml").read_text())
    assert sum(m["weight"] for m in mixture["mixture"]) == pytest.approx(1.0)
    assert mixture["mixture"][0]["manifests"] == [str(counted_run / "shards" / "manifest.json")]
    stage = load_stage(STAGES / "1.1-image-projector.yaml", [f"mixture_file={tmp_path / 'mix' / 'mixture-1.1.yaml'}"])
    (entry,) = [resolve_entry(e) for e in stage.mixture]
    assert entry.kinds == ["image_caption"] and entry.samples == stats.kinds["image_caption"]
