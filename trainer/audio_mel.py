"""The 24 kHz, 80-bin log-mel that the audio decoder, flow matching and the vocoder share (docs/PAPER.md §5).

100 frames per second (hop 240 at 24 kHz), the same rate as Whisper's 16 kHz features (hop 160), so a
clip's target mel and its encoder input have the same frame count: 8 mel frames per 12.5 Hz token.
Differentiable (torch STFT), because the vocoder's mel loss runs through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 24_000
HOP = 240


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1024
    hop_length: int = HOP
    win_length: int = 960
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 12_000.0


def mel_filters(cfg: MelConfig) -> np.ndarray:
    """Slaney-normalised mel filterbank ``[n_freq, n_mels]`` (librosa's default, via transformers)."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=cfg.n_fft // 2 + 1,
        num_mel_filters=cfg.n_mels,
        min_frequency=cfg.f_min,
        max_frequency=cfg.f_max,
        sampling_rate=cfg.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)


class LogMel(nn.Module):
    """``[B, S]`` waveform → ``[B, n_mels, S // hop]`` natural-log mel (clamped at 1e-5, HiFi-GAN's convention)."""

    def __init__(self, cfg: MelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MelConfig()
        self.register_buffer("window", torch.hann_window(self.cfg.win_length), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(self.cfg)), persistent=False)

    def frames(self, num_samples: int) -> int:
        return num_samples // self.cfg.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        squeeze = wave.dim() == 1
        if squeeze:
            wave = wave.unsqueeze(0)
        spec = torch.stft(
            wave.float(),
            c.n_fft,
            hop_length=c.hop_length,
            win_length=c.win_length,
            window=self.window,
            center=True,
            pad_mode="reflect" if wave.shape[-1] > c.n_fft // 2 else "constant",
            return_complex=True,
        )
        mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)  # [B, F, T+1]
        mel = torch.einsum("bft,fm->bmt", mag, self.filters)
        mel = torch.log(torch.clamp(mel, min=1e-5))[..., : self.frames(wave.shape[-1])]
        return mel[0] if squeeze else mel
