"""Stage 0.2: the flow-matching decoder, frozen audio tokenizer decoder states to 24 kHz mel (docs/PAPER.md §5).

Conditional flow matching as Matcha-TTS and CosyVoice do it:

- the estimator is a 1D U-Net: down / mid / up blocks, each a ResNet1D block (conv → GroupNorm → Mish, with
  the time embedding added) followed by transformer blocks (masked self-attention + FFN), skip connections
  from each down block to its up block; a sinusoidal time embedding goes through an MLP. Every op is masked
  (convs see zeros past a clip's end, attention masks padded keys, GroupNorm counts valid frames only), so a
  clip's velocity is the same in a padded batch as alone;
- its input is ``[x_t, mu, prompt]`` stacked on channels: the noisy mel, the condition projected to 80
  channels by a 1x1 conv (``mu``), and an optional prompt mel (zeros where there is none);
- OT-CFM: ``y = (1 - (1 - σ) t) x0 + t x1``, target velocity ``u = x1 - (1 - σ) x0`` (σ = 1e-6), masked MSE;
- t is drawn on the cosine schedule ``t = 1 - cos(t π / 2)`` in training, and the Euler solver steps on it;
- classifier-free guidance: the condition (and prompt) is dropped with probability ``cfg_dropout`` in
  training; sampling mixes ``v = (1 + w) v_cond - w v_uncond``.

The condition is the tokenizer's reconstruction-decoder hidden states ``[B, d_model, 8N]`` (8 mel frames per
12.5 Hz token), what the codes mean after the tokenizer has been trained (stage 0.1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N_MELS = 80

# Architecture defaults (CosyVoice-300M's estimator); a model YAML's `flow:` section overrides them.
FLOW_DEFAULTS: dict[str, Any] = {
    "n_mels": N_MELS,
    "channels": [256, 256],
    "n_blocks": 4,  # transformer blocks per U-Net block
    "num_mid_blocks": 12,
    "heads": 8,
    "head_dim": 64,
    "ffn_mult": 4,
    "dropout": 0.0,
    "groups": 8,  # GroupNorm groups in the ResNet blocks
    "sigma_min": 1e-6,
    "t_scheduler": "cosine",
    "prompt_channels": True,  # an 80-channel prompt-mel input (zeros when no prompt is given)
    "sample_steps": 10,  # generation defaults
    "guidance": 0.7,
}


# ---------------------------------------------------------------- U-Net parts


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding needs an even width, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor, scale: float = 1000.0) -> torch.Tensor:  # [B] -> [B, dim]
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        arg = scale * t.float()[:, None] * freq[None, :]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics cover the valid frames only, so a clip normalises the same padded or alone
    (Matcha's plain GroupNorm counts the padding). Same parameters as ``nn.GroupNorm``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, C, T], mask [B, 1, T]
        b, c, t = x.shape
        xg = x.float().view(b, self.num_groups, c // self.num_groups, t)
        m = mask.float().view(b, 1, 1, t)
        n = (m.sum((2, 3), keepdim=True) * (c // self.num_groups)).clamp(min=1.0)
        mean = (xg * m).sum((2, 3), keepdim=True) / n
        var = ((xg - mean).pow(2) * m).sum((2, 3), keepdim=True) / n
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).view(b, c, t).to(x.dtype)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


class Block1D(nn.Module):
    """Conv(k=3) → GroupNorm (over valid frames) → Mish, masked on both sides."""

    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim_out, 3, padding=1)
        self.norm = MaskedGroupNorm(_groups(dim_out, groups), dim_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.mish(self.norm(self.conv(x * mask), mask)) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.time_proj = nn.Linear(time_dim, dim_out)
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.time_proj(F.mish(t_emb)).unsqueeze(-1)
        return self.block2(h, mask) + self.res_conv(x * mask)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention over valid frames (padded keys masked out) and a GELU FFN, on ``[B, T, C]``."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * ffn_mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * ffn_mult, dim)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:  # key_mask bool [B, T]
        b, t, _ = x.shape
        q, k, v = self.to_qkv(self.norm1(x)).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.to_out(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.ff(self.norm2(x))


class UNetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, c: dict[str, Any]) -> None:
        super().__init__()
        self.resnet = ResnetBlock1D(dim, dim_out, time_dim, c["groups"])
        self.transformers = nn.ModuleList(
            TransformerBlock(dim_out, c["heads"], c["head_dim"], c["ffn_mult"], c["dropout"])
            for _ in range(c["n_blocks"])
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.resnet(x, mask, t_emb).transpose(1, 2)
        key_mask = mask[:, 0].bool()
        for block in self.transformers:
            x = block(x, key_mask)
        return x.transpose(1, 2)


class UNet1D(nn.Module):
    """The velocity estimator: ``(x_t, mask, mu, t, prompt) -> v`` on ``[B, 80, T]``."""

    def __init__(self, in_channels: int, out_channels: int, c: dict[str, Any]) -> None:
        super().__init__()
        channels = list(c["channels"])
        time_dim = channels[0] * 4
        self.time_embeddings = SinusoidalPosEmb(in_channels + in_channels % 2)
        self.time_mlp = TimestepMLP(in_channels + in_channels % 2, time_dim)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = in_channels
        for i, out in enumerate(channels):
            self.down_blocks.append(UNetBlock(ch, out, time_dim, c))
            last = i == len(channels) - 1
            self.downsamples.append(nn.Conv1d(out, out, 3, padding=1) if last else nn.Conv1d(out, out, 3, 2, 1))
            ch = out
        self.mid_blocks = nn.ModuleList(UNetBlock(ch, ch, time_dim, c) for _ in range(c["num_mid_blocks"]))
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        up = channels[::-1] + [channels[0]]
        for i in range(len(channels)):
            self.up_blocks.append(UNetBlock(2 * up[i], up[i + 1], time_dim, c))
            last = i == len(channels) - 1
            self.upsamples.append(
                nn.Conv1d(up[i + 1], up[i + 1], 3, padding=1)
                if last
                else nn.ConvTranspose1d(up[i + 1], up[i + 1], 4, 2, 1)
            )
        self.final_block = Block1D(up[-1], up[-1], c["groups"])
        self.final_proj = nn.Conv1d(up[-1], out_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x [B, in, T]`` (x_t, mu and prompt stacked), ``mask [B, 1, T]`` float, ``t [B]``."""
        t_emb = self.time_mlp(self.time_embeddings(t).to(x.dtype))
        skips, masks = [], [mask]
        for block, down in zip(self.down_blocks, self.downsamples, strict=True):
            m = masks[-1]
            x = block(x, m, t_emb)
            skips.append(x)
            x = down(x * m)
            masks.append(m[:, :, ::2])
        masks.pop()
        m = masks[-1]
        for block in self.mid_blocks:
            x = block(x, m, t_emb)
        for block, up in zip(self.up_blocks, self.upsamples, strict=True):
            m = masks.pop()
            skip = skips.pop()
            x = block(torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1), m, t_emb)
            x = up(x * m)
        x = self.final_block(x, mask)
        return self.final_proj(x * mask) * mask


