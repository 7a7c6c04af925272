"""Small real-media shard sets for the trainer's tests, benchmark and smoke runs.

The pipeline's demo run gives text, image_caption, interleaved_image_text, asr and video_caption.
The speech-generation and cross-modal kinds (tts, speech_text_interleaved, image_audio_text,
video_audio_text) are written here with ``ShardWriter`` from real media: Asterisk's recorded prompts
with their transcripts, espeak-ng speech, scikit-image photographs and an ffmpeg slideshow narrated
by a prompt (its audio track is what video_audio_text trains on, as in the paper). So are one SFT
conversation of each ``sft_*`` kind (stages 4.1 and 4.2), segments tagged with ``role``/``turn``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipelines.demo_data import PHOTOS, asterisk_prompts, espeak, photo_bytes, slideshow
from shards.manifest import write_shardset_manifest
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter

SOURCE = "trainer-sample-data"


def extra_kind_samples(workdir: Path) -> list[dict[str, Any]]:
    prompts = asterisk_prompts(limit=12)
    rows: list[dict[str, Any]] = []
    for wav, text in prompts[:4]:
        rows.append(
            make_sample(
                SOURCE,
                "tts",
                [Segment("text", text=text), Segment("audio", bytes=wav.read_bytes())],
                locator=f"tts/{wav.stem}",
            )
        )
    for i in range(3):
        (a_wav, a_text), (b_wav, b_text) = prompts[4 + 2 * i], prompts[5 + 2 * i]
        segs = [  # recorded prompts with their known words, as the transcribe step would leave them
            Segment("audio", bytes=a_wav.read_bytes(), meta={"asr": {"text": a_text}}),
            Segment("text", text=b_text),
            Segment("audio", bytes=b_wav.read_bytes(), meta={"asr": {"text": b_text}}),
            Segment("text", text=a_text),
        ]
        rows.append(make_sample(SOURCE, "speech_text_interleaved", segs, locator=f"intlv/{i}"))
    names = list(PHOTOS)
    for name in names[:3]:
        spoken = PHOTOS[name]
        wav = espeak(spoken, "en", workdir / f"{name}.wav")
        rest = f"The photograph called {name} is one of the images scikit-image ships. It has no people in view."
        segs = [
            Segment("image", bytes=photo_bytes(name, size=(160, 120))),
            Segment("audio", bytes=wav.read_bytes()),
            Segment("text", text=rest),
        ]
        rows.append(make_sample(SOURCE, "image_audio_text", segs, locator=f"iat/{name}"))
    for i in range(2):
        imgs = []
        for name in names[3 * i : 3 * i + 3]:
            p = workdir / f"{name}.jpg"
            p.write_bytes(photo_bytes(name))
            imgs.append(p)
        wav, text = prompts[i]
        video = slideshow(imgs, wav, workdir / f"show-{i}.mp4")
        caption = "A slideshow of " + ", ".join(p.stem for p in imgs) + ", narrated: " + text
        rows.append(
            make_sample(
                SOURCE,
                "video_audio_text",
                [Segment("video", bytes=video.read_bytes()), Segment("text", text=caption)],
                locator=f"vat/{i}",
            )
        )
    return rows


SFT_VOICE = "espeak:en"


def sft_kind_samples(workdir: Path) -> list[dict[str, Any]]:
    """One small conversation of each SFT kind from real media (the role/turn layout of the
    conversations source); the spoken answer names its voice in the system prompt."""
    (q_wav, q_text), _ = asterisk_prompts(limit=2)
    image = photo_bytes("coffee", size=(96, 80))
    frames = []
    for name in ("rocket", "moon"):
        path = workdir / f"sft-{name}.jpg"
        path.write_bytes(photo_bytes(name))
        frames.append(path)
    video = slideshow(frames, None, workdir / "sft-show.mp4").read_bytes()
    heard = espeak("What is in this picture?", "en", workdir / "sft-question.wav").read_bytes()
    answer = "Every sample ends in a shard or in the rejects ledger."
    spoken = espeak(answer, "en", workdir / "sft-answer.wav").read_bytes()

    def say(
        role: str, turn: int, modality: str = "text", text: str | None = None, data: bytes | None = None, **meta: Any
    ) -> Segment:
        return Segment(modality, text=text, bytes=data, meta={"role": role, "turn": turn, **meta})

    conversations = {
        "sft_text": [
            say("system", 0, text="You are a helpful assistant."),
            say("user", 1, text="Where does every sample end?"),
            say("assistant", 2, text=answer),
        ],
        "sft_image": [
            say("user", 0, "image", data=image),
            say("user", 0, text="What is in the picture?"),
            say("assistant", 1, text=PHOTOS["coffee"]),
        ],
        "sft_video": [
            say("user", 0, "video", data=video),
            say("user", 0, text="What does the video show?"),
            say("assistant", 1, text="A rocket on its launch pad, then the cratered surface of the moon."),
        ],
        "sft_audio": [
            say("user", 0, "audio", data=q_wav.read_bytes()),
            say("assistant", 1, text=f"You said: {q_text}"),
        ],
        "sft_image_audio": [
            say("user", 0, "image", data=image),
            say("user", 0, "audio", data=heard),
            say("assistant", 1, text=PHOTOS["coffee"]),
        ],
        "sft_audio_generation": [
            say("system", 0, text=f"Please answer in the voice {SFT_VOICE}."),
            say("user", 1, text="Where does every sample end?"),
            say("assistant", 2, text=answer),
            say("assistant", 2, "audio", data=spoken, tts={"text": answer, "voice": SFT_VOICE}),
        ],
    }
    rows = []
    for kind, segs in conversations.items():
        meta: dict[str, Any] = {"format": "openai", "turns": len({s.meta["turn"] for s in segs})}
        meta["category"] = "captioning" if kind == "sft_image" else None
        if kind == "sft_audio_generation":
            meta["voice"] = SFT_VOICE
        rows.append(make_sample(SOURCE, kind, segs, locator=f"sft/{kind}", meta=meta))
    return rows


def write_extra_kinds(out_dir: str | Path, max_samples: int = 3) -> str:
    """Write the generation, cross-modal and SFT kinds as a shard set; returns its manifest path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omni-trainer-media-") as tmp:
        rows = extra_kind_samples(Path(tmp)) + sft_kind_samples(Path(tmp))
    written = ShardWriter(str(out), "extra", max_samples=max_samples).write_all(rows)
    return write_shardset_manifest(str(out), written, {"source": SOURCE})


def build_sample_corpus(root: str | Path) -> list[str]:
    """The pipeline's demo shards plus the extra kinds under ``root``; returns both manifest paths."""
    from pipelines.demo_data import build_demo_sources
    from pipelines.executor import run_recipe
    from pipelines.recipe import recipe_from_dict

    root = Path(root)
    sources = build_demo_sources(root / "sources")
    recipe = {
        "name": "trainer-sample",
        "output": str(root / "run"),
        "sources": [
            {"name": "media", "type": "local", "path": sources["media"], "unit_size": 5},
            {"name": "docs", "type": "jsonl", "path": sources["docs"], "unit_bytes": 700},
            {"name": "pairs", "type": "parquet", "path": sources["pairs"]},
            {"name": "wds", "type": "webdataset", "path": sources["wds"]},
        ],
        "pipeline": [{"op": "validate", "params": {"max_pixels": 4_000_000}}],
        "shards": {"max_samples": 4, "max_bytes": "8MB"},
        "executor": {"type": "local"},
    }
    run_recipe(recipe_from_dict(recipe), executor="local", progress=False)
    return [str(root / "run" / "shards" / "manifest.json"), write_extra_kinds(root / "extra")]
