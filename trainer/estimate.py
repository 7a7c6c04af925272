"""``omni train STAGE.yaml --estimate``: per-GPU memory and tokens/s of an LLM stage before launching it.

Nothing starts and no tokenizer is trained: the model is built on the meta device (its shapes only; a
``vocab_size: null`` LLM takes the tokenizer's configured ``vocab_size`` rounded up to 64, and an
``llm.pretrained`` directory lends its ``config.json``), the stage's ``trainable`` names freeze the rest,
and the stage's DeepSpeed config gives the ZeRO stage. ``omni train-all --estimate`` (or
``python -m trainer.estimate --table``) prints one line per LLM stage for several world sizes.
Memory is in GiB (2**30 bytes), the unit in which an "80 GB" card holds 80.

Model states (bf16 mixed precision, fp32 master weights, Adam), bytes per parameter, following
DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` without offload give the same totals for a fully trainable
model; tests/test_estimate.py checks it), partitioned over all ``world`` ranks (with Ulysses sequence
parallelism ZeRO still partitions over every rank):

====================  ==========  ======  =======  =======  ===================================
what                  per param   ZeRO-0  ZeRO-1   ZeRO-2   ZeRO-3
====================  ==========  ======  =======  =======  ===================================
bf16 weights          2, all      whole   whole    whole    / world
bf16 gradients        2, trained  whole   whole    / world  (in the gathered working set)
fp32 gradients        4, trained  whole   / world  / world  / world
fp32 master + Adam    12, trained whole   / world  / world  / world
gathered working set  --          --      --       --       4 B x the largest module's params
====================  ==========  ======  =======  =======  ===================================

i.e. ZeRO-2: 2·P + 18·P/world, ZeRO-3: 18·P/world + 4·P_largest_module, as DeepSpeed counts
(16-bit weights and gradients of the module being computed are its ZeRO-3 working set). Frozen
parameters cost their 2 bf16 bytes (partitioned too under ZeRO-3). DeepSpeed's communication buckets
(``reduce_bucket_size`` + ``allgather_bucket_size``, or ZeRO-3's ``stage3_prefetch_bucket_size``,
elements of 2 bytes) get a row; CUDA context, NCCL buffers and allocator fragmentation a fixed
allowance (``--reserve``, 6 GiB).

Activations, bytes per token of the rank's ``micro_batch × seq_len / sequence_parallel`` tokens (Ulysses
shards every activation by sequence outside attention and by heads inside it, so all of them divide
by the SP degree). The approach is Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models" (arXiv:2205.05198, §4.1: ``sbh(34 + 5as/h)`` per GPT layer, 16-bit),
re-derived tensor by tensor for the modules we run (Hugging Face's Qwen2 decoder layer and Qwen2-VL
vision block with sdpa/flash attention: no ``L²`` scores, only the log-sum-exp; SwiGLU instead of a 4h
GeLU MLP; no dropout; HF's RMSNorm keeps an fp32 copy of its input), with ``h`` hidden, ``i`` MLP
width, ``kv`` = key/value heads × head dim, ``dh`` head dim, ``nh`` heads, in bf16:

- LLM layer, trainable: ``22h + 4kv + 8i + 4dh + 4nh + 8`` =
  2 RMSNorms (fp32 input 4h, normalised bf16 2h, rstd 4) + inputs of q/k/v, o and gate/up (3 × 2h)
  and of down (2i) + RoPE cos/sin (4dh) + attention q, k, v, output (4h + 4kv) and log-sum-exp (4nh)
  + SwiGLU gate, SiLU(gate), up (6i).
- LLM layer, frozen while a gradient passes through it (a trainable projector / audio embedding below
  it): ``12h + 4kv + 6i + 4dh + 4nh + 8`` (frozen linears keep no inputs).
- activation checkpointing (``true``, or per tower ``{llm: .., vision: ..}``, as trainer/memory.py reads
  it; the LLM is checkpointed wherever a gradient crosses it, frozen or not): the layer input (2h) per
  layer, plus one layer's full set while it is recomputed.
- Ulysses with fewer key/value heads than ranks replicates them: ``kv`` counts ``max(kv_heads, sp)``.
- after the last layer: final RMSNorm and LM-head input, ``8h + 4`` per labelled row.
- ViT block (Qwen2-VL, trainable), per patch: ``18e + 6m + 8dh + 4nh + 8`` (LayerNorms keep inputs
  and bf16 statistics, fp32 rotary cos/sin 8dh, QuickGELU keeps input, sigmoid and output), plus the
  patch embedding's input (``3·2·14²·2`` bytes); ``merge²`` (4) patches per LLM image token, for an
  assumed ``--image-share`` of the tokens (0.5); the ViT is not sequence-sharded. The 2×2-merge
  projector keeps ``32e + 16`` per image token.
- left out: the frozen audio tokenizer (no grad), the audio head (only generated frames, a few
  percent), embeddings (indices only).
- logits, over the rank's ``r`` rows (all labelled, the worst case) and vocabulary ``V``: unchunked
  (``ce_chunk_tokens: 0``) the loss's backward peaks at ``12·r·V`` bytes (fp32 log-probs kept for
  backward, their gradient, the fp32 logits' gradient); trainer/memory.py's chunked cross-entropy keeps
  no logits and peaks at ``8·c·V`` for one chunk of ``c`` rows (fp32 logits + softmax), plus its fp32
  accumulator for the LM head's weight gradient and that gradient's bf16 copy (``6·V·h``) when the head
  trains. Both factors are what trainer/memory.py's ``LiveBytes`` measures on CPU in bf16.

Tokens/s = world × utilisation × peak / flops per token, with the LLM's flops only (as
trainer/train.py counts MFU): forward ``2N + 4·L·d·T`` (``N`` = decoder layers + LM head, ``L``
layers, ``d`` attention width, ``T`` = seq_len: PaLM's attention term, Chowdhery et al. 2022 app. B),
backward ``2N + 8·L·d·T`` for input gradients when a gradient passes through the LLM plus ``2N_trained``
for weight gradients (= ``6N + 12·L·d·T`` when all of it trains), and one more forward when
activation checkpointing recomputes it. ``--mfu`` (0.4) is the fraction of the GPUs' dense bf16 peak
(trainer/train.py ``PEAK_BF16_TFLOPS``) achieved on that executed work.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 2**30
DEFAULT_WORLDS = (8, 32, 128)
ACT = 2  # bf16 activations
LOGIT_PEAK_BYTES = 12  # per row and vocabulary entry, unchunked: fp32 log-probs, their grad, the logits' grad
LOGIT_CHUNK_BYTES = 8  # per row of one chunk and vocabulary entry (trainer/memory.py): fp32 logits + softmax
LOGIT_SAVED_BYTES = 4  # what the unchunked forward keeps: fp32 log-probs
DEFAULT_RESERVE = 6 * GiB
DEFAULT_IMAGE_SHARE = 0.5
UPSTREAM = ("model.embed_tokens", "model.visual_model", "model.visual_bridge_model", "model.audio_embed_layers")


class EstimateError(ValueError):
    """An estimate that cannot be made; the message says what to fix."""


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class VisionShape:
    embed: int
    mlp: int
    depth: int
    heads: int
    merge: int
    patch_dim: int

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads


def llm_layer_bytes(s: LLMShape, trainable: bool = True, sp: int = 1) -> int:
    """Bytes one Qwen2 decoder layer keeps for backward per token (bf16; see the module docstring). Under
    Ulysses with fewer key/value heads than ``sp`` ranks, each rank holds one replicated KV head."""
    h, i, dh, nh = s.hidden, s.intermediate, s.head_dim, s.heads
    kv = max(s.kv_heads, sp) * dh
    if trainable:
        return 22 * h + 4 * kv + 8 * i + 4 * dh + 4 * nh + 8
    return 12 * h + 4 * kv + 6 * i + 4 * dh + 4 * nh + 8


def vit_block_bytes(v: VisionShape) -> int:
    """Bytes one trainable Qwen2-VL vision block keeps for backward per patch (bf16)."""
    return 18 * v.embed + 6 * v.mlp + 8 * v.head_dim + 4 * v.heads + 8


def _round64(n: int) -> int:
    return -(-int(n) // 64) * 64


def shape_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config to build on the meta device: no weights to load, the vocabulary size known."""
    cfg = copy.deepcopy(cfg)
    llm = cfg.setdefault("llm", {})
    c = dict(llm.get("config") or {})
    pre = llm.get("pretrained")
    if pre:
        conf = Path(str(pre)) / "config.json"
        if not conf.is_file():
            raise EstimateError(f"llm.pretrained {pre}: no config.json (the estimate reads the LLM's shape from it)")
        doc = json.loads(conf.read_text(encoding="utf-8"))
        keep = set(c) | {
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "tie_word_embeddings",
            "head_dim",
        }
        c.update({k: v for k, v in doc.items() if k in keep})
        llm["pretrained"] = None
    if c.get("vocab_size") is None:
        tok = cfg.get("tokenizer") or {}
        if tok.get("vocab_size"):
            c["vocab_size"] = _round64(tok["vocab_size"])
        elif tok.get("path") and Path(str(tok["path"]), "tokenizer.json").is_file():
            from trainer.tokenizer import load_tokenizer

            c["vocab_size"] = _round64(len(load_tokenizer(tok["path"])))
        else:
            raise EstimateError("llm.config.vocab_size is null and the tokenizer gives no vocab_size: set one")
    llm["config"] = c
    for section in ("vision", "audio"):  # towers load their weights elsewhere; only their shapes count here
        sec = cfg.get(section)
        if isinstance(sec, dict):
            for k in list(sec):
                if k == "pretrained" or k.endswith("_from"):
                    sec[k] = None
    return cfg