# ---------------------------------------------------------------- conditional flow matching


def cosine_t(t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.cos(t * 0.5 * math.pi)


class FlowDecoder(nn.Module):
    """OT-CFM from a condition ``[B, cond_dim, T]`` to an 80-bin mel ``[B, 80, T]``.

    ``cfg``: the model YAML's ``flow:`` section plus ``cond_dim`` (the tokenizer's ``d_model``; see
    :func:`flow_config`) and the training-time ``cfg_dropout`` / ``prompt_prob``."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        c = {**FLOW_DEFAULTS, "cfg_dropout": 0.2, "prompt_prob": 0.0, **cfg}
        if "cond_dim" not in c:
            raise ValueError("flow config needs cond_dim (the tokenizer's d_model): use flow_config(model_cfg)")
        self.cfg = c
        self.n_mels = int(c["n_mels"])
        self.sigma_min = float(c["sigma_min"])
        self.t_scheduler = c["t_scheduler"]
        self.cfg_dropout = float(c["cfg_dropout"])
        self.prompt_prob = float(c["prompt_prob"])
        self.use_prompt = bool(c["prompt_channels"])
        self.cond_proj = nn.Conv1d(int(c["cond_dim"]), self.n_mels, 1)
        in_channels = self.n_mels * (3 if self.use_prompt else 2)
        self.estimator = UNet1D(in_channels, self.n_mels, c)

    def _schedule(self, t: torch.Tensor) -> torch.Tensor:
        return cosine_t(t) if self.t_scheduler == "cosine" else t

    def velocity(
        self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor | None
    ) -> torch.Tensor:
        parts = [x, mu]
        if self.use_prompt:
            parts.append(prompt if prompt is not None else torch.zeros_like(x))
        return self.estimator(torch.cat(parts, dim=1), mask, t)

    @staticmethod
    def _align(*xs: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Crop every ``[B, C, T]`` tensor to the shortest T (the tokens' 8N frames vs the target's T)."""
        t = min(x.shape[-1] for x in xs if x is not None)
        return [None if x is None else x[..., :t] for x in xs]

    def loss(
        self, target_mel: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked OT-CFM MSE for ``target_mel [B,80,T]`` given ``cond [B,C,T]``, ``mask [B,1,T]``.

        ``prompt``: an optional ``[B,80,T]`` prompt mel (zeros outside the prompt frames); without one,
        with probability ``prompt_prob`` a sample gets a random prefix (up to 30 %) of its own target as
        prompt, CosyVoice's recipe, and its loss skips those frames. Randomness: torch's global RNG."""
        x1, cond, mask, prompt = self._align(target_mel, cond, mask, prompt)
        mask = mask.to(x1.dtype)
        b = x1.shape[0]
        mu = self.cond_proj(cond.to(x1.dtype))
        loss_mask = mask
        if self.use_prompt and prompt is None and self.prompt_prob > 0:
            lens = mask.sum((1, 2))
            keep = (torch.rand(b, device=x1.device) < self.prompt_prob).to(x1.dtype)
            n_prompt = (torch.rand(b, device=x1.device) * 0.3 * lens * keep).long()
            in_prompt = (torch.arange(x1.shape[-1], device=x1.device)[None, :] < n_prompt[:, None]).unsqueeze(1)
            prompt = x1 * in_prompt.to(x1.dtype)
            loss_mask = mask * (~in_prompt).to(x1.dtype)
        t = self._schedule(torch.rand(b, 1, 1, device=x1.device, dtype=x1.dtype))
        x0 = torch.randn_like(x1)
        y = (1 - (1 - self.sigma_min) * t) * x0 + t * x1
        u = x1 - (1 - self.sigma_min) * x0
        if self.training and self.cfg_dropout > 0:
            keep = (torch.rand(b, device=x1.device) > self.cfg_dropout).to(x1.dtype).view(-1, 1, 1)
            mu = mu * keep
            prompt = prompt * keep if prompt is not None else None
        pred = self.velocity(y, mask, mu, t.view(-1), prompt)
        err = (pred.float() - u.float()).pow(2) * loss_mask.float()
        return err.sum() / (loss_mask.float().sum() * self.n_mels).clamp(min=1.0)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        mask: torch.Tensor,
        steps: int = 10,
        guidance: float = 0.7,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Euler ODE solve from noise (``temperature``-scaled, drawn from ``generator``) to a mel ``[B,80,T]``,
        ``steps`` steps on the cosine schedule, classifier-free guidance weight ``guidance``."""
        cond, mask, prompt = self._align(cond, mask, prompt)
        dtype = self.cond_proj.weight.dtype
        mask = mask.to(dtype)
        b, t_len = cond.shape[0], cond.shape[-1]
        mu = self.cond_proj(cond.to(dtype))
        x = torch.randn(b, self.n_mels, t_len, generator=generator, device=cond.device, dtype=dtype) * temperature
        t_span = self._schedule(torch.linspace(0, 1, steps + 1, device=cond.device, dtype=torch.float32))
        guided = guidance != 0
        if guided:  # conditional and unconditional halves in one batch
            mask2 = torch.cat([mask, mask])
            mu2 = torch.cat([mu, torch.zeros_like(mu)])
            prompt2 = None if prompt is None else torch.cat([prompt.to(dtype), torch.zeros_like(prompt, dtype=dtype)])
        for i in range(steps):
            t, dt = t_span[i], t_span[i + 1] - t_span[i]
            if guided:
                v = self.velocity(torch.cat([x, x]), mask2, mu2, t.expand(2 * b).to(dtype), prompt2)
                v_cond, v_uncond = v.chunk(2)
                v = (1 + guidance) * v_cond - guidance * v_uncond
            else:
                v = self.velocity(x, mask, mu, t.expand(b).to(dtype), None if prompt is None else prompt.to(dtype))
            x = x + dt.to(dtype) * v
        return x * mask


def flow_config(model_cfg: dict[str, Any], task_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The FlowDecoder config of a model YAML: its ``flow:`` section, the tokenizer's width as ``cond_dim``,
    and the training knobs of ``task_args`` (``cfg_dropout``, ``prompt_prob``)."""
    task_args = task_args or {}
    cfg = {**FLOW_DEFAULTS, **(model_cfg.get("flow") or {})}
    cfg.setdefault("cond_dim", int(model_cfg["audio"]["encoder"]["d_model"]))
    cfg["cfg_dropout"] = float(task_args.get("cfg_dropout", 0.2))
    cfg["prompt_prob"] = float(task_args.get("prompt_prob", 0.0))
    return cfg


# ---------------------------------------------------------------- the tokenizer's condition


def length_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """``[B, 1, t]`` bool, true on each row's first ``lengths[b]`` frames."""
    return (torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]).unsqueeze(1)


@torch.no_grad()
def tokenizer_condition(tokenizer: nn.Module, whisper_mel: torch.Tensor, mel_len: torch.Tensor) -> torch.Tensor:
    """Frozen tokenizer: Whisper mel ``[B,128,T]`` → codes → decoder hidden states ``[B, d_model, 8N]``
    (``AudioTokenizer.tokenize`` then ``decoder_states``, the path generation takes from sampled codes)."""
    codes, frames = tokenizer.tokenize(whisper_mel, mel_len)
    hidden, _ = tokenizer.decoder_states(codes, frames)
    return hidden.transpose(1, 2)


def load_tokenizer_state(tokenizer: nn.Module, path: str | Path) -> None:
    """Load a stage-0.1 export (keys ``tokenizer.*``) or an OmniModel state dict (``audio_tokenizer.*``)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for prefix in ("tokenizer.", "audio_tokenizer."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            tokenizer.load_state_dict(sub, strict=True)
            return
    raise ValueError(f"{path}: no tokenizer.* or audio_tokenizer.* keys")


# ---------------------------------------------------------------- the stage module


class FlowDecoderTask(nn.Module):
    """Stage 0.2's trained module: ``.flow`` learns, ``.tokenizer`` (frozen, eval, no grad) gives the condition."""

    def __init__(self, model_cfg: dict[str, Any], task_args: dict[str, Any]) -> None:
        super().__init__()
        from trainer.model import AudioTokenizer

        self.tokenizer = AudioTokenizer(model_cfg["audio"])
        src = task_args.get("audio_tokenizer_from")
        if src:
            load_tokenizer_state(self.tokenizer, src)
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()
        self.flow = FlowDecoder(flow_config(model_cfg, task_args))

    def train(self, mode: bool = True) -> FlowDecoderTask:
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

    def forward(
        self, whisper_mel: torch.Tensor, target_mel: torch.Tensor, mel_len: torch.Tensor, **_: Any
    ) -> dict[str, Any]:
        cond = tokenizer_condition(self.tokenizer, whisper_mel, mel_len)
        t = min(cond.shape[-1], target_mel.shape[-1])
        dtype = self.flow.cond_proj.weight.dtype
        loss = self.flow.loss(target_mel[..., :t].to(dtype), cond[..., :t].to(dtype), length_mask(mel_len, t))
        return {"loss": loss, "metrics": {"cfm": loss.detach()}}

    @torch.no_grad()
    def generate(self, whisper_mel: torch.Tensor, mel_len: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Speech → codes → decoder states → sampled mel ``[B, 80, T]`` (padding zeroed); kw go to ``sample``."""
        cond = tokenizer_condition(self.tokenizer, whisper_mel, mel_len)
        t = min(cond.shape[-1], whisper_mel.shape[-1])
        return self.flow.sample(cond[..., :t], length_mask(mel_len, t), **kw)


def build_flow_decoder(model_cfg: dict[str, Any], task_args: dict[str, Any], run_dir: Path | str) -> FlowDecoderTask:
    """Stage 0.2 module. ``task_args``: ``audio_tokenizer_from`` (0.1's final/model.pt; None → random
    tokenizer), ``cfg_dropout`` (0.2), ``prompt_prob`` (0.0). ``run_dir`` is unused."""
    return FlowDecoderTask(model_cfg, dict(task_args or {}))


def load_flow_decoder(path: str | Path, model_cfg: dict[str, Any]) -> FlowDecoder:
    """The FlowDecoder of a stage-0.2 export (``flow.*`` keys), in eval mode, for generation."""
    flow = FlowDecoder(flow_config(model_cfg))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    flow.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("flow.")}, strict=True)
    return flow.eval()
