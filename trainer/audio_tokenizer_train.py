"""Stage 0.1: train the audio tokenizer (docs/PAPER.md §5.1) – Whisper encoder → 12.5 Hz bridge → 8-layer RVQ →
reconstruction decoder, with the objectives of Baichuan-Audio's tokenizer:

- multi-scale mel reconstruction: L1 + L2 of the decoder's coarse and refined mel against the clip's 24 kHz
  80-bin log-mel (``trainer.audio_mel.LogMel``), at 1×, 2× and 4× average-pooled time resolution;
- the RVQ learns by EMA codebooks (k-means init, Laplace smoothing, dead-code restart), a commitment loss
  and the straight-through estimator; VQ layers ≥ 2 are dropped per clip (layer-wise dropout);
- progressive replacement: per clip, the decoder reads the VQ output with probability p and the
  un-quantised bridge output otherwise; p ramps from 0.1 to 1.0 over ``replace_steps`` training steps;
- the semantic objective: a frozen LLM, prefixed with the quantised 12.5 Hz vectors through a trainable
  linear adapter, predicts the clip's transcript (cross-entropy on the transcript tokens only).

``build_audio_tokenizer(model_cfg, task_args, run_dir)`` returns the module the training loop drives:
``module(**batch) -> {"loss", "metrics"}`` over the batch of ``trainer/audio_data.py``; its state dict
holds the tokenizer under ``tokenizer.*``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import hf_compat  # noqa: F401  (before transformers)
from trainer.model import AudioTokenizer, _attn_implementation
from trainer.pretrained import load_whisper_encoder

DEFAULTS: dict[str, Any] = {
    "recon_weight": 1.0,  # weight of the multi-scale mel loss
    "recon_scales": [1, 2, 4],  # average-pooling factors of the mel loss
    "l2_weight": 1.0,  # weight of L2 next to L1 inside the mel loss
    "commit_weight": 1.0,  # beta of the commitment loss (EnCodec's weight for its EMA RVQ)
    "ema_decay": 0.99,
    "dead_code_threshold": 1.0,  # codes with an EMA hit count (per step) below this restart
    "kmeans_iters": 10,  # Lloyd steps of the first batch's codebook init
    "layer_dropout": 0.5,  # share of clips that keep a random 1..n_q VQ layers
    "replace_start": 0.1,  # share of clips decoded from VQ output at step 0 ...
    "replace_end": 1.0,  # ... and after replace_steps
    "replace_steps": 2000,
    "semantic_llm": None,  # {path: DIR} | {config: {...Qwen2Config...}, tokenizer: DIR} | None
    "semantic_weight": 0.5,
    "semantic_max_tokens": 128,  # transcript tokens per clip (longer ones are cut)
    "encoder_from": None,  # a local Whisper checkpoint dir (Hugging Face layout)
}


def _semantic_llm(spec: dict[str, Any], default_tokenizer: str | None) -> tuple[nn.Module, Any]:
    """The frozen Qwen2 LLM and its tokenizer for the semantic objective."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if spec.get("path"):
        path = str(spec["path"])
        llm = Qwen2ForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation=_attn_implementation(spec.get("attn_implementation"))
        )
        tok_dir = spec.get("tokenizer") or path
    elif spec.get("config") is not None:
        tok_dir = spec.get("tokenizer") or default_tokenizer
        if not tok_dir:
            raise ValueError("semantic_llm.config needs semantic_llm.tokenizer (a local tokenizer dir)")
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        cfg = dict(spec["config"])
        if cfg.get("vocab_size") is None:
            cfg["vocab_size"] = -(-len(tok) // 64) * 64
        cfg["attn_implementation"] = _attn_implementation(cfg.get("attn_implementation"))
        llm = Qwen2ForCausalLM(Qwen2Config(**cfg))
    else:
        raise ValueError("semantic_llm needs `path: DIR` or `config: {...}` (or null to disable it)")
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"semantic_llm tokenizer {tok_dir} has no eos token")
    llm.requires_grad_(False)
    llm.eval()
    return llm, tok


