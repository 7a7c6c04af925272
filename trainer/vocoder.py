"""Stage 0.3: the HiFi-GAN vocoder, 80-bin log-mel at 100 Hz → 24 kHz waveform (docs/PAPER.md §5).

HiFi-GAN v1's layout (Kong et al. 2020, jik876/hifi-gan): ``conv_pre`` → transposed-conv upsampling (rates
multiplying to the hop, 240) each followed by a multi-receptive-field fusion of ResBlocks → ``conv_post`` →
tanh; a multi-period discriminator (periods 2, 3, 5, 7, 11) and a multi-scale discriminator (3 scales, the
first spectral-normed); LSGAN losses, feature matching (x2) and the mel L1 loss (x45) on ``LogMel`` of the
generated wave. Module and parameter names follow hifi-gan's, so its ``generator`` checkpoints load.

One optimizer, one backward (the DeepSpeed loop): HiFi-GAN alternates a discriminator step and a
generator step; here both are one loss. The discriminator term ``L_D(D(real), D(fake.detach()))`` reaches
only the discriminators (the fake wave is detached). The generator's adversarial and feature-matching terms
evaluate the discriminators through ``torch.func.functional_call`` with *detached* copies of their
parameters, so those terms reach only the generator (through the fake wave). The sum therefore gives each
network exactly the gradient of its own GAN objective, as the two-optimizer loop does, except that both
updates are computed from the same pre-step discriminator (HiFi-GAN's generator step sees the discriminator
just after its update). The functional call needs the discriminators' full parameters on every rank:
ZeRO stages 0-2, not 3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from trainer.audio_mel import HOP, LogMel

LRELU_SLOPE = 0.1

# HiFi-GAN v1 at 24 kHz / hop 240; a model YAML's `vocoder:` section overrides them.
VOCODER_DEFAULTS: dict[str, Any] = {
    "n_mels": 80,
    "upsample_rates": [5, 4, 4, 3],
    "upsample_kernel_sizes": [11, 8, 8, 7],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "mpd": {"periods": [2, 3, 5, 7, 11], "channels": [32, 128, 512, 1024, 1024]},
    "msd": {"scales": 3, "channels": [128, 128, 256, 512, 1024, 1024, 1024]},
    "loss": {"mel": 45.0, "fm": 2.0, "adv": 1.0, "disc": 1.0},
}


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
        m.weight.data.normal_(0.0, 0.01)


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=get_padding(kernel_size, d)))
            for d in dilation
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, padding=get_padding(kernel_size)))
            for _ in dilation
        )
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class HifiGanGenerator(nn.Module):
    """``mel [B, 80, T]`` → ``wave [B, T * prod(upsample_rates)]`` in [-1, 1]."""

    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        c = {**VOCODER_DEFAULTS, **(cfg or {})}
        rates, kernels = list(c["upsample_rates"]), list(c["upsample_kernel_sizes"])
        for u, k in zip(rates, kernels, strict=True):
            if k < u or (k - u) % 2:
                raise ValueError(f"upsample kernel {k} for rate {u}: needs k >= u and k - u even (exact length)")
        self.hop = math.prod(rates)
        ch0 = int(c["upsample_initial_channel"])
        self.num_kernels = len(c["resblock_kernel_sizes"])
        self.conv_pre = weight_norm(nn.Conv1d(int(c["n_mels"]), ch0, 7, 1, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, kernels, strict=True))
        )
        self.resblocks = nn.ModuleList(
            ResBlock1(ch0 // 2 ** (i + 1), k, list(d))
            for i in range(len(rates))
            for k, d in zip(c["resblock_kernel_sizes"], c["resblock_dilation_sizes"], strict=True)
        )
        self.conv_post = weight_norm(nn.Conv1d(ch0 // 2 ** len(rates), 1, 7, 1, padding=3))
        self.ups.apply(_init)
        self.conv_post.apply(_init)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # hifi-gan: default slope here
        return torch.tanh(x).squeeze(1)


# ---------------------------------------------------------------- discriminators


class DiscriminatorP(nn.Module):
    def __init__(self, period: int, channels: list[int], kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        dims = [1, *channels]
        n = len(channels)
        self.convs = nn.ModuleList(
            weight_norm(
                nn.Conv2d(
                    dims[i],
                    dims[i + 1],
                    (kernel_size, 1),
                    (stride if i < n - 1 else 1, 1),
                    padding=(get_padding(5, 1), 0),
                )
            )
            for i in range(n)
        )
        self.conv_post = weight_norm(nn.Conv2d(dims[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # x [B, 1, S]
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), "reflect")
        x = x.view(b, c, -1, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.flatten(1), fmap


class DiscriminatorS(nn.Module):
    # hifi-gan's (kernel, stride, groups) per conv; widths come from the config
    LAYOUT = [(15, 1, 1), (41, 2, 4), (41, 2, 16), (41, 4, 16), (41, 4, 16), (41, 1, 16), (5, 1, 1)]

    def __init__(self, channels: list[int], use_spectral_norm: bool = False) -> None:
        super().__init__()
        if len(channels) != len(self.LAYOUT):
            raise ValueError(f"msd channels: {len(self.LAYOUT)} widths, got {channels}")
        norm = spectral_norm if use_spectral_norm else weight_norm
        dims = [1, *channels]
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(dims[i], dims[i + 1], k, s, groups=math.gcd(g, dims[i], dims[i + 1]), padding=k // 2))
            for i, (k, s, g) in enumerate(self.LAYOUT)
        )
        self.conv_post = norm(nn.Conv1d(dims[-1], 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.flatten(1), fmap


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        c = {**VOCODER_DEFAULTS["mpd"], **(cfg or {})}
        self.discriminators = nn.ModuleList(DiscriminatorP(p, list(c["channels"])) for p in c["periods"])

    def forward(self, y: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        outs = [d(y) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        c = {**VOCODER_DEFAULTS["msd"], **(cfg or {})}
        ch = list(c["channels"])
        self.discriminators = nn.ModuleList(DiscriminatorS(ch, use_spectral_norm=i == 0) for i in range(c["scales"]))
        self.meanpools = nn.ModuleList(nn.AvgPool1d(4, 2, padding=2) for _ in range(c["scales"] - 1))

    def forward(self, y: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        scores, fmaps = [], []
        for i, d in enumerate(self.discriminators):
            if i:
                y = self.meanpools[i - 1](y)
            s, f = d(y)
            scores.append(s)
            fmaps.append(f)
        return scores, fmaps


# ---------------------------------------------------------------- losses


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.mean((1 - r.float()) ** 2) + torch.mean(g.float() ** 2) for r, g in zip(real, fake, strict=True))


def generator_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.mean((1 - g.float()) ** 2) for g in fake)


def feature_loss(fmap_real: list[list[torch.Tensor]], fmap_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    return sum(
        torch.mean(torch.abs(r.float() - g.float()))
        for dr, dg in zip(fmap_real, fmap_fake, strict=True)
        for r, g in zip(dr, dg, strict=True)
    )


def _detached_call(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)`` with its parameters detached: gradients reach ``x`` but not the module's parameters."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,), strict=False)


# ---------------------------------------------------------------- the stage module


class VocoderTask(nn.Module):
    """Stage 0.3's trained module: ``.generator``, ``.mpd``, ``.msd``; ``forward(**batch)`` → one GAN loss."""

    def __init__(self, model_cfg: dict[str, Any], task_args: dict[str, Any]) -> None:
        super().__init__()
        cfg = {**VOCODER_DEFAULTS, **(model_cfg.get("vocoder") or {})}
        self.generator = HifiGanGenerator(cfg)
        if self.generator.hop != HOP:
            raise ValueError(f"vocoder upsamples by {self.generator.hop}, the target mel's hop is {HOP}")
        self.mpd = MultiPeriodDiscriminator(cfg["mpd"])
        self.msd = MultiScaleDiscriminator(cfg["msd"])
        self.mel = LogMel()
        self.weights = {**VOCODER_DEFAULTS["loss"], **cfg.get("loss", {})}
        self.segment_frames = int(task_args.get("segment_frames", 32))
        if task_args.get("vocoder_from"):
            load_generator_state(self.generator, task_args["vocoder_from"])

    def _apply(self, fn: Any, recurse: bool = True) -> VocoderTask:
        super()._apply(fn, recurse)
        self.mel.float()  # the mel loss's window and filterbank stay fp32 when the module is cast to bf16
        return self

    def crop(
        self, target_mel: torch.Tensor, mel_len: torch.Tensor, wave: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random ``segment_frames`` window per clip (inside its valid frames when it is long enough):
        ``mel [B, 80, F]`` and its aligned ``wave [B, F * 240]``. Randomness: torch's global RNG."""
        seg = min(self.segment_frames, target_mel.shape[-1])
        need = (target_mel.shape[-1]) * HOP
        if wave.shape[-1] < need:
            wave = F.pad(wave, (0, need - wave.shape[-1]))
        room = (mel_len.clamp(max=target_mel.shape[-1]) - seg).clamp(min=0)
        start = (torch.rand(len(mel_len), device=room.device) * (room + 1).float()).long().clamp(max=room)
        idx = start[:, None] + torch.arange(seg, device=start.device)[None, :]
        mel = torch.gather(target_mel, 2, idx[:, None, :].expand(-1, target_mel.shape[1], -1))
        widx = start[:, None] * HOP + torch.arange(seg * HOP, device=start.device)[None, :]
        return mel, torch.gather(wave, 1, widx)

    def losses(self, mel: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every loss term for a cropped ``mel [B,80,F]`` and its real ``wave [B, F*240]`` (unweighted)."""
        fake = self.generator(mel.to(self.generator.conv_pre.bias.dtype))
        real = real.to(fake.dtype)
        mel_l1 = F.l1_loss(self.mel(fake), self.mel(real))
        y, y_hat = real.unsqueeze(1), fake.unsqueeze(1)
        disc = torch.zeros((), device=mel.device)
        gen_adv = torch.zeros((), device=mel.device)
        fm = torch.zeros((), device=mel.device)
        for d in (self.mpd, self.msd):
            scores, fmaps = d(torch.cat([y, y_hat.detach()]))  # live discriminator, fake detached
            real_s, fake_s = zip(*(s.chunk(2) for s in scores), strict=True)
            disc = disc + discriminator_loss(list(real_s), list(fake_s))
            g_scores, g_fmaps = _detached_call(d, y_hat)  # frozen discriminator, gradient to the generator
            gen_adv = gen_adv + generator_loss(g_scores)
            real_f = [[f.chunk(2)[0].detach() for f in fm_d] for fm_d in fmaps]
            fm = fm + feature_loss(real_f, g_fmaps)
        return {"mel_l1": mel_l1, "gen_adv": gen_adv, "fm": fm, "disc": disc}

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.weights
        return (
            w["mel"] * parts["mel_l1"] + w["adv"] * parts["gen_adv"] + w["fm"] * parts["fm"] + w["disc"] * parts["disc"]
        )

    def forward(self, target_mel: torch.Tensor, mel_len: torch.Tensor, wave: torch.Tensor, **_: Any) -> dict[str, Any]:
        mel, real = self.crop(target_mel, mel_len, wave)
        parts = self.losses(mel, real)
        return {"loss": self.total(parts), "metrics": {k: v.detach() for k, v in parts.items()}}


def _hifigan_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old-style weight norm (``weight_g`` / ``weight_v``, hifi-gan's checkpoints) → parametrization names."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def load_generator_state(generator: HifiGanGenerator, path: str | Path) -> None:
    """A local generator checkpoint: our export (``generator.*`` keys) or hifi-gan's ``{"generator": state}``."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if "generator" in state and isinstance(state["generator"], dict):
        state = state["generator"]
    elif any(k.startswith("generator.") for k in state):
        state = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
    generator.load_state_dict(_hifigan_keys(state), strict=True)


def build_vocoder(model_cfg: dict[str, Any], task_args: dict[str, Any], run_dir: Path | str) -> VocoderTask:
    """Stage 0.3 module. ``task_args``: ``segment_frames`` (32 mel frames = 7680 samples per clip and step),
    ``vocoder_from`` (a local generator checkpoint to start from; None). ``run_dir`` is unused."""
    return VocoderTask(model_cfg, dict(task_args or {}))


def load_vocoder(path: str | Path, model_cfg: dict[str, Any]) -> HifiGanGenerator:
    """The generator of a stage-0.3 export (or a hifi-gan checkpoint), in eval mode, for generation."""
    gen = HifiGanGenerator({**VOCODER_DEFAULTS, **(model_cfg.get("vocoder") or {})})
    load_generator_state(gen, path)
    return gen.eval()