_MODELS: dict[str, Any] = {}


def meta_model(cfg: dict[str, Any]) -> Any:
    """The omni model of ``cfg`` on the meta device (cached per config)."""
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _MODELS:
        from trainer.model import build_model

        _MODELS[key] = build_model(shape_config(cfg), device="meta")
    return _MODELS[key]


def largest_module(model: Any) -> tuple[str, int]:
    """The module with the most parameters of its own (DeepSpeed's ``model_to_params``)."""
    best = ("", 0)
    for name, m in model.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > best[1]:
            best = (name, n)
    return best


def _shapes(model: Any) -> tuple[LLMShape, VisionShape]:
    c = model.llm_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    llm = LLMShape(
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        head_dim,
        c.vocab_size,
    )
    v = model.model.visual_model.config
    vis = VisionShape(
        v.embed_dim, int(v.embed_dim * v.mlp_ratio), v.depth, v.num_heads, v.spatial_merge_size, model.patch_dim
    )
    return llm, vis


# ---------------------------------------------------------------- memory


def model_state_bytes(trainable: int, frozen: int, zero: int, world: int, largest_params: int = 0) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer states (see the module docstring's table)."""
    if zero not in (0, 1, 2, 3):
        raise EstimateError(f"ZeRO stage must be 0, 1, 2 or 3, not {zero}")
    shard = world if zero >= 1 else 1
    return {
        "params16": 2 * (trainable + frozen) / (world if zero == 3 else 1),
        "grads16": 0.0 if zero == 3 else 2 * trainable / (world if zero == 2 else 1),
        "grads32": 4 * trainable / shard,
        "optimizer": 12 * trainable / shard,
        "gathered": 4.0 * largest_params if zero == 3 else 0.0,
    }


def bucket_bytes(ds: dict[str, Any], zero: int) -> float:
    z = ds.get("zero_optimization") or {}
    if zero == 0:
        return 0.0
    reduce = float(z.get("reduce_bucket_size", 5e8))
    if zero == 3:
        return 2 * (reduce + float(z.get("stage3_prefetch_bucket_size", 5e7)))
    return 2 * (reduce + float(z.get("allgather_bucket_size", 5e8)))


@dataclass
class Row:
    name: str
    bytes: float
    how: str


@dataclass
class Estimate:
    stage: str
    stage_name: str
    model: str
    world: int
    nodes: int
    gpu: str
    gpu_memory: float
    zero: int
    sequence_parallel: int
    activation_checkpointing: str  # off | on | llm | vision: the towers it applies to
    ce_chunk_tokens: int
    micro_batch: int
    seq_len: int
    total_params: int
    trainable_params: int
    rows: list[Row]
    model_flops: float  # per token
    executed_flops: float  # per token, recompute included
    tokens_per_s: float
    mfu: float
    peak_tflops: float
    image_share: float
    llm: LLMShape | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def over(self) -> float:
        return self.total - self.gpu_memory

    def part(self, *names: str) -> float:
        return sum(r.bytes for r in self.rows if r.name in names)

    @property
    def activations(self) -> float:
        return sum(r.bytes for r in self.rows if r.name.startswith("activations"))


def _ckpt_label(towers: dict[str, bool], llm: bool, vit: bool) -> str:
    on = [t for t, trains in (("llm", llm), ("vision", vit)) if towers[t] and trains]
    return "off" if not on else "on" if len(on) == 2 or (on == ["llm"] and not vit) else on[0]


def peak_tflops(gpu: str) -> float:
    from trainer.train import PEAK_BF16_TFLOPS

    for k, v in PEAK_BF16_TFLOPS.items():
        if k.lower() == gpu.lower():
            return v
    raise EstimateError(f"--gpu {gpu}: unknown card (known: {', '.join(k.lower() for k in PEAK_BF16_TFLOPS)})")


def _zero_stage(stage: Any) -> tuple[int, dict[str, Any]]:
    ds = stage.deepspeed_config()
    return int((ds.get("zero_optimization") or {}).get("stage", 0)), ds


def _check_stage(stage: Any, world: int) -> None:
    if stage.is_audio:
        raise EstimateError(f"stage {stage.stage} trains the {stage.task}: --estimate covers the LLM stages")
    for key, low in (("sequence_parallel", 1), ("ce_chunk_tokens", 0), ("micro_batch", 1), ("seq_len", 1)):
        v = getattr(stage, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise EstimateError(f"stage {stage.stage}: {key} must be an integer >= {low}, not {v!r}")
    checkpointing(stage)
    if world % stage.sequence_parallel:
        raise EstimateError(f"sequence_parallel {stage.sequence_parallel} does not divide the {world} GPUs")


def checkpointing(stage: Any) -> dict[str, bool]:
    """The stage's ``activation_checkpointing`` per tower (``llm``, ``vision``), as trainer/memory.py reads it."""
    from trainer.memory import checkpoint_towers

    try:
        return checkpoint_towers(stage.activation_checkpointing)
    except ValueError as e:
        raise EstimateError(f"stage {stage.stage}: {e}") from e


def sp_heads_ok(llm: LLMShape, sp: int) -> str | None:
    """Why Ulysses cannot split this LLM's heads over ``sp`` ranks (trainer/attention.py), or None."""
    from trainer.attention import check_heads

    try:
        check_heads(llm.heads, llm.kv_heads, sp)
    except ValueError as e:
        return str(e)
    return None


def estimate(
    stage: Any,
    world: int,
    *,
    gpu_memory: float = 80 * GiB,
    gpu: str = "h100",
    mfu: float = 0.4,
    nodes: int = 1,
    image_share: float = DEFAULT_IMAGE_SHARE,
    reserve: float = DEFAULT_RESERVE,
    zero: int | None = None,
) -> Estimate:
    """Per-GPU memory and tokens/s of an LLM ``stage`` on ``world`` GPUs (``zero`` overrides the stage's)."""
    from trainer.stages import StageError, set_trainable

    if world < 1:
        raise EstimateError(f"world size must be at least 1, not {world}")
    _check_stage(stage, world)
    stage_zero, ds = _zero_stage(stage)
    zero = stage_zero if zero is None else zero
    cfg = stage.model_config()
    model = meta_model(cfg)
    try:
        set_trainable(model, stage.trainable)
    except StageError as e:
        raise EstimateError(f"stage {stage.stage}: {e}") from e
    llm, vis = _shapes(model)
    sp = stage.sequence_parallel
    why = sp_heads_ok(llm, sp) if sp > 1 else None
    if why:
        raise EstimateError(f"stage {stage.stage}: {why}")
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    trained = sum(p.numel() for _, p in params if p.requires_grad)

    def trains(*prefixes: str) -> bool:
        return any(p.requires_grad and n.startswith(prefixes) for n, p in params)

    def count(*prefixes: str, only_trained: bool = False) -> int:
        return sum(p.numel() for n, p in params if n.startswith(prefixes) and (p.requires_grad or not only_trained))

    big_name, big = largest_module(model)
    towers = checkpointing(stage)
    tokens = stage.micro_batch * stage.seq_len / sp
    st = model_state_bytes(trained, total - trained, zero, world, big)
    shard = f"/ {world}" if zero >= 1 else "whole"
    rows = [
        Row("bf16 weights", st["params16"], f"2 B x {_n(total)} params" + (f" / {world}" if zero == 3 else "")),
        Row(
            "bf16 gradients",
            st["grads16"],
            "in the gathered working set (ZeRO-3)"
            if zero == 3
            else f"2 B x {_n(trained)} trained" + (f" / {world}" if zero == 2 else ""),
        ),
        Row("fp32 gradients", st["grads32"], f"4 B x {_n(trained)} trained {shard}"),
        Row("fp32 master + Adam m, v", st["optimizer"], f"12 B x {_n(trained)} trained {shard}"),
    ]
    if zero == 3:
        rows.append(Row("ZeRO-3 gathered module", st["gathered"], f"4 B x {_n(big)} ({big_name})"))
    if zero:
        rows.append(Row("communication buckets", bucket_bytes(ds, zero), "2 B x the DeepSpeed config's bucket sizes"))

    # activations
    through = trains(*UPSTREAM)  # a gradient has to pass through the whole LLM
    layers_train = trains("model.layers.")
    grad_llm = through or layers_train
    ckpt = towers["llm"] and grad_llm  # trainer/memory.py checkpoints the LLM wherever a gradient crosses it
    per_layer = llm_layer_bytes(llm, layers_train, sp) if grad_llm else 0
    if not grad_llm:
        llm_act, how = 0.0, "nothing below the LM head trains: no grad through the LLM"
    elif ckpt:
        llm_act = tokens * (llm.layers * ACT * llm.hidden + per_layer)
        how = f"{_tok(tokens)} x ({llm.layers} layer inputs x 2h + one layer recomputed, {per_layer} B)"
    else:
        llm_act = tokens * llm.layers * per_layer
        how = f"{_tok(tokens)} x {llm.layers} {'' if layers_train else 'frozen '}layers x {per_layer} B"
    final = (8 * llm.hidden + 4) * tokens if (grad_llm or trains("lm_head")) else 0.0
    rows.append(Row(f"activations: LLM ({llm.layers} layers)", llm_act + final, how + " + final norm/head input"))
    vit_train = trains("model.visual_model.")
    if vit_train or trains("model.visual_bridge_model."):
        image_tokens = stage.micro_batch * stage.seq_len * image_share  # the ViT sees the whole pack
        patches = image_tokens * vis.merge**2
        block = vit_block_bytes(vis)
        proj = (32 * vis.embed + 16) * image_tokens
        if not vit_train:
            vit_act, how = proj, f"{_tok(image_tokens)} image tokens x {32 * vis.embed + 16} B"
        elif towers["vision"]:
            vit_act = patches * (vis.depth * ACT * vis.embed + block + ACT * vis.patch_dim) + proj
            how = f"{_tok(patches)} patches x ({vis.depth} block inputs + one block, {block} B) + projector"
        else:
            vit_act = patches * (vis.depth * block + ACT * vis.patch_dim) + proj
            how = f"{_tok(patches)} patches x {vis.depth} blocks x {block} B + projector"
        what = "ViT + projector" if vit_train else "projector"
        rows.append(Row(f"activations: {what} ({image_share:.0%} image tokens)", vit_act, how))
    if grad_llm or trains("lm_head"):
        chunk = stage.ce_chunk_tokens
        if chunk:
            logit_rows = min(tokens, chunk)
            head_grad = 6 * llm.vocab * llm.hidden if trains("lm_head") else 0
            logits = LOGIT_CHUNK_BYTES * logit_rows * llm.vocab + head_grad
            how = f"8 B x {_tok(logit_rows)} rows (one chunk) x {llm.vocab:,} vocab" + (
                " + the head's fp32 gradient accumulator" if head_grad else ""
            )
        else:
            logits = LOGIT_PEAK_BYTES * tokens * llm.vocab
            how = f"12 B x {_tok(tokens)} rows (all at once) x {llm.vocab:,} vocab"
        rows.append(Row("logits + cross-entropy", logits, how))
    rows.append(Row("CUDA context, NCCL, fragmentation", reserve, "fixed allowance (--reserve)"))

    # throughput
    n_layers, n_head = count("model.layers."), count("lm_head.")
    n_trained = count("model.layers.", "lm_head.", only_trained=True)
    attn = 4 * llm.layers * llm.attn_width * stage.seq_len
    fwd = 2 * (n_layers + n_head) + attn
    bwd = (2 * (n_layers + n_head) + 2 * attn if grad_llm else 0) + 2 * n_trained
    model_flops = fwd + bwd
    executed = model_flops + (fwd if ckpt else 0)
    peak = peak_tflops(gpu)
    tps = world * mfu * peak * 1e12 / executed
    notes: list[str] = []
    return Estimate(
        stage=str(stage.stage),
        stage_name=stage.name,
        model=str(cfg.get("name", stage.model)),
        world=world,
        nodes=nodes,
        gpu=gpu,
        gpu_memory=gpu_memory,
        zero=zero,
        sequence_parallel=sp,
        activation_checkpointing=_ckpt_label(towers, grad_llm, vit_train),
        ce_chunk_tokens=stage.ce_chunk_tokens,
        micro_batch=stage.micro_batch,
        seq_len=stage.seq_len,
        total_params=total,
        trainable_params=trained,
        rows=rows,
        model_flops=model_flops,
        executed_flops=executed,
        tokens_per_s=tps,
        mfu=mfu,
        peak_tflops=peak,
        image_share=image_share,
        llm=llm,
        notes=notes,
    )


# ---------------------------------------------------------------- hints


def hints(stage: Any, est: Estimate, **kw: Any) -> list[str]:
    """What would make ``est`` fit on the same GPUs: each change that helps alone, then (when none is
    enough) all of them together with the smallest sequence-parallel degree that fits."""
    world = est.world

    def again(**fields: Any) -> Estimate:
        return estimate(replace(stage, **fields), world, **kw)

    def say(what: str, e: Estimate) -> str:
        verdict = "fits" if e.fits else f"{e.over / GiB:.1f} GiB over"
        return f"{what}: {e.total / GiB:.1f} GiB per GPU ({verdict}), ~{e.tokens_per_s:,.0f} tokens/s"

    candidates: list[tuple[str, dict[str, Any]]] = [
        ("activation_checkpointing=true", {"activation_checkpointing": True})
    ]
    if stage.ce_chunk_tokens == 0 or stage.ce_chunk_tokens > 8192:
        candidates.append(("ce_chunk_tokens=4096", {"ce_chunk_tokens": 4096}))
    if est.zero < 3:
        candidates.append(("deepspeed=zero3", {"deepspeed": "zero3"}))
    out: list[str] = []
    together: dict[str, Any] = {}
    fits = False
    for label, fields in candidates:
        if stage.raw.get(next(iter(fields))) == next(iter(fields.values())):
            continue  # already so
        e = again(**fields)
        if e.total < est.total - 0.01 * GiB:  # only what helps
            out.append(say(f"--set {label}", e))
            together.update(fields)
            fits = fits or e.fits
    sps = [
        d
        for d in range(stage.sequence_parallel + 1, world + 1)
        if world % d == 0 and stage.seq_len % d == 0 and sp_heads_ok(est.llm, d) is None
    ]
    if sps:
        alone = next((d for d in sps if again(sequence_parallel=d).fits), sps[-1])
        e = again(sequence_parallel=alone)
        out.append(say(f"--set sequence_parallel={alone}", e))
        fits = fits or e.fits
        if not (together and again(**together).fits):
            together["sequence_parallel"] = next(
                (d for d in sps if again(**together, sequence_parallel=d).fits), sps[-1]
            )
    if len(together) > 1 and not fits:  # no single change is enough
        e = again(**together)
        labels = " ".join(f"--set {k}={_yaml(v)}" for k, v in together.items())
        out.append(say(f"together: {labels}", e))
        fits = fits or e.fits
    if not fits:
        out.append("or more GPUs: a larger --gpus shrinks the partitioned model states (ZeRO-3)")
    return out


def _yaml(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


# ---------------------------------------------------------------- printing


def _n(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _tok(n: float) -> str:
    return f"{n:,.0f}"


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_estimate(est: Estimate, hint_lines: list[str] | None = None) -> str:
    per_node = est.world // est.nodes
    lines = [
        f"stage {est.stage} ({est.stage_name}), model {est.model}: {_n(est.total_params)} params, "
        f"{_n(est.trainable_params)} trained",
        f"{est.world} GPUs ({est.nodes} node{'s' if est.nodes > 1 else ''} x {per_node}) "
        f"of {est.gpu_memory / GiB:g} GiB, "
        f"{est.gpu} ({est.peak_tflops:g} TFLOPS bf16), ZeRO-{est.zero}; {est.micro_batch} x {est.seq_len:,} tokens "
        f"per micro-batch, sequence_parallel {est.sequence_parallel}, activation_checkpointing "
        f"{est.activation_checkpointing}, ce_chunk_tokens {est.ce_chunk_tokens}",
        "",
    ]
    width = max(len(r.name) for r in est.rows) + 2
    lines.append(f"{'component':<{width}}{'GiB/GPU':>9}  how")
    for r in est.rows:
        lines.append(f"{r.name:<{width}}{_gib(r.bytes):>9}  {r.how}")
    lines.append(f"{'total':<{width}}{_gib(est.total):>9}  of {est.gpu_memory / GiB:g} GiB")
    lines.append("")
    if est.fits:
        lines.append(f"verdict: fits ({(est.gpu_memory - est.total) / GiB:.1f} GiB to spare)")
    else:
        lines.append(f"verdict: does not fit: {est.over / GiB:.1f} GiB over")
    recompute = " incl. the recomputed forward" if est.executed_flops > est.model_flops else ""
    lines.append(
        f"throughput: ~{est.tokens_per_s:,.0f} tokens/s ({est.tokens_per_s / est.world:,.0f} per GPU) at "
        f"{est.mfu:.0%} of peak; {est.model_flops / 1e9:.3g} GFLOP per token"
        + (f" ({est.executed_flops / 1e9:.3g}{recompute})" if recompute else "")
    )
    for n in est.notes:
        lines.append(f"note: {n}")
    if hint_lines:
        lines.append("to fit:")
        lines.extend(f"  {h}" for h in hint_lines)
    return "\n".join(lines)


def stage_table(stages: list[Any], worlds: tuple[int, ...] = DEFAULT_WORLDS, **kw: Any) -> str:
    """One line per LLM stage and world size: per-GPU GiB (model states / activations+logits), verdict, tokens/s."""
    head = (
        f"{'stage':<6}{'ZeRO':>5}{'seq':>7}{'ckpt':>5}{'sp':>4}{'trained':>9}{'GPUs':>6}"
        f"{'states':>8}{'act+log':>9}{'total':>8}  {'verdict':<22}{'tokens/s':>12}"
    )
    lines = [head, "-" * len(head)]
    skipped = []
    for st in stages:
        if st.is_audio:
            skipped.append(st.stage)
            continue
        for w in worlds:
            e = estimate(st, w, **kw)
            states = e.part(
                "bf16 weights",
                "bf16 gradients",
                "fp32 gradients",
                "fp32 master + Adam m, v",
                "ZeRO-3 gathered module",
            )
            act = e.activations + e.part("logits + cross-entropy")
            verdict = "fits" if e.fits else f"{e.over / GiB:.1f} GiB over"
            lines.append(
                f"{e.stage:<6}{e.zero:>5}{e.seq_len:>7}{e.activation_checkpointing:>5}"
                f"{e.sequence_parallel:>4}{_n(e.trainable_params):>9}{w:>6}{_gib(states):>8}{_gib(act):>9}"
                f"{_gib(e.total):>8}  {verdict:<22}{e.tokens_per_s:>12,.0f}"
            )
    if stages:
        e0 = next((estimate(s, worlds[0], **kw) for s in stages if not s.is_audio), None)
        if e0 is not None:
            lines.append(
                f"GiB per GPU of {e0.gpu_memory / GiB:g}; total includes buckets and a "
                f"{kw.get('reserve', DEFAULT_RESERVE) / GiB:g} GiB allowance; tokens/s at {e0.mfu:.0%} of "
                f"{e0.gpu} peak; ViT activations for {e0.image_share:.0%} image tokens; ckpt: the towers "
                "activation checkpointing applies to (those a gradient crosses, trainer/memory.py)"
            )
    if skipped:
        lines.append(f"audio stages {', '.join(skipped)} left out (--estimate covers the LLM stages)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_size(text: str, what: str, allow_zero: bool = False) -> float:
    """``80GB`` / ``80GiB`` / ``80G`` / ``80``: GiB (2**30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) < 0 or (float(m.group(1)) == 0 and not allow_zero):
        raise EstimateError(f"{what} {text!r} is not a size like 80GB")
    return float(m.group(1)) * GiB


def parse_worlds(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        worlds = tuple(int(p) for p in parts)
    except ValueError:
        raise EstimateError(f"--gpus {text!r} is not a GPU count (or a comma-separated list, e.g. 8,32,128)") from None
    if not worlds or any(w < 1 for w in worlds):
        raise EstimateError(f"--gpus must be at least 1, not {text}")
    return worlds


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--estimate`` flags of ``omni train`` / ``omni train-all``."""
    g = p.add_argument_group("estimate (nothing is launched)")
    g.add_argument(
        "--estimate",
        action="store_true",
        help="print per-GPU memory (weights, gradients, optimizer, activations, logits) and tokens/s, then stop",
    )
    g.add_argument("--gpus", help="world size(s): total GPUs, or a list like 8,32,128 (train: 8; train-all: 8,32,128)")
    g.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (must divide --gpus)")
    g.add_argument("--gpu-memory", default="80GB", help="memory per GPU (GB = GiB, as cards count it; default 80GB)")
    g.add_argument("--gpu", default="h100", help="card for the bf16 peak (h100, h200, h800, a100, a800, l40s)")
    g.add_argument("--mfu", type=float, default=0.4, help="fraction of the bf16 peak achieved (default 0.4)")
    g.add_argument(
        "--image-share",
        type=float,
        default=DEFAULT_IMAGE_SHARE,
        help="share of the tokens that are image tokens, for a trainable ViT's activations (default 0.5)",
    )
    g.add_argument("--reserve", default="6GB", help="allowance for CUDA context, NCCL, fragmentation (default 6GB)")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """``estimate()`` keywords from the parsed flags (EstimateError for a bad value)."""
    if not 0 < args.mfu <= 1:
        raise EstimateError(f"--mfu must be in (0, 1], not {args.mfu}")
    if not 0 <= args.image_share <= 1:
        raise EstimateError(f"--image-share must be in [0, 1], not {args.image_share}")
    if args.nodes < 1:
        raise EstimateError(f"--nodes must be at least 1, not {args.nodes}")
    peak_tflops(args.gpu)
    return {
        "gpu_memory": parse_size(args.gpu_memory, "--gpu-memory"),
        "gpu": args.gpu,
        "mfu": args.mfu,
        "image_share": args.image_share,
        "reserve": parse_size(args.reserve, "--reserve", allow_zero=True),
    }


def run(args: argparse.Namespace, stages: list[Any], table: bool = False) -> int:
    """Print the estimate of one stage (a table per world size) or, with ``table``, the cross-stage table."""
    worlds = parse_worlds(args.gpus or (",".join(map(str, DEFAULT_WORLDS)) if table else "8"))
    kw = options(args)
    for w in worlds:
        if w % args.nodes:
            raise EstimateError(f"--nodes {args.nodes} does not divide --gpus {w}")
    if table:
        print(stage_table(stages, worlds, **kw))
        return 0
    for i, w in enumerate(worlds):
        est = estimate(stages[0], w, nodes=args.nodes, **kw)
        if i:
            print()
        print(format_estimate(est, None if est.fits else hints(stages[0], est, nodes=args.nodes, **kw)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.estimate [--table] [STAGE ...]``: the shipped LLM stages' table by default."""
    from trainer.stages import CONF_DIR, StageError, discover_stages, load_stage, resolve_stage_ref

    p = argparse.ArgumentParser(prog="python -m trainer.estimate", description=__doc__.split("\n")[0])
    p.add_argument("stages", nargs="*", help="stage YAMLs or ids (default: every shipped stage)")
    p.add_argument("--table", action="store_true", help="one line per stage and world size")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        if args.stages:
            stages = [load_stage(resolve_stage_ref(s), args.overrides) for s in args.stages]
        else:
            stages = discover_stages(CONF_DIR / "stages", args.overrides)
        return run(args, stages, table=args.table or len(stages) > 1)
    except (EstimateError, StageError, FileNotFoundError) as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
