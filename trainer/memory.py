"""Memory at scale: chunked cross-entropy, per-layer activation checkpointing, ``deepspeed.zero.Init``
builds, and the measurements that show what each saves.

- ``chunked_cross_entropy``: the LM head + cross-entropy over the labelled rows, ``chunk`` rows at a time.
  A custom autograd function keeps only its inputs for backward and recomputes each chunk's logits
  there, so the full-vocabulary logits exist for one chunk at a time (in the compute dtype, upcast to
  fp32 per chunk), never for all rows: at 64k tokens and a 152k vocabulary that is ~40 GB of fp32
  logits (plus their gradient) not held. Loss and gradients equal the unchunked computation.
- ``set_activation_checkpointing``: recompute each LLM decoder layer / ViT block in backward
  (``torch.utils.checkpoint``, non-reentrant) instead of keeping its activations; per tower.
- ``partitioned_build``: the context a ZeRO-3 stage builds its model in: ``deepspeed.zero.Init`` (each
  parameter is partitioned across ranks as soon as its module exists, in the stage's dtype) with
  transformers' weight init run on gathered parameters, so a random model equals the plain build.
- ``LiveBytes`` / ``saved_bytes``: measured peak bytes of live tensors and bytes saved for backward
  (CPU torch has no allocator statistics); ``rss_peak_bytes`` with ``reset_rss_peak`` for the process.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------- chunked cross-entropy


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-row ``cross_entropy(linear(hidden, weight, bias).float(), targets)`` over row chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):  # noqa: ANN001, ANN205
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s : s + chunk], weight, bias).float()
            losses[s : s + chunk] = F.cross_entropy(logits, targets[s : s + chunk], reduction="none")
            del logits
        ctx.chunk = chunk
        ctx.save_for_backward(hidden, weight, bias, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        hidden, weight, bias, targets = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        n = hidden.shape[0]
        # one chunk: the weight/bias gradients are one matmul/sum in the compute dtype, as unchunked; several
        # chunks accumulate in fp32 (one rounding at the end, as one matmul has), bf16 chunk results added in
        acc = weight.dtype if n <= chunk else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_loss = grad_loss.float()
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk]
            logits = F.linear(h, weight, bias).float()
            g = torch.softmax(logits, dim=-1)
            del logits
            rows = torch.arange(g.shape[0], device=g.device)
            g[rows, targets[s : s + chunk]] -= 1.0
            g.mul_(grad_loss[s : s + chunk, None])
            g = g.to(hidden.dtype)  # what the unchunked graph's ``.float()`` hands back to the linear layer
            if need_h:
                grad_h[s : s + chunk] = g @ weight
            if need_w:
                if acc == g.dtype:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w.add_(g.t() @ h)
            if need_b:
                grad_b.add_(g.sum(0))
            del g
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-row fp32 cross-entropy of ``head(hidden)`` against ``targets`` (``[N, d]``, ``[N]``), computed
    ``chunk`` rows at a time; ``chunk <= 0`` or ``>= N`` still avoids keeping the logits for backward.

    Under ZeRO-3 the head's weight is read outside ``head.forward``: the engine's forward gathers it (and
    registers it as an external parameter of the calling module, which gathers it again for backward);
    ``register_zero3_externals`` registers it up front."""
    n = hidden.shape[0]
    chunk = n if chunk <= 0 else min(chunk, max(n, 1))
    bias = head.bias if getattr(head, "bias", None) is not None else None
    return _ChunkedLinearCE.apply(hidden, head.weight, bias, targets, max(chunk, 1))


