"""Packed-sequence attention (explicit segments) and DeepSpeed Ulysses sequence parallelism (2 gloo ranks).

The LLM is the tiny config's real Qwen2 (GQA: 4 heads, 2 key/value heads) inside a real OmniModel, in fp32.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from trainer.attention import (
    PACKED,
    Segments,
    _sdpa,
    check_heads,
    packed_attention_forward,
    seq_lens_array,
    varlen_attention,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
SPECIAL = SimpleNamespace(img_pad=120, audio_pad=121)
LENGTHS, PAD = [5, 9, 3], 7  # three samples and the padding: one row of 24


def tiny_cfg() -> dict:
    cfg = yaml.safe_load((REPO / "conf/models/tiny.yaml").read_text())
    cfg["llm"]["config"]["vocab_size"] = VOCAB
    return cfg


def tiny_model(seed: int = 0):
    from trainer.model import OmniModel

    torch.manual_seed(seed)
    return OmniModel(tiny_cfg(), special=SPECIAL)


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def _logits(model, embeds, positions, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_head(model.model(inputs_embeds=embeds, position_ids=positions, **kwargs).last_hidden_state)


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def _separate(model, x: torch.Tensor, lengths: list[int], cache: bool) -> list[torch.Tensor]:
    """Each sample of row ``x [1, L, d]`` alone: one forward, or (``cache``) its first 2 tokens, then one
    token at a time through a DynamicCache, as generation decodes."""
    from transformers import DynamicCache

    out, start = [], 0
    for n in lengths:
        e = x[:, start : start + n]
        if not cache:
            out.append(_logits(model, e, torch.arange(n)[None], use_cache=False)[0])
        else:
            kv = DynamicCache()
            steps = [_logits(model, e[:, :2], torch.arange(2)[None], past_key_values=kv, use_cache=True)[0]]
            for i in range(2, n):
                steps.append(
                    _logits(model, e[:, i : i + 1], torch.tensor([[i]]), past_key_values=kv, use_cache=True)[0]
                )
            out.append(torch.cat(steps))
        start += n
    return out


def _per_sample(logits: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    starts = np.cumsum([0, *lengths[:-1]])
    return [logits[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def test_packed_samples_equal_their_separate_runs_with_the_cache_on_and_off(model) -> None:
    assert model.llm_config._attn_implementation == PACKED
    torch.manual_seed(1)
    rows = [LENGTHS, [3, 5, 9]]  # two rows, the same three samples in another order, both padded
    seq_len = sum(LENGTHS) + PAD
    samples = {n: torch.randn(1, n, 64) for n in LENGTHS}
    x = torch.cat([torch.cat([*(samples[n] for n in r), torch.randn(1, PAD, 64)], 1) for r in rows])
    seq_lens = torch.tensor([seq_lens_array(r, seq_len) for r in rows])
    assert seq_lens.tolist() == [[5, 9, 3, 7], [3, 5, 9, 7]]
    segments = Segments.from_seq_lens(seq_lens)
    reset = torch.cat([_positions(seq_lens_array(r, seq_len)) for r in rows])
    alone = {n: _separate(model, samples[n], [n], cache=False)[0] for n in LENGTHS}
    decoded = {n: _separate(model, samples[n], [n], cache=True)[0] for n in LENGTHS}
    for n in LENGTHS:
        torch.testing.assert_close(decoded[n], alone[n], atol=1e-5, rtol=1e-5)

    # positions that restart per sample, or never restart: the segments alone keep the samples apart
    for positions in (reset, torch.arange(seq_len).expand(2, -1)):
        for cache in (False, True):
            packed = _logits(model, x, positions, use_cache=cache, segments=segments)
            for r, row in enumerate(rows):
                for n, got in zip(row, _per_sample(packed[r], row), strict=True):
                    torch.testing.assert_close(got, alone[n], atol=1e-5, rtol=1e-5)

    # a packed prefill into a cache, then the rest of the row in one call: the new queries are each
    # segment's tail (one spans a boundary mid-sample), attending within their segment only
    from transformers import DynamicCache

    kv = DynamicCache()
    first = _logits(model, x[:1, :12], reset[:1, :12], past_key_values=kv, use_cache=True, segments=Segments([[5, 7]]))
    rest = _logits(
        model, x[:1, 12:], reset[:1, 12:], past_key_values=kv, use_cache=True, segments=Segments(segments.lengths[:1])
    )
    for n, got in zip(LENGTHS, _per_sample(torch.cat([first, rest], 1)[0], LENGTHS), strict=True):
        torch.testing.assert_close(got, alone[n], atol=1e-5, rtol=1e-5)


def test_without_explicit_segments_plain_sdpa_mixes_the_samples(model) -> None:
    """The failure the segments prevent: transformers' sdpa keeps packs apart only when it can infer them from
    restarting position ids with the cache off."""
    torch.manual_seed(2)
    seq_len = sum(LENGTHS) + PAD
    x = torch.randn(1, seq_len, 64)
    alone = _separate(model, x, LENGTHS, cache=False)
    reset = _positions([*LENGTHS, PAD])
    plain = copy.deepcopy(model)
    plain.llm_config._attn_implementation = "sdpa"
    for positions, cache in ((torch.arange(seq_len)[None], False), (reset, True)):
        mixed = _per_sample(_logits(plain, x, positions, use_cache=cache)[0], LENGTHS)
        assert torch.allclose(mixed[0], alone[0], atol=1e-5)  # the first sample sees nothing before it
        assert all((m - a).abs().max() > 1e-3 for m, a in zip(mixed[1:], alone[1:], strict=True))
        # the same inputs through the packed attention with the segments: apart again
        ours = _logits(model, x, positions, use_cache=cache, segments=Segments([[*LENGTHS, PAD]]))[0]
        for got, want in zip(_per_sample(ours, LENGTHS), alone, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p=0.0, softmax_scale=None):
    """flash_attn_varlen_func's contract in plain torch: per segment, queries aligned to the end of its keys."""
    assert causal and dropout_p == 0.0
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        qi, ki, vi = q[qs].transpose(0, 1), k[ks].repeat_interleave(rep, 1).transpose(0, 1), v[ks]
        nq, nk = qi.shape[1], ki.shape[1]
        assert nq <= max_q and nk <= max_k
        s = (qi @ ki.transpose(1, 2)) * softmax_scale
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[qs] = (p @ vi.repeat_interleave(rep, 1).transpose(0, 1)).transpose(0, 1)
    return out


