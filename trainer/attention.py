"""The LLM's attention: packed sequences kept apart by explicit segment lengths, and Ulysses sequence parallelism.

**Packed attention.** A training row packs several samples (``trainer.data.pack_arrays``); the pack's
sample boundaries travel as data, ``seq_lens`` (per row, the length of each sample and then of the
padding, which is a segment of its own). ``OmniModel`` switches its Qwen2 LLM to ``PACKED``, an
attention function registered through transformers' ``AttentionInterface``: each token attends
causally within its own segment only, whatever the position ids, the cache or the transformers
version (4.55 infers boundaries from position ids only with the cache off; older versions never do).
Segments reach the function as the ``segments`` keyword of the LLM call (a ``Segments``), which
Qwen2's layers pass through to their attention function. The kernel:

- CUDA, fp16/bf16, ``flash_attn`` installed: ``flash_attn_varlen_func`` with ``cu_seqlens``;
- otherwise: ``scaled_dot_product_attention`` per segment (exact, memory O(longest segment²)).

Without ``segments`` a row is one causal sequence (generation: one sequence, with a KV cache).
With a cache, the queries are the last ``Lq`` of the ``Lk`` keys: the segments describe the keys and
each query attends causally (bottom-right aligned) within its segment. The LLM gets no attention mask
(``PACKED`` has no mask function, so transformers builds none): masks are never materialised.

**Ulysses sequence parallelism** (DeepSpeed's ``UlyssesSPAttentionHF``, the current form of
``deepspeed.sequence.layer.DistributedAttention`` for transformers models): ``N`` consecutive ranks
share one sequence, each holding a contiguous 1/N of its tokens. Around the attention an all-to-all
trades the sequence split for a head split (KV heads are replicated when there are fewer than ``N``),
so every rank attends over the full sequence for ``heads / N`` heads; the packed segments are global,
so they apply unchanged. ``SequenceParallel`` carries the group into ``OmniModel.forward``;
``deepspeed_mpu`` gives DeepSpeed the matching groups (DeepSpeed's ``parallel_state_sp``): ZeRO
partitions and reduces gradients over all ranks and divides by the data-parallel size ``world / N``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainer import hf_compat  # noqa: F401  (before transformers)

PACKED = "omni_packed"


# ---------------------------------------------------------------- segments


@dataclass
class Segments:
    """Per row, the lengths of its segments (they sum to the row's full, unsharded key length)."""

    lengths: list[list[int]]
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_seq_lens(cls, seq_lens: torch.Tensor) -> Segments:
        """``seq_lens [B, S]``, zero-padded (``trainer.data.collate``), → segments."""
        return cls([[int(n) for n in row if n > 0] for row in seq_lens.detach().cpu().tolist()])

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> Segments:
        """Segments where the position ids restart (a position that is not the previous one + 1), for
        callers that give position ids only. Padding at position 0 becomes one-token segments."""
        out = []
        for row in position_ids.detach().cpu().reshape(-1, position_ids.shape[-1]).tolist():
            lengths, start = [], 0
            for i in range(1, len(row)):
                if row[i] != row[i - 1] + 1:
                    lengths.append(i - start)
                    start = i
            lengths.append(len(row) - start)
            out.append(lengths)
        return cls(out)

    @classmethod
    def of_batch(cls, seq_lens: torch.Tensor | None, position_ids: torch.Tensor) -> Segments:
        """A batch's segments: its ``seq_lens`` when given, else where its position ids restart."""
        return cls.from_seq_lens(seq_lens) if seq_lens is not None else cls.from_position_ids(position_ids)

    @classmethod
    def whole(cls, batch: int, length: int) -> Segments:
        return cls([[length] for _ in range(batch)])

    def check(self, batch: int, keys: int) -> None:
        if len(self.lengths) != batch:
            raise ValueError(f"segments for {len(self.lengths)} rows, the batch has {batch}")
        for i, row in enumerate(self.lengths):
            if sum(row) != keys:
                raise ValueError(f"row {i}: segment lengths sum to {sum(row)}, the sequence has {keys} keys")


def seq_lens_array(lengths: list[int], seq_len: int) -> list[int]:
    """A pack's segment lengths: its samples', then the padding's (if any) as one more segment."""
    used = sum(lengths)
    if used > seq_len:
        raise ValueError(f"samples of {used} tokens do not fit a pack of {seq_len}")
    return [*lengths, seq_len - used] if used < seq_len else list(lengths)


# ---------------------------------------------------------------- kernels


def _query_spans(segments: Segments, lq: int, lk: int) -> list[tuple[int, int, int, int, int]]:
    """(row, key start, key end, query start, query end) of every segment that holds queries; the queries
    are the last ``lq`` of the ``lk`` keys, so a segment's queries are always its tail."""
    offset = lk - lq
    spans = []
    for b, row in enumerate(segments.lengths):
        start = 0
        for n in row:
            end = start + n
            q0 = max(start, offset)
            if q0 < end:
                spans.append((b, start, end, q0 - offset, end - offset))
            start = end
    return spans


def _flash_available(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_index(
    segments: Segments, lq: int, lk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """For the segments that hold queries: the flat (row-major ``[B·L]``) indices of their queries and keys,
    their ``cu_seqlens`` (int32) for queries and keys, and the longest of each. Cached per layer call shape."""
    key = ("varlen", lq, lk, str(device))
    if key not in segments._cache:
        spans = _query_spans(segments, lq, lk)
        q_idx = torch.cat([torch.arange(r * lq + q0, r * lq + q1) for r, _, _, q0, q1 in spans])
        k_idx = torch.cat([torch.arange(r * lk + k0, r * lk + k1) for r, k0, k1, _, _ in spans])
        nq = [q1 - q0 for _, _, _, q0, q1 in spans]
        nk = [k1 - k0 for _, k0, k1, _, _ in spans]
        cu_q = F.pad(torch.tensor(nq).cumsum(0), (1, 0)).to(torch.int32)
        cu_k = F.pad(torch.tensor(nk).cumsum(0), (1, 0)).to(torch.int32)
        segments._cache[key] = (
            q_idx.to(device),
            k_idx.to(device),
            cu_q.to(device),
            cu_k.to(device),
            max(nq),
            max(nk),
        )
    return segments._cache[key]


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    kernel: Any,
    **kernel_kwargs: Any,
) -> torch.Tensor:
    """``kernel`` (``flash_attn_varlen_func``'s signature, causal) on the segments' packed ``[tokens, heads, dim]``
    queries/keys/values; the output scattered back to ``[B, Lq, H, D]`` (zeros for rows no segment holds)."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    q_idx, k_idx, cu_q, cu_k, max_q, max_k = varlen_index(segments, lq, lk, query.device)
    qf = query.transpose(1, 2).reshape(b * lq, h, d)[q_idx]
    kf = key.transpose(1, 2).reshape(b * lk, key.shape[1], d)[k_idx]
    vf = value.transpose(1, 2).reshape(b * lk, value.shape[1], d)[k_idx]
    o = kernel(qf, kf, vf, cu_q, cu_k, max_q, max_k, causal=True, **kernel_kwargs)
    return query.new_zeros(b * lq, h, d).index_copy(0, q_idx, o.to(query.dtype)).view(b, lq, h, d)


def _flash(query, key, value, segments, scaling, dropout) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    # causal=True aligns each segment's queries to the end of its keys (flash-attn >= 2.1): the cache case
    return varlen_attention(
        query, key, value, segments, flash_attn_varlen_func, dropout_p=dropout, softmax_scale=scaling
    )


def _sdpa(query, key, value, segments, scaling, dropout) -> torch.Tensor:
    b, h, lq, d = query.shape
    spans = _query_spans(segments, lq, key.shape[2])
    rep = h // key.shape[1]  # GQA: KV heads repeated per segment (sdpa's enable_gqa leaves CUDA's fused kernels)
    out = query.new_zeros(b, lq, h, d)
    for r, k0, k1, q0, q1 in spans:
        q, k, v = query[r : r + 1, :, q0:q1], key[r : r + 1, :, k0:k1], value[r : r + 1, :, k0:k1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        nq, nk = q1 - q0, k1 - k0
        mask, causal = None, nq > 1
        if causal and nq < nk:  # a tail of queries (a cache holds the segment's start): bottom-right causal
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            causal = False
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling)
        out[r, q0:q1] = o[0].transpose(0, 1)
    return out


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within segments, on one rank's full sequence: ``query [B, H, Lq, D]``, ``key/value
    [B, Hkv, Lk, D]`` (H a multiple of Hkv) → ``[B, Lq, H, D]``."""
    if attention_mask is not None:
        raise ValueError(f"{PACKED} attention takes segments, not an attention mask")
    if sliding_window is not None:
        raise ValueError(f"{PACKED} attention has no sliding window (set use_sliding_window: false)")
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    segments = segments if segments is not None else Segments.whole(b, lk)
    segments.check(b, lk)
    kernel = _flash if _flash_available(query) else _sdpa
    return kernel(query, key, value, segments, scaling, dropout), None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    ulysses: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What ``PACKED`` names: packed attention, wrapped in the Ulysses all-to-all when the LLM call passes
    ``ulysses`` (``SequenceParallel.attention``)."""
    if ulysses is not None:
        return ulysses(module, query, key, value, attention_mask, **kwargs)
    return packed_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> str:
    """Register ``PACKED`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, attention_forward)
    return PACKED


def use_packed_attention(config: Any) -> None:
    """Switch a transformers text config (the LLM's) to ``PACKED``."""
    config._attn_implementation = register()


# ---------------------------------------------------------------- Ulysses sequence parallelism


class SequenceParallel:
    """One rank's place in its sequence-parallel group: which contiguous 1/N of every sequence it holds."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.grad_scale = 1.0  # see zero3_grad_scale
        self._attention: dict[tuple[int, ...], Any] = {}

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous part of ``x`` along ``dim`` (the sequence length must divide by N)."""
        n = x.shape[dim]
        if n % self.size:
            raise ValueError(f"sequence length {n} does not divide by sequence_parallel {self.size}")
        step = n // self.size
        return x.narrow(dim, self.rank * step, step)

    def local_range(self, length: int) -> tuple[int, int]:
        step = length // self.size
        return self.rank * step, (self.rank + 1) * step

    def local_rows(
        self, rows: torch.Tensor, values: torch.Tensor, length: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flat indices ``rows`` into the full ``[B, length]`` sequence that fall in this rank's share, as flat
        indices into its ``[B, length / N]`` share, with their ``values`` rows; (None, None) when none do."""
        lo, hi = self.local_range(length)
        b, t = rows // length, rows % length
        keep = (t >= lo) & (t < hi)
        if not bool(keep.any()):
            return None, None
        return b[keep] * (hi - lo) + t[keep] - lo, values[keep]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (no gradient)."""
        import torch.distributed as dist

        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x

    def loss(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's share of the loss → the whole sequence's loss as the value (every rank of the group
        reports the same), with the gradient of the share alone, times ``grad_scale``."""
        scaled = local * self.grad_scale
        return scaled + (self.all_reduce(local) - scaled).detach()

    def attention(self, config: Any, batch: int) -> Any:
        """DeepSpeed's Ulysses attention around ``packed_attention_forward``, for the LLM ``config``."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        heads, kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        key = (batch, heads, kv, head_dim, config.num_hidden_layers)
        if key not in self._attention:
            check_heads(heads, kv, self.size)
            self._attention[key] = UlyssesSPAttentionHF(
                attn=packed_attention_forward,
                batch_size=batch,
                attn_head_count=heads,
                attn_head_size=head_dim,
                kv_head_count=kv,
                num_hidden_layers=config.num_hidden_layers,
                process_group=self.group,
                seq_length_is_variable=True,
            )
        return self._attention[key]


def check_heads(heads: int, kv_heads: int, size: int) -> None:
    """Ulysses splits the heads over N ranks: N must divide the attention heads, and divide or be divided by
    the KV heads (fewer KV heads than N are replicated)."""
    if heads % size:
        raise ValueError(f"sequence_parallel {size} does not divide the LLM's {heads} attention heads")
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"sequence_parallel {size} and the LLM's {kv_heads} key/value heads: one must divide the other"
        )


def zero3_grad_scale(ds_config: dict[str, Any], size: int) -> float:
    """The factor the group's loss gradients need so DeepSpeed averages them over data parallel only.

    DeepSpeed sums gradients over all ``world`` ranks (the group's shares add up to the sequence's
    gradient) and divides by ``world / size`` in ZeRO 0-2; ZeRO-3's reduce-scatter path (0.19.8,
    ``reduce_scatter: true``, the default and what ``train.deepspeed_config`` sets under sequence
    parallelism) divides by ``world`` instead, so the loss gradient is scaled by ``size`` there."""
    zero = ds_config.get("zero_optimization") or {}
    return float(size) if size > 1 and int(zero.get("stage", 0)) == 3 else 1.0


def deepspeed_mpu(size: int) -> Any:
    """The parallel-state object ``deepspeed.initialize(mpu=...)`` takes for Ulysses: DeepSpeed's
    ``parallel_state_sp`` with groups of ``size`` consecutive ranks (built, collectively, when the size
    changes). ``size`` 1 returns None and forgets a previous stage's groups, so that DeepSpeed (which keeps
    the last mpu it saw in ``deepspeed.utils.groups``) averages gradients over every rank again."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.utils import groups

    if size <= 1:
        if groups.mpu is mpu:
            groups.mpu = None
        return None
    current = mpu._SEQUENCE_PARALLEL_GROUP
    if current is None or mpu.get_sequence_parallel_world_size() != size:
        mpu._release_sequence_parallel_groups()
        mpu.initialize_sequence_parallel(size)
    return mpu


def stage_sequence_parallel(stage: Any, world: int) -> tuple[Any, SequenceParallel | None]:
    """A stage's ``sequence_parallel``: DeepSpeed's mpu (or None) and this rank's ``SequenceParallel`` (or None).
    Collective: every rank calls it, in the same order."""
    size = int(getattr(stage, "sequence_parallel", 1) or 1)
    if size > 1:
        where = f"stage {stage.stage}: sequence_parallel {size}"
        if stage.is_audio:
            raise ValueError(f"{where}: sequence parallelism applies to the LLM stages only")
        if world % size:
            raise ValueError(f"{where} does not divide the {world} ranks")
        if stage.seq_len % size:
            raise ValueError(f"{where} does not divide seq_len {stage.seq_len}")
    mpu = deepspeed_mpu(size)
    return mpu, SequenceParallel(mpu.get_sequence_parallel_group()) if mpu is not None else None
