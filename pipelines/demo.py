"""``omni demo``: build real multimodal sources, run the pipeline on a local Ray, show the result."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from pipelines.audit import audit
from pipelines.demo_data import (
    MULTILINGUAL,
    PHOTOS,
    SPOKEN,
    build_demo_sources,
    build_sft_sources,
    build_synth_sources,
)
from pipelines.executor import run_recipe
from pipelines.inspect_shards import inspect_target
from pipelines.recipe import load_recipe
from pipelines.report import write_report
from pipelines.stats import collect, stats_report


def demo_recipe(sources: dict[str, str], output: str, executor: str) -> dict:
    return {
        "name": "demo",
        "output": output,
        "sources": [
            {"name": "media", "type": "local", "path": sources["media"], "unit_size": 8},
            {"name": "docs", "type": "jsonl", "path": sources["docs"], "unit_bytes": 2048},
            {"name": "pairs", "type": "parquet", "path": sources["pairs"]},
            {"name": "wds", "type": "webdataset", "path": sources["wds"]},
        ],
        "pipeline": [{"op": "validate", "params": {"max_pixels": 16_000_000}}],
        "shards": {"max_samples": 16, "max_bytes": "64MB"},
        "executor": {"type": executor, "num_cpus": 2, "object_store_memory": "512MB"},
    }


def synth_steps(coca_config: str, coca_checkpoint: str) -> list[dict]:
    """Enrich, then shape every sample into one of the paper's data types (see synth/interleave.py)."""
    stories = {"sources": ["stories"], "languages": ["en"]}
    return [
        {"op": "probe"},
        {"op": "keyframes", "params": {"max_frames": 8}},
        {"op": "transcribe", "params": {"batch_size": 8}},
        # a tiny random CoCa (no weights are downloadable): real code path, gibberish captions; top-k
        # sampling is seeded per image (sample id and segment), so the captions repeat in every run
        {
            "op": "caption",
            "params": {"config": coca_config, "checkpoint": coca_checkpoint, "generation_type": "top_k", "top_k": 5},
        },
        {"op": "build_video_audio_text"},
        {"op": "build_asr", "params": {"max_ref_wer": 0.5}},
        {"op": "build_image_audio_text", "params": {"share": 0.3}},
        {"op": "build_image_caption"},
        {"op": "build_speech_text_interleaved", "params": {**stories, "share": 0.5, "keep_images": False}},
        {"op": "build_tts", "params": stories},
        {"op": "build_interleaved_image_text"},
        *sft_steps(),
        {"op": "tts", "params": {"voices": ["piper:joe"], "fallback": "espeak:en-us"}},
        {"op": "tts_backcheck", "params": {"max_wer": 0.1}},
    ]


def sft_steps() -> list[dict]:
    """The SFT builders (synth/sft.py) on the demo's chat records and ASR pairs (``build_sft_sources``):
    the system prompt's voice speaks the answers, the other English OpenAI chats get spoken questions,
    the speech pairs become S2TT (the one with a translation) and AQA."""
    return [
        {"op": "build_voice_control", "params": {"sources": ["sft_openai"], "languages": ["en"]}},
        {
            "op": "build_spoken_questions",
            "params": {"sources": ["sft_openai"], "languages": ["en"], "voices": ["piper:joe"]},
        },
        {"op": "build_s2tt", "params": {"sources": ["sft_speech"]}},
        {"op": "build_aqa", "params": {"sources": ["sft_speech"]}},
    ]


def sft_sources(sources: dict[str, str]) -> list[dict]:
    return [
        {"name": "sft_sharegpt", "type": "conversations", "path": sources["sft_sharegpt"], "format": "sharegpt"},
        {"name": "sft_llava", "type": "conversations", "path": sources["sft_llava"], "format": "llava"},
        {"name": "sft_openai", "type": "conversations", "path": sources["sft_openai"], "format": "openai"},
        {"name": "sft_speech", "type": "jsonl", "path": sources["sft_speech"]},
    ]


def synth_demo_recipe(sources: dict[str, str], output: str, executor: str) -> dict:
    """The demo recipe plus the synth/ sources and steps and the SFT chats, so the run produces every
    data type and every SFT kind."""
    recipe = demo_recipe(sources, output, executor)
    recipe["sources"] += [
        {"name": "stories", "type": "jsonl", "path": sources["stories"]},
        {"name": "narrated", "type": "local", "path": sources["narrated"]},
        *sft_sources(sources),
    ]
    recipe["pipeline"] += synth_steps(sources["coca_config"], sources["coca_checkpoint"])
    recipe["pipeline"] += [
        {"op": "content_hash"},  # exact-duplicate keys for `omni dedup`
        {"op": "langid"},  # lang, lang_score: fastText lid.176
        {"op": "count_tokens", "params": {"tokenizer": sources["tokenizer"]}},
    ]
    # four model-holding actors (transcribe, caption, tts, tts_backcheck) each hold one logical CPU
    recipe["executor"]["num_cpus"] = 6
    return recipe


def demo_tokenizer(out: Path, sources: dict[str, str]) -> str:
    """The trainer's tiny byte-level BPE trained on the demo's own text (no real LLM tokenizer here)."""
    from trainer.tokenizer import train_tiny_tokenizer

    if not (out / "tokenizer.json").is_file():
        texts = [t for _, t in MULTILINGUAL + SPOKEN] + list(PHOTOS.values())
        for name in ("docs", "stories"):
            texts += [line for line in Path(sources[name]).read_text(encoding="utf-8").splitlines() if line.strip()]
        train_tiny_tokenizer(texts, out, vocab_size=2048)
    return str(out)


def run_demo(out: str, executor: str = "ray") -> int:
    t0 = time.perf_counter()
    root = Path(out).resolve()
    sources = {**build_demo_sources(root / "sources"), **build_synth_sources(root / "sources" / "synth")}
    sources.update(build_sft_sources(root / "sources"))  # beside the demo sources: it uses their media
    sources["tokenizer"] = demo_tokenizer(root / "models" / "tokenizer", sources)
    recipe_path = root / "demo.yaml"
    run_dir = root / "run"
    recipe_path.write_text(yaml.safe_dump(synth_demo_recipe(sources, str(run_dir), executor), sort_keys=False))
    t1 = time.perf_counter()
    print(f"built demo sources in {root / 'sources'} ({t1 - t0:.1f}s)")
    manifest = run_recipe(load_recipe(str(recipe_path)))
    t2 = time.perf_counter()
    print(f"ran recipe {recipe_path} on {executor} ({t2 - t1:.1f}s)")
    print(inspect_target(str(run_dir), limit=4))
    report = audit(str(run_dir))
    print(report.summary())
    stats = stats_report(collect([str(run_dir)]))
    print(f"tokens: {stats['tokens']:,}  by modality {stats['tokens_by_modality']}  by kind {stats['tokens_by_kind']}")
    sft = {k: v for k, v in sorted(stats["tokens_by_kind"].items()) if k.startswith("sft_")}
    print(f"SFT kinds (tokens): {sft}")
    print(f"report: {write_report(str(run_dir))}")
    print(f"shards: {run_dir / 'shards'}  (manifest: {run_dir / 'shards' / 'manifest.json'})")
    print(f"rejects ledger: {run_dir / 'rejects'}  ({manifest['rejected']} rejected)")
    print(f"try: omni inspect {run_dir}   omni audit {run_dir}")
    print(f"demo wall time {time.perf_counter() - t0:.1f}s")
    return 0 if report.balanced else 1