def test_the_varlen_path_packs_segments_as_cu_seqlens() -> None:
    """The flash-attn path's packing and scatter (cu_seqlens, tail queries, GQA) against the sdpa path, with a
    plain-torch kernel of flash_attn_varlen_func's contract in place of the CUDA one."""
    torch.manual_seed(3)
    segments = Segments([[6, 4, 2, 8], [11, 9]])
    for lq in (20, 7, 1):  # full sequence, a tail spanning segments (with a cache), one decoding step
        q = torch.randn(2, 4, lq, 8)
        k, v = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
        want = _sdpa(q, k, v, segments, 8**-0.5, 0.0)
        got = varlen_attention(q, k, v, segments, _reference_varlen, softmax_scale=8**-0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sum to 20, the sequence has 21"):
        packed_attention_forward(
            None, torch.randn(2, 4, 21, 8), torch.randn(2, 2, 21, 8), torch.randn(2, 2, 21, 8), None, segments=segments
        )
    with pytest.raises(ValueError, match="does not divide the LLM's 28 attention heads"):
        check_heads(28, 4, 8)
    with pytest.raises(ValueError, match="one must divide the other"):
        check_heads(12, 3, 2)


def test_packs_carry_their_segments_through_collate() -> None:
    from trainer.data import Pack, collate, pack_arrays
    from trainer.sequence import Example

    packs = [
        pack_arrays(Pack([Example(f"s{n}", 0, list(range(n)), list(range(n))) for n in row]), 24, 0, {"worker": 0})
        for row in ([5, 9, 3], [12, 12])
    ]
    batch = collate(packs)
    assert batch["seq_lens"].tolist() == [[5, 9, 3, 7], [12, 12, 0, 0]]
    positions = {**packs[1], "seq_lens": None}  # a pack built elsewhere: split where its positions restart
    assert collate([positions])["seq_lens"].tolist() == [[12, 12]]


# ---------------------------------------------------------------- Ulysses over 2 gloo ranks


def _audio_batch(model) -> dict:
    """Two rows: text, then a generated audio clip whose frames straddle the two ranks' halves of row 1."""
    torch.manual_seed(5)
    mel = torch.randn(128, 64)
    frames = model.audio_tokenizer([mel])[0].shape[0]
    seq_len = 32
    ids = torch.randint(0, 100, (2, seq_len))
    labels = ids.clone()
    labels[0, :3] = -100
    start = 12
    ids[1, start : start + frames] = SPECIAL.audio_pad
    labels[1, start - 1 : start + frames] = -100
    lens = [[10, 14, 8], [7, 20, 5]]
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.cat([_positions(r) for r in lens]),
        "loss_tags": torch.tensor([[0] * seq_len, [1] * seq_len]),
        "seq_lens": torch.tensor(lens),
        "audio_mels": [mel],
        "audio_chunk_clip": torch.tensor([0]),
        "audio_frames": torch.tensor([frames]),
        "audio_generate": torch.tensor([True]),
    }