def register_zero3_externals(model: nn.Module) -> None:
    """Parameters ``OmniModel.forward`` reads outside their own module's forward (the LM head in the
    chunked cross-entropy) are gathered for the model's forward and backward under ZeRO-3."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return
    import deepspeed

    head = getattr(model, "lm_head", None)
    if head is not None:
        for p in head.parameters():
            deepspeed.zero.register_external_parameter(model, p)


# ---------------------------------------------------------------- activation checkpointing

TOWERS = ("llm", "vision")


def checkpoint_towers(spec: bool | dict[str, Any] | None) -> dict[str, bool]:
    """``activation_checkpointing`` of a stage: a bool (every tower) or a mapping ``{llm: true, vision: false}``."""
    if spec is None or isinstance(spec, bool):
        return dict.fromkeys(TOWERS, bool(spec))
    if not isinstance(spec, dict):
        raise ValueError(f"activation_checkpointing must be true/false or a mapping of {', '.join(TOWERS)}")
    unknown = sorted(set(spec) - set(TOWERS))
    if unknown:
        raise ValueError(f"activation_checkpointing: unknown towers {unknown} (known: {', '.join(TOWERS)})")
    return {t: bool(spec.get(t, False)) for t in TOWERS}


def _tower_layers(model: nn.Module, tower: str) -> list[nn.Module]:
    if tower == "llm":
        return list(model.model.layers)
    return list(model.model.visual_model.blocks)


def set_activation_checkpointing(model: nn.Module, spec: bool | dict[str, Any] | None) -> dict[str, int]:
    """Turn per-layer activation checkpointing on (or off) per tower of an ``OmniModel``: each LLM decoder
    layer / ViT block is recomputed in backward (non-reentrant ``torch.utils.checkpoint``, RNG state
    restored) instead of keeping its activations. A tower is checkpointed where a gradient passes through
    it: its own parameters train, or (for the LLM) something feeding its inputs does (the projector, the
    ViT, the token or audio embeddings: stages 1.1, 2.1 and 4.2 keep a frozen LLM's activations for that
    gradient). A tower no gradient crosses keeps nothing for backward and is left alone. Returns the
    checkpointed layer count per tower."""
    from torch.utils.checkpoint import checkpoint

    towers = checkpoint_towers(spec)
    fn = functools.partial(checkpoint, use_reentrant=False)
    done = {}
    for tower, on in towers.items():
        layers = _tower_layers(model, tower)
        trains = any(p.requires_grad for layer in layers for p in layer.parameters())
        if tower == "llm":
            feeding = (model.model.embed_tokens, model.model.visual_model, model.model.visual_bridge_model)
            feeding += (model.model.audio_embed_layers,)
            trains = trains or any(p.requires_grad for m in feeding for p in m.parameters())
        for layer in layers:
            if not hasattr(layer, "gradient_checkpointing"):
                raise TypeError(f"{type(layer).__name__} does not support activation checkpointing")
            layer.gradient_checkpointing = bool(on and trains)
            layer._gradient_checkpointing_func = fn
        done[tower] = len(layers) if on and trains else 0
    return done


def configure(model: nn.Module, stage: Any) -> dict[str, int]:
    """A stage's memory settings on its model: cross-entropy chunk size and activation checkpointing."""
    model.ce_chunk_tokens = int(stage.ce_chunk_tokens)
    return set_activation_checkpointing(model, stage.activation_checkpointing)


# ---------------------------------------------------------------- ZeRO-3 builds


def zero3(ds_config: dict[str, Any]) -> bool:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3


