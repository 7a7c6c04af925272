"""Memory at scale (trainer/memory.py): the chunked cross-entropy and activation checkpointing give the
same loss and gradients as the plain computation while holding measurably less, and a ZeRO-3 stage
builds its model partitioned (deepspeed.zero.Init, 2 CPU ranks over gloo), trains, and exports the
whole model.

Memory is measured, not estimated: ``LiveBytes`` counts the bytes of every tensor storage the
computation creates and still holds at each op (its peak), ``saved_bytes`` what autograd keeps for
backward; the figures are in the assertion messages."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from trainer.memory import (
    LiveBytes,
    checkpoint_towers,
    chunked_cross_entropy,
    measure,
    set_activation_checkpointing,
)
from trainer.model import TAGS, build_model
from trainer.stages import load_model_config

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _ce_grads(hidden, head, targets, weights, chunk):
    hidden = hidden.detach().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    if chunk is None:
        ce = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    else:
        ce = chunked_cross_entropy(hidden, head, targets, chunk)
    (ce * weights).sum().backward()
    grads = [hidden.grad] + [p.grad for p in head.parameters()]
    return ce.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_the_unchunked_loss_and_gradients(bias: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(48, 1000, bias=bias)
    hidden, targets, weights = torch.randn(301, 48), torch.randint(0, 1000, (301,)), torch.rand(301)
    ref_loss, ref_grads = _ce_grads(hidden, head, targets, weights, None)
    for chunk in (1, 7, 64, 301, 4096, 0):  # chunks of one row, not dividing N, exactly N, more than N, all
        loss, grads = _ce_grads(hidden, head, targets, weights, chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_chunked_cross_entropy_holds_one_chunk_of_logits_not_all() -> None:
    torch.manual_seed(0)
    n, d, vocab = 4096, 64, 4000
    head = nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(n, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    plain = measure(lambda: F.cross_entropy(head(hidden).float(), targets))
    chunked = measure(lambda: chunked_cross_entropy(hidden, head, targets, 512).mean())
    logits = n * vocab * 4
    msg = (
        f"fp32 logits of all rows {logits / MiB:.1f} MiB; unchunked: peak {plain['peak_live'] / MiB:.1f} MiB, "
        f"kept for backward {plain['after_forward'] / MiB:.1f} MiB; chunked (512 rows): peak "
        f"{chunked['peak_live'] / MiB:.1f} MiB, kept {chunked['after_forward'] / MiB:.1f} MiB"
    )
    assert plain["after_forward"] >= logits and plain["peak_live"] >= 2 * logits, msg
    assert chunked["after_forward"] < logits / 16, msg  # its inputs only: no logits kept
    assert chunked["peak_live"] < plain["peak_live"] / 4, msg
    assert chunked["peak_live"] < 4 * logits * 512 / n + 2 * n * d * 4 + vocab * d * 4, msg


# ---------------------------------------------------------------- the tiny omni model


def tiny_cfg(layers: int = 2, vision_depth: int = 1) -> dict:
    cfg = copy.deepcopy(load_model_config("tiny"))
    cfg["llm"]["config"].update(vocab_size=320, num_hidden_layers=layers)
    cfg["vision"]["config"]["depth"] = vision_depth
    return cfg


SPECIAL = SimpleNamespace(img_pad=300, audio_pad=301)


def omni_batch(seq: int = 160, seed: int = 0) -> dict:
    """One packed row: text, an image (16 patches -> 4 tokens), text, a generated audio clip (8 frames), text;
    every text position learned. Real tensors of the shapes the collator gives."""
    g = torch.Generator().manual_seed(seed)
    n_img, n_audio = 4, 8
    head, mid = 12, 10
    tail = seq - head - n_img - mid - n_audio
    text = torch.randint(3, 290, (seq,), generator=g)
    ids = torch.cat(
        [
            text[:head],
            torch.full((n_img,), SPECIAL.img_pad),
            text[head : head + mid],
            torch.full((n_audio,), SPECIAL.audio_pad),
            text[head + mid : head + mid + tail],
        ]
    )
    labels = torch.where((ids == SPECIAL.img_pad) | (ids == SPECIAL.audio_pad), -100, ids)
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": torch.arange(seq)[None],
        "loss_tags": torch.full((1, seq), TAGS.index("omni")),
        "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "audio_mels": [torch.randn(128, 64, generator=g)],  # 64 mel frames -> 8 frames at 12.5 Hz
        "audio_chunk_clip": torch.tensor([0]),
        "audio_frames": torch.tensor([n_audio]),
        "audio_generate": torch.tensor([True]),
    }


def tiny_model(cfg: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.special = SPECIAL
    model.train()
    return model


def grads_of(model: nn.Module, batch: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def test_the_model_s_chunked_cross_entropy_equals_the_unchunked_one() -> None:
    cfg = tiny_cfg()
    batch = omni_batch()
    model = tiny_model(cfg)
    model.ce_chunk_tokens = 0
    ref_out, ref_grads = grads_of(model, batch)
    model.ce_chunk_tokens = 16
    out, grads = grads_of(model, batch)
    assert ref_out["tag_count"][TAGS.index("omni")] > 100
    for k in ("loss", "tag_loss", "tag_count"):
        torch.testing.assert_close(out[k], ref_out[k], rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)

    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100), "audio_generate": torch.tensor([False])}
    model.zero_grad(set_to_none=True)
    out = model(**unlabelled)
    assert float(out["loss"].detach()) == 0.0 and float(out["tag_count"].sum()) == 0.0
    out["loss"].backward()  # the LM head stays in the graph with a zero gradient
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()


def test_activation_checkpointing_gives_identical_gradients_and_holds_less() -> None:
    cfg = tiny_cfg(layers=4, vision_depth=2)
    batch = omni_batch(seq=384)
    plain = tiny_model(cfg)
    ckpt = tiny_model(cfg)
    assert set_activation_checkpointing(ckpt, True) == {"llm": 4, "vision": 2}
    ref_out, ref_grads = grads_of(plain, batch)
    out, grads = grads_of(ckpt, batch)
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("model.visual_model.blocks.") for n in grads) and "audio_head.norm.weight" in grads
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=0, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-6, msg=n)

    m_plain = measure(lambda: plain(**batch)["loss"])
    m_ckpt = measure(lambda: ckpt(**batch)["loss"])
    msg = "  ".join(
        f"{name}: peak live {m['peak_live'] / MiB:.2f} MiB, held after forward {m['after_forward'] / MiB:.2f} MiB, "
        f"saved for backward {m['saved'] / MiB:.2f} MiB"
        for name, m in (("plain", m_plain), ("checkpointed", m_ckpt))
    )
    assert m_ckpt["after_forward"] < 0.5 * m_plain["after_forward"], msg
    assert m_ckpt["saved"] < 0.5 * m_plain["saved"], msg
    assert m_ckpt["peak_live"] < 0.8 * m_plain["peak_live"], msg
    print(msg)


def test_checkpointing_spec_per_tower_and_towers_no_gradient_crosses_are_left_alone() -> None:
    assert checkpoint_towers(True) == {"llm": True, "vision": True}
    assert checkpoint_towers({"llm": True}) == {"llm": True, "vision": False}
    with pytest.raises(ValueError, match="unknown towers"):
        checkpoint_towers({"audio": True})
    model = tiny_model(tiny_cfg())
    model.model.visual_model.requires_grad_(False)
    assert set_activation_checkpointing(model, True) == {"llm": 2, "vision": 0}
    assert set_activation_checkpointing(model, {"llm": False}) == {"llm": 0, "vision": 0}
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    # stage 1.1: the LLM is frozen but the projector's gradient crosses it, so it keeps activations
    model.requires_grad_(False)
    model.model.visual_bridge_model.requires_grad_(True)
    assert set_activation_checkpointing(model, True) == {"llm": 2, "vision": 0}
    model.model.visual_bridge_model.requires_grad_(False)
    model.audio_head.requires_grad_(True)  # nothing below the LLM trains: no gradient crosses it
    assert set_activation_checkpointing(model, True) == {"llm": 0, "vision": 0}


def test_live_bytes_counts_storages_once_and_sees_them_freed() -> None:
    with LiveBytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        b = a[:10]  # a view: same storage
        c = a * 2
        del c
        live.mark()
    assert live.peak == 8000 and live.at_mark == 4000
    del a, b


# ---------------------------------------------------------------- ZeRO-3 on 2 CPU ranks


def _text_corpus(root: Path) -> tuple[list[str], str]:
    from pipelines.demo_data import MULTILINGUAL, PHOTOS, photo_bytes
    from shards.manifest import write_shardset_manifest
    from shards.schema import Segment, make_sample
    from shards.writer import ShardWriter
    from trainer.data import corpus_texts
    from trainer.tokenizer import train_tiny_tokenizer

    rows = [make_sample("t", "text", [Segment("text", text=t)], locator=f"text/{lang}") for lang, t in MULTILINGUAL]
    rows += [
        make_sample(
            "t",
            "image_caption",
            [Segment("image", bytes=photo_bytes(n, size=(96, 80))), Segment("text", text=c)],
            locator=f"cap/{n}",
        )
        for n, c in PHOTOS.items()
    ]
    manifest = write_shardset_manifest(str(root / "shards"), ShardWriter(str(root / "shards"), "m", 4).write_all(rows))
    tok = root / "tokenizer"
    train_tiny_tokenizer(corpus_texts([manifest]), tok, 600)
    return [manifest], str(tok)


def test_zero3_stage_builds_partitioned_trains_and_exports_the_whole_model(tmp_path: Path) -> None:
    from trainer.data import make_loader, resolve_entry, to_device
    from trainer.model import AudioTokenizer
    from trainer.stages import load_stage
    from trainer.tokenizer import load_tokenizer, special_ids
    from trainer.weights import load_into

    manifests, tok_dir = _text_corpus(tmp_path)
    tokenizer = load_tokenizer(tok_dir)
    cfg = load_model_config("tiny")
    torch.manual_seed(11)  # a previous stage's export: its weights start this stage
    init = build_model(cfg, tokenizer).state_dict()
    torch.save(init, tmp_path / "init.pt")
    torch.manual_seed(12)  # a trained audio tokenizer (stage 0.1's export layout)
    codec = {f"tokenizer.{k}": v for k, v in AudioTokenizer(cfg["audio"]).state_dict().items()}
    torch.save(codec, tmp_path / "codec.pt")
    ds = json.loads((REPO / "conf" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    steps = 6
    stage_doc = {
        "stage": "3",
        "name": "zero3-test",
        "model": "tiny",
        "deepspeed": str(tmp_path / "zero3.json"),
        "init_from": str(tmp_path / "init.pt"),
        "audio_tokenizer_from": str(tmp_path / "codec.pt"),
        "output": str(tmp_path / "run"),
        "trainable": ["vit", "projector", "llm", "lm_head", "audio_embed", "audio_head"],
        "lr": {"default": 3e-3},
        "seq_len": 192,
        "micro_batch": 1,
        "num_workers": 0,
        "budget": {"steps": steps},
        "save_every": 100,
        "log_every": 1,
        "activation_checkpointing": True,
        "ce_chunk_tokens": 32,
        "verify_shards": "size",
        "mixture": [{"name": "m", "manifests": manifests, "kinds": ["text", "image_caption"], "weight": 1.0}],
    }
    stage_yaml = tmp_path / "stage.yaml"
    stage_yaml.write_text(yaml.safe_dump(stage_doc, sort_keys=False))

    from trainer.launch import free_port, rank_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), str(REPO / "tests" / "memory_rank.py")]
    cmd += [str(stage_yaml), tok_dir, str(tmp_path / "reports")]
    env = {**rank_env(False, 2), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    print(proc.stdout)
    assert "built partitioned (deepspeed.zero.Init): rank 0 holds" in proc.stdout, proc.stdout[-3000:]

    reports = [json.loads((tmp_path / "reports" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["partitioned"] and rep["build_mismatches"] == [], rep["build_mismatches"]
        assert rep["ds_status_before_forward"] == ["NOT_AVAILABLE"], rep["ds_status_before_forward"]
        assert rep["checkpointed"] == {"llm": 2, "vision": 1}
        for name, (local, full) in rep["params"].items():
            assert local == -(-full // 2), f"{name}: rank holds {local} of {full}"
        assert abs(rep["local"] - rep["full"] / 2) <= len(rep["params"])

    state = torch.load(tmp_path / "run" / "3" / "final" / "model.pt", map_location="cpu", weights_only=True)
    single = build_model(cfg, tokenizer)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in init.items()}
    load_into(single, state, strict=True)
    for k, v in single.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in codec.items():  # loaded partitioned, frozen, exported whole
        assert torch.equal(state[f"audio_{k}"], v), k
    assert not torch.equal(state["lm_head.weight"], init["lm_head.weight"])

    stage = load_stage(stage_yaml)
    loader = make_loader([resolve_entry(e) for e in stage.mixture], cfg, tok_dir, 192, 1, stage.seed, 0, 2, 0)
    batches = [to_device(b, "cpu") for _, b in zip(range(3), loader, strict=False)]
    before = build_model(cfg, tokenizer)
    load_into(before, {**init, **{f"audio_{k}": v for k, v in codec.items()}})
    losses = {}
    for name, model in (("before", before), ("after", single)):
        model.special = special_ids(tokenizer)
        with torch.no_grad():
            losses[name] = sum(float(model(**b)["loss"]) for b in batches) / len(batches)
    assert losses["after"] < losses["before"], losses
    records = [json.loads(line) for line in (tmp_path / "run" / "3" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert os.path.isfile(tmp_path / "run" / "3" / "final" / "done.json")