def _sp_worker(rank: int, world: int, init: str, results: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from trainer.attention import SequenceParallel, deepspeed_mpu
    from trainer.train import no_cpu_op_builds

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    no_cpu_op_builds()
    deepspeed.init_distributed(dist_backend="gloo")
    mpu = deepspeed_mpu(world)
    sp = SequenceParallel(mpu.get_sequence_parallel_group())
    out: dict = {}

    # (a) the attention alone: every rank's share of q/k/v, gathered output vs one rank on the whole
    torch.manual_seed(7)
    b, length, d = 2, 16, 8
    segments = Segments([[5, 9, 2], [16]])
    for heads, kv in ((4, 2), (4, 1)):  # GQA split over the ranks, and one KV head replicated
        config = SimpleNamespace(
            num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * d, num_hidden_layers=1
        )
        q, k, v = torch.randn(b, heads, length, d), torch.randn(b, kv, length, d), torch.randn(b, kv, length, d)
        w = torch.randn(b, length, heads * d)
        full_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        full = packed_attention_forward(None, *full_in, None, scaling=d**-0.5, segments=segments)[0]
        full = full.reshape(b, length, -1)
        (full * w).sum().backward()
        mine = [sp.shard(t, 2).clone().requires_grad_(True) for t in (q, k, v)]
        pos = sp.shard(torch.arange(length).expand(b, -1))
        local = sp.attention(config, b)(
            torch.nn.Module(), *mine, None, scaling=d**-0.5, segments=segments, position_ids=pos
        )[0]
        (local * sp.shard(w)).sum().backward()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.detach().contiguous())
        out[f"attn_{kv}"] = float((torch.cat(gathered, 1) - full.detach()).abs().max())
        out[f"attn_grad_{kv}"] = max(
            float((m.grad - sp.shard(f.grad, 2)).abs().max()) for m, f in zip(mine, full_in, strict=True)
        )

    # (b) the tiny OmniModel: loss, per-tag sums and gradients equal the single-rank run's
    model = tiny_model(seed=11).train()
    batch = _audio_batch(model)
    ref = model(**batch)
    ref["loss"].backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.sequence_parallel = sp
    got = model(**batch)
    got["loss"].backward()
    out["loss"] = (float(got["loss"].detach()), float(ref["loss"].detach()))
    tag_loss, tag_count = sp.all_reduce(got["tag_loss"]), sp.all_reduce(got["tag_count"])
    out["tags"] = float((tag_loss - ref["tag_loss"]).abs().max()), float((tag_count - ref["tag_count"]).abs().max())
    out["audio_rows"] = float(got["tag_count"][5])
    worst, missing = 0.0, []
    for n, p in model.named_parameters():
        if n not in ref_grads:
            continue
        if p.grad is None:
            missing.append(n)
            continue
        g = sp.all_reduce(p.grad)  # DeepSpeed sums the group's shares (then averages over data parallel)
        worst = max(worst, float((g - ref_grads[n]).abs().max() / (ref_grads[n].abs().max() + 1e-12)))
    out["grad"], out["missing"] = worst, missing

    # (c) through DeepSpeed (the stage's own config): one SGD step at lr 1 moves every weight by minus the
    # one-rank gradient, in ZeRO-2 and in ZeRO-3 (whose reduce-scatter averages over all ranks: grad_scale)
    from trainer.attention import zero3_grad_scale
    from trainer.stages import load_stage
    from trainer.train import deepspeed_config

    for zero in ("zero2", "zero3"):
        overrides = [
            "model=tiny",
            "sequence_parallel=2",
            "micro_batch=1",
            "grad_accum=1",
            "grad_clip=0",
            f"deepspeed={zero}",
        ]
        cfg = deepspeed_config(load_stage(REPO / "conf/stages/3-omni-pretrain.yaml", overrides), "cpu")
        model = tiny_model(seed=11).train()
        model.sequence_parallel = sp
        sp.grad_scale = zero3_grad_scale(cfg, sp.size)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, mpu=mpu)
        engine.backward(engine(**batch)["loss"])
        engine.step()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero == "zero3"):
            moved = {n: before[n] - p.detach() for n, p in model.named_parameters()}
        out[zero] = max(float((moved[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items())
        out[f"{zero}_scale"] = sp.grad_scale
    torch.save(out, f"{results}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ulysses_on_two_ranks_equals_one_rank(tmp_path: Path) -> None:
    init = f"file://{tempfile.mktemp(dir=tmp_path)}"
    mp.spawn(_sp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for out in results:
        assert out["attn_2"] < 1e-5 and out["attn_1"] < 1e-5, out
        assert out["attn_grad_2"] < 1e-5 and out["attn_grad_1"] < 1e-5, out
        got, ref = out["loss"]
        assert got == pytest.approx(ref, rel=1e-5), out
        assert out["tags"][0] < 1e-4 and out["tags"][1] == 0, out
        assert out["grad"] < 1e-4 and not out["missing"], out
        assert out["zero2"] < 1e-3 and out["zero3"] < 1e-3, out
        assert (out["zero2_scale"], out["zero3_scale"]) == (1.0, 2.0), out
    assert all(out["audio_rows"] > 0 for out in results), "the audio frames straddle both ranks' halves"


@pytest.mark.slow
def test_omni_train_with_sequence_parallel_2_follows_the_one_rank_run(tmp_path: Path) -> None:
    """Stage 3 (ZeRO-3) as `omni train` runs it: 2 ranks sharing every sequence read the batches one rank
    reads alone, and log the same losses and token counts step by step (gradients clipped at 1: their scale
    matters)."""
    import json

    from tests.test_trainer_stages import finish, omni, tiny_stage_dir
    from trainer.sample_data import build_sample_corpus

    stages = tiny_stage_dir(tmp_path / "stages", build_sample_corpus(tmp_path / "corpus"), tmp_path / "run")
    stage = next(stages.glob("3-*.yaml"))
    logs = {}
    for name, nproc, sp in (("sp", "2", 2), ("one", "1", 1)):
        sets = [f"sequence_parallel={sp}", "init_from=null", f"output={tmp_path / name}", "budget.steps=3"]
        out = finish(omni("train", str(stage), "--nproc", nproc, *(a for s in sets for a in ("--set", s))))
        assert "step 3/3" in out
        logs[name] = [json.loads(line) for line in (tmp_path / name / "3" / "steps.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in logs["sp"]] == [r["tokens"] for r in logs["one"]]
    assert [r["sample_ids"][0] for r in logs["sp"]] == [r["sample_ids"][0] for r in logs["one"]]
    for got, want in zip(logs["sp"], logs["one"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got["step"], got["loss"], want["loss"])
