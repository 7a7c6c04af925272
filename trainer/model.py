"""The omni model of docs/PAPER.md, composed of real parts, with the released code's module names.

- ``model.embed_tokens / model.layers / model.norm`` + ``lm_head``: a Qwen2 LLM (transformers),
  loaded from a local pretrained path or built from a config.
- ``model.visual_model``: Qwen2-VL's NaViT vision transformer (its own merger removed, as released);
  ``model.visual_bridge_model``: the 2×2 patch-merge MLP projector into the LLM width.
- ``audio_tokenizer``: Whisper-style encoder (50 Hz) → gated-conv bridge to 12.5 Hz → 8-codebook
  residual VQ (+ the reconstruction decoder used to train/decode it). Always frozen in LLM training.
- ``model.audio_embed_layers``: 8 code embeddings summed into one LLM position per 12.5 Hz frame.
- ``audio_head``: a depth transformer over the 8 codebooks with per-codebook FFNs and 8 classifiers,
  fed the LLM's hidden state; it predicts the next audio frame for speech output.

Every forward touches every trainable part (zero-weighted dummy inputs when a batch lacks a
modality), as the released code does, so ZeRO/DDP ranks always reduce the same gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import hf_compat  # noqa: F401  (before transformers)
from trainer.attention import Segments, SequenceParallel, use_packed_attention

TAGS = ("text", "image", "video", "audio", "omni", "audio_gen")
AUDIO_GEN_TAG = TAGS.index("audio_gen")


# ---------------------------------------------------------------- audio tokenizer


class AudioBridge(nn.Module):
    """Gated conv-MLP that folds ``downsample`` encoder frames into one (50 Hz → 12.5 Hz), with a residual.
    ``bias=False`` (``audio.bridge.bias``) matches the released bridge, whose convs and projection have none."""

    def __init__(self, d_model: int, downsample: int, bias: bool = True) -> None:
        super().__init__()
        self.k = downsample
        width = d_model * downsample
        self.gate_proj = nn.Conv1d(d_model, width, downsample, stride=downsample, bias=bias)
        self.up_proj = nn.Conv1d(d_model, width, downsample, stride=downsample, bias=bias)
        self.down_proj = nn.Linear(width, width, bias=bias)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, ceil(T/k), d*k]
        pad = (-x.shape[1]) % self.k
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        xc = x.transpose(1, 2)
        h = (F.silu(self.gate_proj(xc)) * self.up_proj(xc)).transpose(1, 2)
        h = self.down_proj(h) + x.reshape(x.shape[0], -1, x.shape[2] * self.k)
        return self.norm(h)


def _world() -> Any:
    """``torch.distributed`` when several ranks train together (EMA statistics are summed over them), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random rows of ``x`` (without replacement while it has enough), identical on every rank (rank 0's)."""
    if x.shape[0] == 0:  # a rank without rows takes rank 0's
        rows = torch.zeros(n, x.shape[1], device=x.device)
        dist = _world()
        if dist is not None:
            dist.broadcast(rows, src=0)
        return rows
    idx = torch.randperm(x.shape[0], device=x.device)[:n]
    if idx.numel() < n:
        idx = torch.cat([idx, torch.randint(0, x.shape[0], (n - idx.numel(),), device=x.device)])
    rows = x[idx].float().contiguous()
    dist = _world()
    if dist is not None:
        dist.broadcast(rows, src=0)
    return rows


def _nearest(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    dist = x.pow(2).sum(-1, keepdim=True) - 2 * x @ e.t() + e.pow(2).sum(-1)
    return dist.argmin(-1)


class VQLayer(nn.Module):
    """One codebook: nearest code by Euclidean distance. ``cluster_size``/``embed_avg`` hold its EMA state.

    Training (``ResidualVQ.quantize`` in train mode) updates the codebook by EMA, never by gradients:
    ``cluster_size`` and ``embed_avg`` are exponential moving averages of each code's hit count and of the
    sum of the vectors it was assigned; ``embed = embed_avg / cluster_size`` with Laplace-smoothed sizes.
    A codebook whose ``cluster_size`` is all zero has never been trained: its first training batch
    initialises it by k-means (seeded with random batch vectors). Codes whose EMA hit count falls below
    ``dead_threshold`` restart at random vectors of the current batch."""

    def __init__(
        self, size: int, dim: int, decay: float = 0.99, eps: float = 1e-5, dead_threshold: float = 1.0
    ) -> None:
        super().__init__()
        self.size, self.decay, self.eps, self.dead_threshold = size, decay, eps, dead_threshold
        self.kmeans_iters = 10
        self.embed = nn.Parameter(torch.randn(size, dim), requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.embed_avg = nn.Parameter(torch.zeros(size, dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, xf = self.embed.float(), x.float()  # distances in fp32: bf16 would flip near-ties between codes
        codes = _nearest(xf, e)
        return codes, F.embedding(codes, e).to(x.dtype)

    @property
    def initialised(self) -> bool:
        return bool(self.cluster_size.detach().float().sum() > 0)

    @torch.no_grad()
    def init_kmeans(self, x: torch.Tensor) -> None:
        """k-means (``kmeans_iters`` Lloyd steps from random rows of ``x`` [M, dim]) as the first codebook."""
        x = x.float()
        means = _sample_rows(x, self.size)
        counts = torch.zeros(self.size, device=x.device)
        for it in range(self.kmeans_iters + 1):
            codes = _nearest(x, means)
            counts = torch.bincount(codes, minlength=self.size).float()
            if it == self.kmeans_iters:
                break
            sums = torch.zeros_like(means).index_add_(0, codes, x)
            dist = _world()
            if dist is not None:
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            hit = counts > 0
            means[hit] = sums[hit] / counts[hit, None]
        dist = _world()
        if dist is not None:
            dist.all_reduce(counts)
        self.embed.copy_(means.to(self.embed.dtype))
        self.cluster_size.copy_(counts.to(self.cluster_size.dtype))
        self.embed_avg.copy_((means * counts[:, None]).to(self.embed_avg.dtype))

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> int:
        """One EMA step from vectors ``x`` [M, dim] assigned ``codes`` [M]; then dead-code restart from ``x``.
        Returns how many codes restarted."""
        x = x.float()
        counts = torch.bincount(codes, minlength=self.size).float()
        sums = torch.zeros(self.size, x.shape[1], device=x.device).index_add_(0, codes, x)
        dist = _world()
        if dist is not None:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        d = self.decay
        size = self.cluster_size.float() * d + counts * (1 - d)
        avg = self.embed_avg.float() * d + sums * (1 - d)
        n = size.sum()
        smoothed = (size + self.eps) / (n + self.size * self.eps) * n  # Laplace smoothing
        embed = avg / smoothed[:, None]
        dead = size < self.dead_threshold
        restarted = int(dead.sum())
        if restarted:
            fresh = _sample_rows(x, self.size)
            embed = torch.where(dead[:, None], fresh, embed)
            size = torch.where(dead, torch.full_like(size, self.dead_threshold), size)
            avg = torch.where(dead[:, None], fresh * self.dead_threshold, avg)
        self.cluster_size.copy_(size.to(self.cluster_size.dtype))
        self.embed_avg.copy_(avg.to(self.embed_avg.dtype))
        self.embed.copy_(embed.to(self.embed.dtype))
        return restarted


@dataclass
class VQOutput:
    """What a training pass of the residual VQ returns (``quantized`` carries the straight-through gradient)."""

    quantized: torch.Tensor  # [M, dim]  x + (sum of the active layers' codes - x).detach()
    codes: torch.Tensor  # [M, n_q]
    commit: torch.Tensor  # scalar: sum over layers of mean ||r_i - sg(q_i)||^2 over valid, active rows
    usage: torch.Tensor  # [n_q]: fraction of each codebook hit by the batch's valid rows
    perplexity: torch.Tensor  # [n_q]: exp(entropy) of each layer's code distribution in the batch
    restarted: torch.Tensor  # [n_q]: dead codes restarted by this pass (0 outside training)


class ResidualVQ(nn.Module):
    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VQLayer(s, dim) for s in sizes)

    def configure(
        self,
        decay: float | None = None,
        dead_threshold: float | None = None,
        eps: float | None = None,
        kmeans_iters: int | None = None,
    ) -> None:
        """EMA hyperparameters of every codebook (training only; inference ignores them)."""
        for layer in self.layers:
            for name, value in (
                ("decay", decay),
                ("dead_threshold", dead_threshold),
                ("eps", eps),
                ("kmeans_iters", kmeans_iters),
            ):
                if value is not None:
                    setattr(layer, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, dim] -> codes [N, n_q]
        residual, codes = x, []
        for layer in self.layers:
            c, q = layer(residual)
            codes.append(c)
            residual = residual - q
        return torch.stack(codes, -1)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(F.embedding(codes[..., i], layer.embed) for i, layer in enumerate(self.layers))

    def sample_active(self, n: int, prob: float, device: torch.device | str | None = None) -> torch.Tensor:
        """Layer-wise dropout: for each of ``n`` instances, how many leading layers stay (long [n]).
        With probability ``prob`` an instance keeps a uniform 1..n_q layers (the first always), else all."""
        n_q = len(self.layers)
        keep = torch.randint(1, n_q + 1, (n,), device=device)
        drop = torch.rand(n, device=device) < prob
        return torch.where(drop, keep, torch.full_like(keep, n_q))

    def quantize(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, active: torch.Tensor | None = None
    ) -> VQOutput:
        """The training pass over ``x`` [M, dim]: ``valid`` bool [M] marks real (not padding) rows, ``active``
        long [M] how many leading layers each row keeps (layer dropout; None: all). In train mode the
        codebooks update by EMA (k-means init first if untrained, dead-code restart) from the valid rows,
        under no_grad. The output's gradient reaches ``x`` straight through (identity)."""
        m, n_q = x.shape[0], len(self.layers)
        valid = torch.ones(m, dtype=torch.bool, device=x.device) if valid is None else valid
        active = torch.full((m,), n_q, dtype=torch.long, device=x.device) if active is None else active
        residual = x
        total = torch.zeros_like(x)
        commit = x.new_zeros((), dtype=torch.float32)
        codes, usage, ppl, restarted = [], [], [], []
        for i, layer in enumerate(self.layers):
            rows = residual.detach()[valid]
            update = self.training and (rows.shape[0] > 0 or _world() is not None)
            if update and not layer.initialised:
                layer.init_kmeans(rows)
            c, q = layer(residual)
            keep = (valid & (active > i)).to(torch.float32)
            err = (residual.float() - q.detach().float()).pow(2).mean(-1)
            commit = commit + (err * keep).sum() / keep.sum().clamp(min=1.0)
            total = total + q * keep[:, None].to(q.dtype)
            cv = c[valid]
            hits = torch.bincount(cv, minlength=layer.size).float()
            usage.append((hits > 0).float().mean())
            prob = hits / hits.sum().clamp(min=1.0)
            ppl.append(torch.exp(-(prob * torch.log(prob.clamp(min=1e-10))).sum()))
            n_restart = 0
            if update:
                n_restart = layer.ema_update(rows, cv)
            restarted.append(torch.tensor(float(n_restart), device=x.device))
            codes.append(c)
            residual = residual - q
        quantized = x + (total - x).detach()
        return VQOutput(
            quantized, torch.stack(codes, -1), commit, torch.stack(usage), torch.stack(ppl), torch.stack(restarted)
        )


class AudioDecoder(nn.Module):
    """Reconstruction decoder (codes → coarse and refined mel), the tokenizer's training target."""

    def __init__(self, d_model: int, downsample: int, layers: int, heads: int, ffn: int, n_mels: int, refine: dict):
        super().__init__()
        self.up = nn.ConvTranspose1d(d_model * downsample, d_model, downsample, stride=downsample)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.up2 = nn.ConvTranspose1d(d_model, d_model, 2, stride=2)
        self.to_mel = nn.Linear(d_model, n_mels)
        ch, n = refine.get("channels", 256), refine.get("layers", 5)
        dims = [n_mels] + [ch] * (n - 1) + [n_mels]
        self.refine = nn.ModuleList(nn.Conv1d(dims[i], dims[i + 1], 5, padding=2) for i in range(n))

    def forward(
        self, quantized: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, N, d*k]
        return self.mels(self.hidden(quantized))

    def hidden(self, quantized: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, d*k]`` → ``[B, 2k·N, d]``: the hidden states after the last 2× upsampling, before ``to_mel``.
        ``lengths`` (valid frames per row) is unused: every op is causal or frame-local, padding trails."""
        h = self.up(quantized.transpose(1, 2)).transpose(1, 2)
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device, dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, src_mask=causal, is_causal=True)
        return self.up2(h.transpose(1, 2)).transpose(1, 2)

    def mels(self, h: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[B, 8N, d]`` → coarse and refined mel ``[B, n_mels, 8N]`` (``lengths`` unused)."""
        coarse = self.to_mel(h).transpose(1, 2)  # [B, n_mels, 8N]
        refined = coarse
        for i, conv in enumerate(self.refine):
            refined = conv(refined)
            if i < len(self.refine) - 1:
                refined = torch.tanh(refined)
        return coarse, coarse + refined


def _valid(lengths: torch.Tensor | None, t: int, device: torch.device) -> torch.Tensor | None:
    """``[B, 1, t]`` bool of each row's first ``lengths[b]`` frames (None: every frame is valid)."""
    if lengths is None:
        return None
    return (torch.arange(t, device=device)[None, :] < lengths.to(device)[:, None]).unsqueeze(1)


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``norm`` on ``x [B, C, T]`` with statistics over the ``valid [B, 1, T]`` frames only (None: all, plain
    GroupNorm), so a clip in a padded batch normalises as it does alone."""
    if valid is None:
        return norm(x)
    b, c, t = x.shape
    g = norm.num_groups
    xg = x.float().view(b, g, c // g, t)
    m = valid.float().view(b, 1, 1, t)
    n = (m.sum((2, 3), keepdim=True) * (c // g)).clamp(min=1.0)
    mean = (xg * m).sum((2, 3), keepdim=True) / n
    var = ((xg - mean).pow(2) * m).sum((2, 3), keepdim=True) / n
    y = ((xg - mean) * torch.rsqrt(var + norm.eps)).view(b, c, t).to(x.dtype)
    return y * norm.weight[None, :, None] + norm.bias[None, :, None]


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's sinusoidal positions ``[length, channels]`` (sin half, then cos half)."""
    step = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-step * torch.arange(channels // 2, dtype=torch.float32))
    arg = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class CausalUpsample(nn.Module):
    """ConvTranspose1d (kernel ``k``, stride ``s``) → GroupNorm(1) over the untrimmed output → the last
    ``k - s`` frames cut, so ``L`` frames become ``s·L`` and frame ``t`` depends on inputs ``≤ t / s``
    (the norm's statistics excepted). Names as released: ``conv``, ``norm``."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        if kernel < stride:
            raise ValueError(f"audio.decoder.kernel_size {kernel} must be at least the stride {stride}")
        self.conv = nn.ConvTranspose1d(channels_in, channels_out, kernel, stride)
        self.norm = nn.GroupNorm(1, channels_out)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, C, L]`` (zeros past ``lengths``) → ``[B, C', s·L]`` (zeros past ``s·lengths``), ``s·lengths``."""
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        y = self.conv(x)
        full = None if lengths is None else (lengths - 1) * s + k  # a clip's untrimmed output alone
        y = _group_norm(self.norm, y, _valid(full, y.shape[-1], y.device))
        y = y[..., : y.shape[-1] - (k - s)]
        out = None if lengths is None else lengths * s
        valid = _valid(out, y.shape[-1], y.device)
        return (y if valid is None else y * valid.to(y.dtype)), out


class ReleaseAttention(nn.Module):
    """Causal multi-head self-attention with Whisper's projections: biased q, v and out, unbiased k."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(a.transpose(1, 2).reshape(b, t, d))


class ReleaseDecoderLayer(nn.Module):
    """Pre-LayerNorm causal transformer layer (exact GELU FFN), the released decoder's; names as released."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = ReleaseAttention(d, heads)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class MelRefiner(nn.Module):
    """The released post-net: ``layers - 1`` × (Conv1d k5 → GroupNorm(1) → Mish), a 1×1 conv back to the
    mel bins, added to its input. ``layers`` is an ``nn.Sequential`` as released (Mish at 2, 5, ...)."""

    def __init__(self, n_mels: int, channels: int, n_layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        ch = n_mels
        for _ in range(n_layers - 1):
            mods += [nn.Conv1d(ch, channels, 5, padding=2), nn.GroupNorm(1, channels), nn.Mish()]
            ch = channels
        mods.append(nn.Conv1d(ch, n_mels, 1))
        self.layers = nn.Sequential(*mods)

    def forward(self, coarse: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:  # [B, n_mels, T]
        h = coarse
        for mod in self.layers:
            if isinstance(mod, nn.GroupNorm):
                h = _group_norm(mod, h, valid)
            else:
                h = mod(h)
                if isinstance(mod, nn.Mish) and valid is not None:
                    h = h * valid.to(h.dtype)  # the next conv sees zeros past the clip, as alone
        out = coarse + h
        return out if valid is None else out * valid.to(out.dtype)


class ReleaseAudioDecoder(nn.Module):
    """The released reconstruction decoder (``audio.decoder.layout: release``), our implementation of the
    released ``OmniAudioDecoder`` with its parameter names, so ``omni import`` maps it by name:

    ``proj_decoder`` (Linear d·k → d, the release keeps it in its bridge) → ``dconv1`` (``CausalUpsample``
    ×k) → + sinusoid positions (a stored ``[max_positions, d]`` buffer) → causal pre-LN layers →
    ``layer_norm`` → ``dconv2`` (×2 to the mel bins: the coarse mel) → ``post_net`` (refined mel).

    Same contract as ``AudioDecoder``: ``forward(quantized) -> (coarse, refined)`` ``[B, n_mels, 2k·N]``,
    ``hidden`` / ``mels``. One difference in where the hidden state is taken: ``hidden`` gives the states
    *before* ``dconv2`` (the release's ``hidden_states_before_dconv2``, at k·N frames, 50 Hz) each repeated
    twice, i.e. the nearest-neighbour resampling to the mel frame rate that the released flow-matching
    pre-net applies, so the flow condition stays ``[B, 2k·N, d]`` frame-aligned with the mel; ``mels``
    reads every second frame back. The release resamples the coarse mel to its vocoder's frame rate
    before the post-net; ours keeps the coarse rate (the same when that rate is 100 Hz).

    ``lengths`` (valid 12.5 Hz frames per row; None: all) makes a padded batch give each clip what it gives
    alone (GroupNorm statistics over valid frames, zeros past them); the release's own GroupNorms count a
    batch's padding, so it equals ours for each clip alone."""

    def __init__(
        self,
        d_model: int,
        downsample: int,
        layers: int,
        heads: int,
        ffn: int,
        n_mels: int,
        refine: dict,
        kernel_size: int,
        max_positions: int,
    ) -> None:
        super().__init__()
        self.proj_decoder = nn.Linear(d_model * downsample, d_model)
        self.dconv1 = CausalUpsample(d_model, d_model, kernel_size, downsample)
        self.register_buffer("positional_embedding", _sinusoids(max_positions, d_model))
        self.layers = nn.ModuleList(ReleaseDecoderLayer(d_model, heads, ffn) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d_model)
        self.dconv2 = CausalUpsample(d_model, n_mels, kernel_size, 2)
        self.post_net = MelRefiner(n_mels, refine.get("channels", 256), refine.get("layers", 5))

    def forward(
        self, quantized: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, N, d*k]
        return self.mels(self.hidden(quantized, lengths), lengths)

    def _before_dconv2(self, quantized: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        x = self.proj_decoder(quantized)  # [B, N, d]
        valid = _valid(lengths, x.shape[1], x.device)
        if valid is not None:
            x = x * valid.transpose(1, 2).to(x.dtype)
        h, _ = self.dconv1(x.transpose(1, 2), lengths)
        h = h.transpose(1, 2)  # [B, kN, d]
        if h.shape[1] > self.positional_embedding.shape[0]:
            limit = self.positional_embedding.shape[0]
            raise ValueError(f"{h.shape[1]} decoder frames: more than the {limit} stored positions")
        h = (h.float() + self.positional_embedding[: h.shape[1]].float()).to(h.dtype)
        for layer in self.layers:
            h = layer(h)
        return self.layer_norm(h)

    def hidden(self, quantized: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, d*k]`` → ``[B, 2k·N, d]``: the states before ``dconv2`` (k·N frames), each repeated twice."""
        return self._before_dconv2(quantized, lengths).repeat_interleave(2, dim=1)

    def mels(self, h: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[B, 2k·N, d]`` (``hidden``'s) → coarse and refined mel ``[B, n_mels, 2k·N]``."""
        h = h[:, ::2]  # the k·N states before dconv2
        k = None if lengths is None else lengths * self.dconv1.conv.stride[0]
        valid = _valid(k, h.shape[1], h.device)
        if valid is not None:
            h = h * valid.transpose(1, 2).to(h.dtype)
        coarse, frames = self.dconv2(h.transpose(1, 2), k)
        return coarse, self.post_net(coarse, _valid(frames, coarse.shape[-1], coarse.device))


def decoder_positions(audio_cfg: dict[str, Any]) -> int:
    """The release-layout decoder's stored positions: a chunk's mel frames (30 s at hop 160: 3000)."""
    seconds, rate = int(audio_cfg.get("chunk_seconds", 30)), int(audio_cfg.get("sample_rate", 16000))
    return seconds * rate // int(audio_cfg.get("hop_length", 160))


class AudioTokenizer(nn.Module):
    """Mel → Whisper encoder → 12.5 Hz bridge → 8 RVQ codes per frame. Frozen in the LLM stages (runs
    without grad there); stage 0.1 trains it (``trainer/audio_tokenizer_train.py``)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        enc = dict(cfg["encoder"])
        wcfg = WhisperConfig(
            d_model=enc["d_model"],
            encoder_layers=enc["encoder_layers"],
            encoder_attention_heads=enc["encoder_attention_heads"],
            encoder_ffn_dim=enc["encoder_ffn_dim"],
            num_mel_bins=enc.get("num_mel_bins", 128),
            max_source_positions=enc.get("max_source_positions", 1500),
            decoder_layers=1,
            activation_function="gelu",
        )
        self.downsample = cfg.get("downsample", 4)
        self.encoder = WhisperEncoder(wcfg)
        self.bridge = AudioBridge(wcfg.d_model, self.downsample, bool((cfg.get("bridge") or {}).get("bias", True)))
        self.quantizer = ResidualVQ(list(cfg["codebook_sizes"]), wcfg.d_model * self.downsample)
        dec = cfg.get("decoder", {})
        layout = dec.get("layout", "default")
        if layout == "default":
            self.decoder = AudioDecoder(
                wcfg.d_model,
                self.downsample,
                dec.get("layers", 8),
                dec.get("heads", enc["encoder_attention_heads"]),
                dec.get("ffn", enc["encoder_ffn_dim"]),
                dec.get("n_mels", 80),
                dec.get("refine", {}),
            )
        elif layout == "release":  # the released OmniAudioDecoder's structure and names (trainer/release.py)
            self.decoder = ReleaseAudioDecoder(
                wcfg.d_model,
                self.downsample,
                dec.get("layers", 8),
                dec.get("heads", enc["encoder_attention_heads"]),
                dec.get("ffn", enc["encoder_ffn_dim"]),
                dec.get("n_mels", 80),
                dec.get("refine", {}),
                int(dec.get("kernel_size", 2 * self.downsample)),
                int(dec.get("max_positions", decoder_positions(cfg))),
            )
        else:
            raise ValueError(f"audio.decoder.layout must be default or release, not {layout!r}")

    def encode(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper's encoder over zero-padded mel chunks ``[B, n_mels, T]`` with their true ``lengths``.

        Padding is masked out (conv outputs zeroed, padded keys masked), so each chunk encodes as if alone;
        one batched call keeps every rank's module calls identical, which ZeRO-3 needs."""
        enc = self.encoder
        t_mel = torch.arange(mel.shape[-1], device=mel.device)
        h = F.gelu(enc.conv1(mel)) * (t_mel[None, :] < lengths[:, None]).unsqueeze(1).to(mel.dtype)
        h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
        enc_len = (lengths + 1) // 2
        valid = torch.arange(h.shape[1], device=h.device)[None, :] < enc_len[:, None]  # [B, T']
        h = h + enc.embed_positions(torch.arange(h.shape[1], device=h.device))
        mask = torch.zeros(valid.shape, dtype=h.dtype, device=h.device).masked_fill(~valid, torch.finfo(h.dtype).min)
        mask = mask[:, None, None, :].expand(-1, 1, h.shape[1], -1)
        for layer in enc.layers:
            h = layer(h, attention_mask=mask, layer_head_mask=None)[0]
        return enc.layer_norm(h) * valid.unsqueeze(-1).to(h.dtype), enc_len

    def bridge_states(self, whisper_mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-quantised 12.5 Hz vectors ``[B, N, d*k]`` (what the RVQ quantises) and valid frames ``[B]``, with grad."""
        dtype = self.bridge.norm.weight.dtype
        h, enc_len = self.encode(whisper_mel.to(dtype), mel_len)
        return self.bridge(h), (enc_len + self.downsample - 1) // self.downsample

    @torch.no_grad()
    def tokenize(self, whisper_mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[B, N, n_q]`` (0 past each clip's frames) and frames ``[B]`` for a padded Whisper-mel batch
        ``[B, 128, T]`` with valid lengths ``mel_len``; the codes ``forward`` gives each clip alone (≤ 30 s)."""
        h, frames = self.bridge_states(whisper_mel, mel_len)
        codes = self.quantizer(h.reshape(-1, h.shape[-1])).reshape(h.shape[0], h.shape[1], -1)
        valid = torch.arange(h.shape[1], device=h.device)[None, :] < frames[:, None]
        return codes * valid.unsqueeze(-1), frames

    @torch.no_grad()
    def decoder_states(
        self, codes: torch.Tensor, frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[B, N, n_q]`` → the decoder's hidden states ``[B, 8N, d_model]`` (default layout: after the
        2× upsampling, before ``to_mel``; release layout: the states before ``dconv2``, each repeated twice)
        and its refined mel ``[B, n_mels, 8N]``: the flow decoder's condition. ``frames``: valid frames per
        row of a padded batch (the release layout's GroupNorms then count each clip's own frames)."""
        q = self.quantizer.dequantize(codes).to(self.bridge.norm.weight.dtype)
        hidden = self.decoder.hidden(q, frames)
        return hidden, self.decoder.mels(hidden, frames)[1]

    @torch.no_grad()
    def forward(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes ``[frames, n_q]`` for each mel chunk ``[n_mels, T]``, all chunks in one padded batch."""
        dtype = self.bridge.norm.weight.dtype
        lengths = torch.tensor([m.shape[-1] for m in mels], device=mels[0].device)
        batch = torch.zeros(len(mels), mels[0].shape[0], int(lengths.max()), dtype=dtype, device=mels[0].device)
        for i, m in enumerate(mels):
            batch[i, :, : m.shape[-1]] = m.to(dtype)
        h, enc_len = self.encode(batch, lengths)
        q = self.bridge(h)
        codes = self.quantizer(q.reshape(-1, q.shape[-1])).reshape(q.shape[0], q.shape[1], -1)
        frames = (enc_len + self.downsample - 1) // self.downsample
        return [codes[i, : int(n)] for i, n in enumerate(frames)]

    @torch.no_grad()
    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """Refined mel ``[n_mels, 8·frames]`` for codes ``[frames, n_q]`` (what flow matching refines further)."""
        q = self.quantizer.dequantize(codes).unsqueeze(0).to(self.bridge.norm.weight.dtype)
        return self.decoder(q)[1][0]


# ---------------------------------------------------------------- audio head


def _head_norm(kind: str, d: int, eps: float) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d)
    if kind == "rms":
        return nn.RMSNorm(d, eps=eps)
    raise ValueError(f"audio_head.norm must be layer or rms, not {kind!r}")


class DepthLayer(nn.Module):
    """Causal attention across the codebook axis, then an FFN with separate weights per codebook.

    By default both halves are pre-norm (LayerNorm) and the attention has no biases. The released head
    (``audio_head`` options ``norm: rms``, ``bias: true``, ``ffn_residual: normed``; trainer/release.py)
    uses RMSNorm, biased attention, and feeds the FFN's residual from the *normalised* stream:
    ``r = norm2(x + attn(norm1(x))); out = r + ffn(r)``. ``unused_ffn_bias`` keeps, as buffers, the
    biases the released checkpoint stores for its per-codebook FFN and its forward never adds."""

    def __init__(
        self,
        d: int,
        heads: int,
        ffn: int,
        n_q: int,
        norm: str = "layer",
        bias: bool = False,
        ffn_residual: str = "prenorm",
        unused_ffn_bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if ffn_residual not in ("prenorm", "normed"):
            raise ValueError(f"audio_head.ffn_residual must be prenorm or normed, not {ffn_residual!r}")
        self.ffn_residual = ffn_residual
        self.norm1 = _head_norm(norm, d, eps)
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, batch_first=True)
        self.norm2 = _head_norm(norm, d, eps)
        self.w_in = nn.Parameter(torch.randn(n_q, d, ffn) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(n_q, ffn, d) / math.sqrt(ffn))
        if unused_ffn_bias:  # carried for an exact round trip of the released weights; never added
            self.register_buffer("linear1_bias", torch.zeros(ffn))
            self.register_buffer("linear2_bias", torch.zeros(d))

    def ffn(self, x: torch.Tensor, q: int | None = None) -> torch.Tensor:
        """The second half on the post-attention stream ``x [F, n_q, d]``; with ``q``, ``x [F, 1, d]`` holds
        codebook position ``q`` only (incremental decoding)."""
        w_in = self.w_in if q is None else self.w_in[q : q + 1]
        w_out = self.w_out if q is None else self.w_out[q : q + 1]
        if self.ffn_residual == "normed":
            x = h = self.norm2(x)
        else:
            h = self.norm2(x)
        h = F.gelu(torch.einsum("fqd,qdh->fqh", h, w_in.to(x.dtype)))
        return x + torch.einsum("fqh,qhd->fqd", h, w_out.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [F, n_q, d]
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return self.ffn(x)


class AudioHead(nn.Module):
    """Predicts one 12.5 Hz frame's 8 codes (+ end-of-audio) from the LLM hidden state, RQ-Transformer style.

    Depth position ``q`` sees the summed embeddings of codes ``0..q-1``; ``hidden_input: every`` (default)
    adds the LLM state to every position, ``first`` (as released) makes it position 0's input alone.
    ``bias`` gives the attention and the classifiers biases (as released); ``norm`` is ``layer`` or ``rms``."""

    def __init__(
        self,
        d: int,
        codebook_sizes: list[int],
        layers: int,
        heads: int,
        ffn_mult: int,
        norm: str = "layer",
        bias: bool = False,
        ffn_residual: str = "prenorm",
        hidden_input: str = "every",
        unused_ffn_bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if hidden_input not in ("every", "first"):
            raise ValueError(f"audio_head.hidden_input must be every or first, not {hidden_input!r}")
        self.hidden_input = hidden_input
        n_q = len(codebook_sizes)
        self.layers = nn.ModuleList(
            DepthLayer(d, heads, d * ffn_mult, n_q, norm, bias, ffn_residual, unused_ffn_bias, eps)
            for _ in range(layers)
        )
        self.norm = _head_norm(norm, d, eps)
        self.classifiers = nn.ModuleList(nn.Linear(d, s + 1, bias=bias) for s in codebook_sizes)

    def position_input(self, hidden: torch.Tensor, acc: torch.Tensor, q: int) -> torch.Tensor:
        """Depth position ``q``'s input from the LLM state ``hidden [F, d]`` and ``acc [F, d]``, the summed
        embeddings of codes ``0..q-1`` (what ``forward`` builds for all positions at once)."""
        if self.hidden_input == "first":
            return hidden if q == 0 else acc
        return hidden + acc

    def forward(self, hidden: torch.Tensor, prev_code_embeds: torch.Tensor) -> list[torch.Tensor]:
        """``hidden [F, d]``; ``prev_code_embeds [F, n_q, d]`` (teacher-forced codes); logits per codebook."""
        shifted = torch.cumsum(prev_code_embeds, dim=1)[:, :-1]
        if self.hidden_input == "first":
            x = torch.cat([hidden.unsqueeze(1).to(shifted.dtype), shifted], dim=1)
        else:
            x = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1) + hidden.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return [clf(x[:, i]) for i, clf in enumerate(self.classifiers)]


# ---------------------------------------------------------------- the omni model


def _attn_implementation(requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


class OmniModel(nn.Module):
    ce_chunk_tokens = 4096  # LM-head cross-entropy rows per chunk (0: all at once); a stage sets its own

    def __init__(
        self, cfg: dict[str, Any], vocab_size: int | None = None, special: Any = None, pretrained: str = "load"
    ) -> None:
        """``pretrained`` (trainer/pretrained.py): ``load`` the towers the config names (``llm.pretrained``,
        ``vision.pretrained``, ``audio.encoder_pretrained``), ``require`` them too where the config has
        ``require_pretrained`` (a first stage), or ``none``: read no weights (an ``init_from`` follows)."""
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2VisionTransformerPretrainedModel

        from trainer import pretrained as towers

        if pretrained not in towers.MODES:
            raise ValueError(f"pretrained must be one of {towers.MODES}, not {pretrained!r}")
        if pretrained == "require":
            towers.check_required(cfg, f"model {cfg.get('name', '?')}")
        self.cfg = cfg
        llm_cfg = cfg["llm"]
        attn = _attn_implementation(llm_cfg.get("attn_implementation"))
        if towers.given(llm_cfg.get("pretrained")):
            llm = towers.build_llm(llm_cfg, vocab_size, attn, load=pretrained != "none")
        else:
            c = dict(llm_cfg["config"])
            if c.get("vocab_size") is None:
                if vocab_size is None:
                    raise ValueError("llm.config.vocab_size is null: pass the tokenizer's length")
                c["vocab_size"] = -(-vocab_size // 64) * 64
            llm = Qwen2ForCausalLM(Qwen2Config(**c, attn_implementation=attn))
        if vocab_size is not None and vocab_size > llm.config.vocab_size:
            raise ValueError(f"tokenizer has {vocab_size} tokens, the LLM only {llm.config.vocab_size}")
        self.llm_config = llm.config
        hidden = llm.config.hidden_size
        self.model = llm.model
        self.lm_head = llm.lm_head
        use_packed_attention(llm.config)  # packs stay apart by explicit segments (trainer/attention.py)

        vcfg = dict(cfg["vision"]["config"])
        vcfg["hidden_size"] = hidden
        vision_config = Qwen2VLVisionConfig(**vcfg)
        vision_config._attn_implementation = "sdpa" if attn == "sdpa" else attn
        visual = Qwen2VisionTransformerPretrainedModel(vision_config)
        visual.merger = nn.Identity()  # the released model replaces Qwen's merger with its own bridge
        self.model.visual_model = visual
        self.model.visual_bridge_model = PatchMerger(
            dim=hidden, context_dim=vision_config.embed_dim, spatial_merge_size=vision_config.spatial_merge_size
        )
        self.patch_dim = 3 * vision_config.temporal_patch_size * vision_config.patch_size**2

        acfg = cfg["audio"]
        sizes = list(acfg["codebook_sizes"])
        self.codebook_sizes = sizes
        self.audio_tokenizer = AudioTokenizer(acfg)
        self.audio_tokenizer.requires_grad_(False)
        self.model.audio_embed_layers = nn.ModuleList(nn.Embedding(s + 1, hidden) for s in sizes)
        head = cfg.get("audio_head", {})
        self.audio_head = AudioHead(
            hidden,
            sizes,
            head.get("layers", 3),
            head.get("heads", max(1, hidden // 128)),
            head.get("ffn_mult", 2),
            norm=head.get("norm", "layer"),
            bias=bool(head.get("bias", False)),
            ffn_residual=head.get("ffn_residual", "prenorm"),
            hidden_input=head.get("hidden_input", "every"),
            unused_ffn_bias=bool(head.get("unused_ffn_bias", False)),
            eps=float(head.get("norm_eps", 1e-6)),
        )
        self.audio_loss_weight = float(head.get("loss_weight", 1.0))
        self.special = special
        self.sequence_parallel: SequenceParallel | None = None  # Ulysses: set by StageRun (trainer/attention.py)
        if pretrained != "none":
            towers.load_towers(self, cfg)

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = torch.float32
    ) -> OmniModel:
        """The model of an ``omni export`` directory (config.json's ``omni`` section, the saved tokenizer,
        the safetensors shards loaded strictly); ``dtype="auto"`` keeps the stored dtype. See trainer/export.py."""
        from trainer.export import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    # -- helpers

    def _dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, n_q]`` codes → ``[N, n_q, d]`` per-codebook embeddings."""
        return torch.stack([emb(codes[:, i]) for i, emb in enumerate(self.model.audio_embed_layers)], dim=1)

    def put_images(self, ids: torch.Tensor, flat: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``[n, d]`` in place of the ``<img_pad>`` rows of ``flat [L, d]`` (ids ``[L]``)."""
        pos = (ids == self.special.img_pad).nonzero(as_tuple=True)[0]
        if pos.numel() != features.shape[0]:
            raise ValueError(f"{pos.numel()} image placeholders for {features.shape[0]} visual tokens")
        return flat.index_put((pos,), features.to(flat.dtype))

    def put_audio(self, ids: torch.Tensor, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Each frame's summed code embeddings (codes ``[n, n_q]``) in place of the ``<audio_pad>`` rows."""
        pos = (ids == self.special.audio_pad).nonzero(as_tuple=True)[0]
        if pos.numel() != codes.shape[0]:
            raise ValueError(f"{pos.numel()} audio placeholders for {codes.shape[0]} audio frames")
        return flat.index_put((pos,), self.embed_codes(codes).sum(1).to(flat.dtype))

    def _vision(self, pixel_values: torch.Tensor | None, grid: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        fake = pixel_values is None or pixel_values.shape[0] == 0
        if fake:  # one 2×2 patch window keeps the vision path in the graph
            pixel_values = torch.zeros(4, self.patch_dim, device=self.lm_head.weight.device)
            grid = torch.tensor([[1, 2, 2]], device=pixel_values.device)
        feats = self.model.visual_model(pixel_values.to(self._dtype()), grid_thw=grid)
        return self.model.visual_bridge_model(feats), fake

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        loss_tags: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        audio_mels: list[torch.Tensor] | None = None,
        audio_chunk_clip: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        audio_generate: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """``loss`` to back-propagate; per-tag loss sums and counts (``TAGS`` order) for logging.

        ``seq_lens [B, S]``: each row's segments (``trainer.data.collate``); attention stays within a segment
        (without them, segments start where the position ids restart). Under sequence parallelism every rank
        of the group embeds the whole batch, runs the LLM on its 1/N of the sequence, and returns the whole
        sequence's loss as the value, with the gradient of its own share only (DeepSpeed sums the shares)."""
        device = input_ids.device
        zero = torch.zeros((), device=device, dtype=torch.float32)
        embeds = self.model.embed_tokens(input_ids)
        flat = embeds.view(-1, embeds.shape[-1])
        ids = input_ids.reshape(-1)

        vis, fake_vis = self._vision(pixel_values, image_grid_thw)
        if fake_vis:
            zero = zero + vis.sum().float() * 0
        else:
            flat = self.put_images(ids, flat, vis)

        clip_codes: list[torch.Tensor] = []
        if not audio_mels:  # a tiny silent chunk keeps the tokenizer's calls identical on every rank
            silent = torch.zeros(self.audio_tokenizer.encoder.config.num_mel_bins, 16, device=device)
            self.audio_tokenizer([silent])
        if audio_mels:
            chunk_codes = self.audio_tokenizer(audio_mels)
            per_clip: list[list[torch.Tensor]] = [[] for _ in range(len(audio_frames))]
            for c, clip in zip(chunk_codes, audio_chunk_clip.tolist(), strict=True):
                per_clip[clip].append(c)
            clip_codes = [torch.cat(cs) for cs in per_clip]
            flat = self.put_audio(ids, flat, torch.cat(clip_codes))
        else:
            dummy = self.embed_codes(torch.zeros(1, len(self.codebook_sizes), dtype=torch.long, device=device))
            zero = zero + dummy.sum().float() * 0
        embeds = flat.view_as(embeds)

        sp, length = self.sequence_parallel, input_ids.shape[1]
        llm_kwargs: dict[str, Any] = {"segments": Segments.of_batch(seq_lens, position_ids)}
        if sp is not None:
            embeds, position_ids = sp.shard(embeds), sp.shard(position_ids)
            llm_kwargs["ulysses"] = sp.attention(self.llm_config, embeds.shape[0])
        hidden = self.model(
            inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **llm_kwargs
        ).last_hidden_state
        h_flat = hidden.reshape(-1, hidden.shape[-1])

        n_tags = len(TAGS)
        tag_loss = torch.zeros(n_tags, device=device, dtype=torch.float32)
        tag_count = torch.zeros(n_tags, device=device, dtype=torch.float32)

        # text: position i predicts labels[i + 1]; only labelled rows reach the LM head
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        tags = F.pad(loss_tags[:, 1:], (0, 1), value=0)
        n_text = (targets != -100).sum()  # the whole sequence's count, whichever share of it this rank holds
        if sp is not None:
            targets, tags = sp.shard(targets), sp.shard(tags)
        targets, tags = targets.reshape(-1), tags.reshape(-1)
        rows = (targets != -100).nonzero(as_tuple=True)[0]
        labelled = bool(rows.numel())
        if not labelled:  # one zero-weighted row keeps the LM head in the graph
            rows = rows.new_zeros(1)
        row_targets = targets[rows].clamp(min=0)
        if self.ce_chunk_tokens > 0:  # never all rows' fp32 full-vocabulary logits at once (trainer/memory.py)
            from trainer.memory import chunked_cross_entropy

            ce = chunked_cross_entropy(h_flat[rows], self.lm_head, row_targets, self.ce_chunk_tokens)
        else:
            ce = F.cross_entropy(self.lm_head(h_flat[rows]).float(), row_targets, reduction="none")
        if labelled:
            tag_loss.index_add_(0, tags[rows], ce.detach())
            tag_count.index_add_(0, tags[rows], torch.ones_like(ce))
            loss = ce.sum() / n_text
        else:
            loss = ce.sum() * 0

        # audio head: the position before each generated frame predicts its 8 codes; the last frame, end-of-audio
        gen_rows, gen_codes = self._audio_targets(ids, clip_codes, audio_frames, audio_generate)
        n_audio = gen_codes.numel() if gen_codes is not None else 0  # codes of the whole sequence
        if sp is not None and gen_rows is not None:
            gen_rows, gen_codes = sp.local_rows(gen_rows, gen_codes, length)
        if gen_rows is not None:
            logits = self.audio_head(h_flat[gen_rows], self.embed_codes(gen_codes))
            ce = torch.stack(
                [F.cross_entropy(lg.float(), gen_codes[:, i], reduction="sum") for i, lg in enumerate(logits)]
            ).sum()
            audio_loss = ce / n_audio  # the mean over frames and codebooks
            tag_loss[AUDIO_GEN_TAG] += ce.detach()
            tag_count[AUDIO_GEN_TAG] += float(gen_codes.numel())
            loss = loss + self.audio_loss_weight * audio_loss
        else:
            dummy_codes = torch.zeros(1, len(self.codebook_sizes), dtype=torch.long, device=device)
            logits = self.audio_head(h_flat[:1], self.embed_codes(dummy_codes))
            zero = zero + sum(lg.float().sum() for lg in logits) * 0
        loss = loss + zero
        if sp is not None:  # the value: the whole sequence's loss; the gradient: this rank's share of it
            loss = sp.loss(loss)
        return {"loss": loss, "tag_loss": tag_loss, "tag_count": tag_count}

    def _audio_targets(
        self,
        ids: torch.Tensor,
        clip_codes: list[torch.Tensor],
        frames: torch.Tensor | None,
        generate: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not clip_codes or generate is None or not bool(generate.any()):
            return None, None
        pos = (ids == self.special.audio_pad).nonzero(as_tuple=True)[0]
        eoa = torch.tensor(self.codebook_sizes, device=ids.device).unsqueeze(0)
        rows, codes, start = [], [], 0
        for n, gen, c in zip(frames.tolist(), generate.tolist(), clip_codes, strict=True):
            if gen:
                p = pos[start : start + n]
                rows.append(torch.cat([p[:1] - 1, p]))  # <audiogen_start> predicts frame 1 ... frame N predicts EOA
                codes.append(torch.cat([c, eoa]))
            start += n
        return torch.cat(rows), torch.cat(codes)


def parameter_groups(model: nn.Module) -> dict[str, int]:
    """Parameter counts by the names a stage freezes/unfreezes (docs/PAPER.md §8)."""
    from trainer.stages import MODULE_GROUPS

    counts = dict.fromkeys(MODULE_GROUPS, 0)
    for name, p in model.named_parameters():
        for group, prefixes in MODULE_GROUPS.items():
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
                counts[group] += p.numel()
                break
    return counts


def build_model(
    cfg: dict[str, Any], tokenizer: Any = None, device: str | torch.device | None = None, pretrained: str = "load"
) -> OmniModel:
    """The omni model for a model config; ``device='meta'`` builds the shape only (parameter counts).
    ``pretrained``: ``load`` / ``require`` / ``none`` (``OmniModel``)."""
    from trainer.tokenizer import special_ids

    vocab = len(tokenizer) if tokenizer is not None else None
    special = special_ids(tokenizer) if tokenizer is not None else None
    if device is not None:
        with torch.device(device):
            return OmniModel(cfg, vocab, special, pretrained)
    return OmniModel(cfg, vocab, special, pretrained)