def _masked_mel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, scale: int) -> tuple:
    """(L1, L2) of ``pred`` vs ``target`` ``[B, M, L]`` over valid frames ``mask`` ``[B, 1, L]``, after
    ``scale``× average pooling in time (a window averages its valid frames only)."""
    m = mask.to(pred.dtype)
    if scale > 1:
        pad = (-pred.shape[-1]) % scale
        pred, target, m = (F.pad(t, (0, pad)) for t in (pred, target * m, m))
        weight = F.avg_pool1d(m, scale, scale)
        pred = F.avg_pool1d(pred * m, scale, scale) / weight.clamp(min=1e-6)
        target = F.avg_pool1d(target, scale, scale) / weight.clamp(min=1e-6)
        m = (weight > 0).to(pred.dtype)
    denom = (m.sum() * pred.shape[1]).clamp(min=1.0)
    diff = (pred.float() - target.float()) * m
    return diff.abs().sum() / denom, diff.pow(2).sum() / denom


def _without_semantic_llm(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + "semantic_llm.")]:
        del state[key]


def _semantic_llm_not_expected(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if "semantic_llm." not in k]


class AudioTokenizerTraining(nn.Module):
    """The stage-0.1 module: ``.tokenizer`` (the AudioTokenizer being trained), the semantic objective's
    frozen ``.semantic_llm`` (left out of the state dict) and trainable ``.semantic_adapter``, and a
    ``step`` counter for the progressive-replacement schedule."""

    def __init__(self, model_cfg: dict[str, Any], task_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        args = {**DEFAULTS, **(task_args or {})}
        self.args = args
        self.tokenizer = AudioTokenizer(model_cfg["audio"])
        self.tokenizer.quantizer.configure(
            decay=float(args["ema_decay"]),
            dead_threshold=float(args["dead_code_threshold"]),
            kmeans_iters=int(args["kmeans_iters"]),
        )
        if args.get("encoder_from"):
            load_whisper_encoder(self.tokenizer.encoder, args["encoder_from"], what="encoder_from")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.semantic_llm: nn.Module | None = None
        self.semantic_adapter: nn.Module | None = None
        self.text_tokenizer: Any = None
        spec = args.get("semantic_llm")
        if spec and not spec.get("path") and spec.get("config") is None:
            # the stage YAML's `{path: "${OMNI_SEMANTIC_LLM_DIR:-}"}` with the variable unset
            warnings.warn("semantic_llm has neither a path nor a config: the semantic objective is off", stacklevel=2)
            spec = None
        if spec and float(args["semantic_weight"]) > 0:
            self.semantic_llm, self.text_tokenizer = _semantic_llm(dict(spec), args.get("tokenizer"))
            dim = self.tokenizer.bridge.norm.normalized_shape[0]
            self.semantic_adapter = nn.Linear(dim, self.semantic_llm.config.hidden_size)
        # the frozen LLM is rebuilt from its path (or config and seed), never saved: a 1.5B LLM in every
        # checkpoint and export would dwarf the tokenizer it supervises
        self._register_state_dict_hook(_without_semantic_llm)
        self.register_load_state_dict_post_hook(_semantic_llm_not_expected)

    def train(self, mode: bool = True) -> AudioTokenizerTraining:
        super().train(mode)
        if self.semantic_llm is not None:
            self.semantic_llm.eval()  # frozen: never dropout
        return self

    def replace_p(self) -> float:
        a = self.args
        frac = min(1.0, int(self.step) / max(1, int(a["replace_steps"])))
        return float(a["replace_start"]) + (float(a["replace_end"]) - float(a["replace_start"])) * frac

    def forward(
        self,
        whisper_mel: torch.Tensor,
        target_mel: torch.Tensor,
        mel_len: torch.Tensor,
        text: list[str] | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        a = self.args
        tok = self.tokenizer
        vq = tok.quantizer
        h, frames = tok.bridge_states(whisper_mel, mel_len)  # [B, N, D]
        b, n, d = h.shape
        valid = torch.arange(n, device=h.device)[None, :] < frames[:, None]  # [B, N]
        if self.training:
            active = vq.sample_active(b, float(a["layer_dropout"]), h.device)
        else:
            active = torch.full((b,), len(vq.layers), dtype=torch.long, device=h.device)
        out = vq.quantize(h.reshape(-1, d), valid.reshape(-1), active.repeat_interleave(n))
        q = out.quantized.view(b, n, d)

        # progressive replacement: per clip, VQ output with probability p, else the bridge output
        p = self.replace_p() if self.training else 1.0
        if self.training:
            use_vq = torch.rand(b, device=h.device) < p
            with torch.no_grad():
                self.step += 1
        else:
            use_vq = torch.ones(b, dtype=torch.bool, device=h.device)
        coarse, refined = tok.decoder(torch.where(use_vq[:, None, None], q, h), frames)

        length = min(coarse.shape[-1], target_mel.shape[-1])
        target = target_mel[..., :length]
        mask = (torch.arange(length, device=h.device)[None, :] < mel_len[:, None]).unsqueeze(1)
        terms = []
        metrics: dict[str, torch.Tensor] = {}
        for scale in a["recon_scales"]:
            for name, pred in (("coarse", coarse), ("refined", refined)):
                l1, l2 = _masked_mel_loss(pred[..., :length], target, mask, int(scale))
                terms.append(l1 + float(a["l2_weight"]) * l2)
                if scale == 1:
                    metrics[f"mel_l1_{name}"] = l1.detach()
        recon = torch.stack(terms).mean()  # mean over scales and over coarse/refined
        loss = float(a["recon_weight"]) * recon + float(a["commit_weight"]) * out.commit

        semantic = self._semantic(q, frames, text)
        if semantic is not None:
            loss = loss + float(a["semantic_weight"]) * semantic
            metrics["semantic"] = semantic.detach()

        metrics.update(
            recon=metrics["mel_l1_refined"],
            recon_total=recon.detach(),
            commit=out.commit.detach(),
            replace_p=torch.tensor(p, device=h.device),
            vq_share=use_vq.float().mean(),
        )
        for i in range(len(vq.layers)):
            metrics[f"usage_l{i}"] = out.usage[i].detach()
            metrics[f"perplexity_l{i}"] = out.perplexity[i].detach()
            metrics[f"restarted_l{i}"] = out.restarted[i]
        return {"loss": loss, "metrics": metrics}

    def _semantic(self, q: torch.Tensor, frames: torch.Tensor, text: list[str] | None) -> torch.Tensor | None:
        """CE of the frozen LLM predicting each transcript from its clip's adapted quantised vectors."""
        if self.semantic_llm is None:
            return None
        llm, adapter = self.semantic_llm, self.semantic_adapter
        rows = [i for i, t in enumerate(text or []) if t and t.strip()]
        if not rows:  # keep the adapter in the graph: every rank reduces the same gradients
            return (adapter(q[:1, :1]).float().sum() * 0).reshape(())
        eos = self.text_tokenizer.eos_token_id
        limit = int(self.args["semantic_max_tokens"])
        embed = llm.get_input_embeddings()
        seqs, targets, spans = [], [], []
        for i in rows:
            ids = self.text_tokenizer(text[i], add_special_tokens=False)["input_ids"][:limit] + [eos]
            ids_t = torch.tensor(ids, dtype=torch.long, device=q.device)
            n = int(frames[i])
            prefix = adapter(q[i, :n])
            seqs.append(torch.cat([prefix, embed(ids_t).to(prefix.dtype)]))
            targets.append(ids_t)
            spans.append((n - 1, n - 1 + len(ids)))  # position j predicts token j + 1
        lengths = torch.tensor([s.shape[0] for s in seqs], device=q.device)
        inputs = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        attn = (torch.arange(inputs.shape[1], device=q.device)[None, :] < lengths[:, None]).long()
        hidden = llm.model(inputs_embeds=inputs.to(embed.weight.dtype), attention_mask=attn).last_hidden_state
        picked = torch.cat([hidden[r, s:e] for r, (s, e) in enumerate(spans)])
        logits = llm.lm_head(picked).float()
        return F.cross_entropy(logits, torch.cat(targets))


def build_audio_tokenizer(
    model_cfg: dict[str, Any], task_args: dict[str, Any] | None, run_dir: Any = None
) -> nn.Module:
    """Stage 0.1's module for the training loop (``run_dir`` is unused: nothing is written outside the export)."""
    return AudioTokenizerTraining(model_cfg, task_args)