@contextlib.contextmanager
def partitioned_build(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build a model inside this to have it partitioned across the ranks from the start (ZeRO-3): no rank
    ever holds the whole model, and parameters take the config's dtype (bf16 when enabled) at once.

    zero.Init broadcasts rank 0's value of every parameter as it partitions it. transformers initialises
    weights after a sub-model's layers exist (``post_init``), when they are already partitioned, so its
    per-module init runs here on the module's gathered parameters (rank 0's result is kept): a random
    model built this way equals the plain build with the same seed. Pretrained towers load into the
    partitioned model through ``trainer.weights.load_into`` (module by module, rank 0's values), never
    ``from_pretrained`` (which would need transformers' ``HfDeepSpeedConfig`` and accelerate)."""
    import deepspeed
    from transformers import PreTrainedModel

    def own_and_leaf_params(module: nn.Module) -> list[nn.Parameter]:
        # a module's parameters and its leaf children's: an init that runs after the children exist
        # (Whisper's encoder sets its position embedding, attention zeroes out_proj.bias) finds them partitioned
        params = list(module.parameters(recurse=False))
        for child in module.children():
            if next(child.children(), None) is None:
                params.extend(child.parameters(recurse=False))
        return params

    hf_init = PreTrainedModel._initialize_weights
    mha_init = nn.MultiheadAttention._reset_parameters

    def hf_gathered(self: PreTrainedModel, module: nn.Module) -> None:
        if getattr(module, "_is_hf_initialized", False):
            return
        with deepspeed.zero.GatheredParameters(own_and_leaf_params(module), modifier_rank=0):
            hf_init(self, module)

    def mha_gathered(self: nn.MultiheadAttention) -> None:
        with deepspeed.zero.GatheredParameters(own_and_leaf_params(self), modifier_rank=0):
            mha_init(self)

    PreTrainedModel._initialize_weights = hf_gathered
    nn.MultiheadAttention._reset_parameters = mha_gathered
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel._initialize_weights = hf_init
        nn.MultiheadAttention._reset_parameters = mha_init


def local_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` this rank holds (its partition under ZeRO-3)."""
    return p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


# ---------------------------------------------------------------- measuring


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created while active that are still alive, and their peak (``peak``).

    CPU torch keeps no allocator statistics; this counts the storages every op creates (not views or
    in-place results, which share an input's storage) and checks at each op which of them were freed, so
    ``peak`` is the most memory the computation held at once on top of what existed before (parameters).
    ``at_mark`` records the live bytes when ``mark()`` is called (after forward: what backward needs)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.storages: dict[int, tuple[Any, int]] = {}
        self.live = 0
        self.peak = 0
        self.at_mark = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.storages.items() if ref.expired()]
        for k in dead:
            self.live -= self.storages.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self._sweep()
        out = func(*args, **(kwargs or {}))
        inputs = {  # a view or an in-place result shares its input's storage: counted already, or not ours
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st.data_ptr() in inputs and st.nbytes():
                    continue
                ref = self._ref(st)
                if ref.cdata not in self.storages:
                    self.storages[ref.cdata] = (ref, st.nbytes())
                    self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        return out

    def mark(self) -> int:
        self._sweep()
        self.at_mark = self.live
        return self.live


@contextlib.contextmanager
def saved_bytes() -> Iterator[dict[str, int]]:
    """Bytes of the distinct storages autograd saves for backward while active (``out['bytes']``), weights
    and their views left out; a checkpointed layer saves nothing here (its own hooks replace these inside
    the layer, and it keeps its inputs itself)."""
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        weight = isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)  # a weight or its view (W.t())
        if key not in seen and not weight:
            seen[key] = st.nbytes()
            out["bytes"] = sum(seen.values())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def reset_rss_peak() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """Peak resident set size of this process since start or the last ``reset_rss_peak``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Run ``fn()`` (returns a loss) and its backward; peak live bytes, live bytes kept after the forward,
    bytes saved for backward and the process's RSS peak above its RSS before."""
    base = rss_bytes()
    reset_rss_peak()
    with LiveBytes() as live:
        with saved_bytes() as saved:
            loss = fn()
        live.mark()
        loss.backward()
    return {
        "peak_live": live.peak,
        "after_forward": live.at_mark,
        "saved": saved["bytes"],
        "rss_peak_extra": max(0, rss_peak_bytes() - base),
    }


def model_build(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """``partitioned_build`` for a ZeRO-3 config, else nothing."""
    return partitioned_build(ds_config) if zero3(ds_config) else contextlib.nullcontext()


def partition_report(model: nn.Module) -> dict[str, Any]:
    """What this rank holds of each parameter: ``params`` name -> [local, full] elements, their sums, and
    whether any parameter is ZeRO-3 partitioned."""
    params = {n: [local_numel(p), full_numel(p)] for n, p in model.named_parameters()}
    return {
        "partitioned": any(hasattr(p, "ds_id") for p in model.parameters()),
        "local": sum(v[0] for v in params.values()),
        "full": sum(v[1] for v in params.values()),
        "params": params,
    }
