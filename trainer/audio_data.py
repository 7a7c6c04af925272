"""Speech clips for the audio stages (0.1 tokenizer, 0.2 flow decoder, 0.3 vocoder), from the same shards.

Each sample with an audio segment (ASR and TTS shards: audio + transcript) becomes one clip: the
Whisper encoder's 16 kHz log-mel, the 24 kHz 80-bin target mel (``trainer.audio_mel``), the 24 kHz
waveform and the transcript. Clips stream like the LLM stages' packs: the same shard walk
(``EntryStream``), weighted mixture, rank/worker split and resumable position, so a killed audio
stage resumes on exactly the same clips. A clip longer than ``max_seconds`` keeps its first
``max_seconds`` and drops its transcript (the words no longer match the sound).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.confine import UriPolicy
from trainer.audio_mel import LogMel
from trainer.data import EntryStream, MixtureEntry
from trainer.sequence import SkipSample, media_bytes, spoken_words

log = logging.getLogger("trainer")
PAD_LOG_MEL = float(np.log(1e-5))
MIN_SECONDS = 0.3


def clip_from_audio(
    sample_id: str, data: bytes, text: str, media: Any, to_mel: LogMel, max_seconds: float
) -> dict[str, Any]:
    """One clip from audio bytes in any format ffmpeg reads; raises SkipSample with a reason."""
    from scipy.signal import resample_poly

    from synth.media import MediaError, decode_audio

    try:
        wave24 = decode_audio(data, 24_000)
    except MediaError as e:
        raise SkipSample(e.reason) from e
    if len(wave24) < MIN_SECONDS * 24_000:
        raise SkipSample("audio too short")
    limit = int(max_seconds * 24_000)
    if len(wave24) > limit:
        wave24, text = wave24[:limit], ""
    wave24 = np.ascontiguousarray(wave24, dtype=np.float32)
    wave16 = resample_poly(wave24, 2, 3).astype(np.float32)
    whisper = media.waveform_clip(wave16).mels[0]
    target = to_mel(torch.from_numpy(wave24)).numpy()
    frames = min(whisper.shape[1], target.shape[1])
    return {
        "id": sample_id,
        "whisper_mel": whisper[:, :frames],
        "target_mel": target[:, :frames],
        "wave": wave24[: frames * 240],
        "text": text,
    }


def _clip(sample: dict[str, Any], uris: UriPolicy, media: Any, to_mel: LogMel, max_seconds: float) -> dict[str, Any]:
    audio = next((s for s in sample["segments"] if s["modality"] == "audio"), None)
    if audio is None:
        raise SkipSample("no audio segment")
    texts = [(s.get("text") or "").strip() for s in sample["segments"] if s["modality"] == "text"]
    # an ASR/TTS sample's text is the clip's transcript; other kinds' text is other words
    text = spoken_words(audio) or (" ".join(t for t in texts if t) if sample["kind"] in ("asr", "tts") else "")
    return clip_from_audio(sample["id"], media_bytes(audio, uris), text, media, to_mel, max_seconds)


class ClipStream(IterableDataset):
    """Clips for one rank; each DataLoader worker is one stream. Yields ``(clip, state after it)``."""

    def __init__(
        self,
        entries: list[MixtureEntry],
        model_cfg: dict[str, Any],
        max_seconds: float,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        states: dict[int, dict[str, Any]] | None = None,
        rotation: int = 0,
    ) -> None:
        self.entries, self.model_cfg, self.max_seconds = entries, model_cfg, max_seconds
        self.seed, self.rank, self.world = seed, rank, world
        self.num_workers = max(1, num_workers)
        self.states, self.rotation = states or {}, rotation
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError("mixture weights must be positive")
        self.cumulative = np.cumsum(weights / weights.sum())

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        from trainer.media import MediaProcessor

        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        logical = ((info.id if info is not None else 0) + self.rotation) % self.num_workers
        stream, streams = self.rank * self.num_workers + logical, self.world * self.num_workers
        state = copy.deepcopy(self.states.get(logical))
        positions = state["positions"] if state else [None] * len(self.entries)
        sources = [
            EntryStream(e, self.seed, i, stream, streams, tuple(p) if p is not None else None)
            for i, (e, p) in enumerate(zip(self.entries, positions, strict=True))
        ]
        rng = np.random.Generator(np.random.PCG64([self.seed, stream]))
        if state:
            rng.bit_generator.state = state["rng"]
        skipped: Counter = Counter(state["skipped"] if state else {})
        policies = [UriPolicy(e.allow_uris) for e in self.entries]
        media = MediaProcessor.from_model_config(self.model_cfg)
        to_mel = LogMel()
        try:
            while True:
                pick = min(int(np.searchsorted(self.cumulative, rng.random(), side="right")), len(sources) - 1)
                try:
                    clip = _clip(sources[pick].next_sample(), policies[pick], media, to_mel, self.max_seconds)
                except SkipSample as e:
                    skipped[str(e)] += 1
                    continue
                positions_now = [list(s.position) for s in sources]
                yield (
                    clip,
                    {
                        "worker": logical,
                        "stream": stream,
                        "positions": positions_now,
                        "rng": rng.bit_generator.state,
                        "skipped": dict(skipped),
                    },
                )
        finally:
            for s in sources:
                s.close()


def collate_clips(items: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Pad clips into the audio stages' batch (trainer/README.md, "Audio stages")."""
    clips = [c for c, _ in items]
    b, t = len(clips), max(c["whisper_mel"].shape[1] for c in clips)
    whisper = torch.zeros(b, clips[0]["whisper_mel"].shape[0], t)
    target = torch.full((b, clips[0]["target_mel"].shape[0], t), PAD_LOG_MEL)
    wave = torch.zeros(b, t * 240)
    for i, c in enumerate(clips):
        n = c["whisper_mel"].shape[1]
        whisper[i, :, :n] = torch.from_numpy(c["whisper_mel"])
        target[i, :, :n] = torch.from_numpy(c["target_mel"])
        wave[i, : len(c["wave"])] = torch.from_numpy(c["wave"])
    frames = torch.tensor([c["whisper_mel"].shape[1] for c in clips])
    return {
        "whisper_mel": whisper,
        "target_mel": target,
        "mel_len": frames,
        "wave": wave,
        "wave_len": torch.tensor([len(c["wave"]) for c in clips]),
        "text": [c["text"] for c in clips],
        "meta": {
            "sample_ids": [[c["id"]] for c in clips],
            "tokens": int(((frames + 7) // 8).sum()),  # 12.5 Hz frames: the budget's unit for audio stages
            "samples": b,
            "state": items[-1][1],
        },
    }


def make_clip_loader(
    entries: list[MixtureEntry],
    model_cfg: dict[str, Any],
    max_seconds: float,
    micro_batch: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    data_state: dict[str, Any] | None = None,
) -> DataLoader:
    """Like ``trainer.data.make_loader``, for clips; resumes at ``data_state`` when given."""
    import os

    states, rotation = {}, 0
    if data_state:
        if data_state["num_workers"] != max(1, num_workers) or data_state["world"] != world:
            raise ValueError(
                f"the data position was saved with {data_state['world']} ranks x {data_state['num_workers']} "
                f"workers; resume with the same (now {world} x {max(1, num_workers)})"
            )
        states = {int(k): v for k, v in data_state["workers"].items()}
        rotation = data_state["microbatches"] % max(1, num_workers)
    ds = ClipStream(entries, model_cfg, max_seconds, seed, rank, world, num_workers, states, rotation)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": 2, "multiprocessing_context": "fork" if os.name == "posix" else None}
    return DataLoader(ds, batch_size=micro_batch, collate_fn=collate_clips, num_workers=num_workers, **kwargs)
