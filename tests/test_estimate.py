"""``omni train STAGE.yaml --estimate`` (trainer/estimate.py): model-state bytes equal DeepSpeed's own
estimators, the numbers move the right way with each memory setting, the activation formulas match the
bytes a real tiny omni model saves for backward, and the CLI prints a table (or one error line)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from trainer.estimate import (
    EstimateError,
    GiB,
    LLMShape,
    VisionShape,
    estimate,
    largest_module,
    llm_layer_bytes,
    meta_model,
    model_state_bytes,
    stage_table,
    vit_block_bytes,
)
from trainer.stages import CONF_DIR, load_model_config, load_stage, resolve_stage_ref

REPO = Path(__file__).resolve().parents[1]
STATES = ("bf16 weights", "bf16 gradients", "fp32 gradients", "fp32 master + Adam m, v", "ZeRO-3 gathered module")


def stage(ref: str, *overrides: str):
    return load_stage(resolve_stage_ref(ref), list(overrides))


def test_model_states_equal_deepspeeds_own_estimators() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = meta_model(load_model_config("baichuan-omni-1.5"))
    total = sum(p.numel() for p in model.parameters())
    big_name, big = largest_module(model)
    assert big_name in ("model.embed_tokens", "lm_head") and big == 152064 * 3584
    for per_node, nodes in ((8, 1), (8, 4), (8, 16), (1, 1)):
        world = per_node * nodes
        _, ds2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
        ours2 = sum(model_state_bytes(total, 0, 2, world).values())
        assert abs(ours2 - ds2) <= 1, (world, ours2, ds2)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(
            total, big, per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )
        ours3 = sum(model_state_bytes(total, 0, 3, world, big).values())
        assert abs(ours3 - ds3) <= 1, (world, ours3, ds3)

    # a shipped stage: its trained parameters as DeepSpeed counts them, plus 2 bf16 bytes per frozen one
    for ref, zero in (("2.2", 2), ("3", 3)):
        for world in (8, 32, 128):
            e = estimate(stage(ref), world)
            assert e.zero == zero
            trained, frozen = e.trainable_params, e.total_params - e.trainable_params
            if zero == 2:
                ds = estimate_zero2_model_states_mem_needs(trained, world, 1, cpu_offload=False)[1] + 2 * frozen
            else:
                ds = estimate_zero3_model_states_mem_needs(
                    trained, big, world, 1, cpu_offload=False, cpu_offload_params=False
                )[1]
                ds += 2 * frozen / world
            assert abs(e.part(*STATES) - ds) <= 2, (ref, world)


def test_the_paper_model_and_what_each_setting_changes() -> None:
    shipped = stage("3")
    assert shipped.activation_checkpointing is True and estimate(shipped, 8).fits  # the shipped stage fits 8x80 GB
    s3 = replace(shipped, activation_checkpointing=False)
    e = estimate(s3, 8)
    assert abs(e.total_params - 10.9e9) / 10.9e9 < 0.02, e.total_params
    assert 9.0e9 < e.trainable_params < 9.4e9  # everything but the ViT and the audio tokenizer (Fig. 5)
    assert e.zero == 3 and not e.fits, "64k tokens without checkpointing cannot fit one 80 GB card"

    llm_act = "activations: LLM (28 layers)"
    ckpt = estimate(replace(s3, activation_checkpointing=True), 8)
    assert ckpt.part(llm_act) < e.part(llm_act) / 10 and ckpt.fits
    assert ckpt.part(*STATES) == e.part(*STATES)
    assert ckpt.tokens_per_s < e.tokens_per_s  # the recomputed forward costs throughput

    for sp in (2, 4):  # Ulysses shards every LLM activation and the logits' rows by sequence
        e_sp = estimate(replace(s3, sequence_parallel=sp, ce_chunk_tokens=0), 8)
        e_1 = estimate(replace(s3, ce_chunk_tokens=0), 8)
        assert e_sp.part(llm_act) == pytest.approx(e_1.part(llm_act) / sp, rel=1e-9)
        assert e_sp.part("logits + cross-entropy") == pytest.approx(e_1.part("logits + cross-entropy") / sp)
    with pytest.raises(EstimateError, match="does not divide the LLM's 28 attention heads"):
        estimate(replace(s3, sequence_parallel=8), 8)
    with pytest.raises(EstimateError, match="does not divide the 8 GPUs"):
        estimate(replace(s3, sequence_parallel=16), 8)

    states = [estimate(s3, w).part(*STATES) for w in (8, 32, 128)]
    assert states[0] > states[1] > states[2]  # ZeRO-3 partitions everything over more ranks
    s22 = stage("2.2")
    z2 = [estimate(s22, w).part("bf16 weights") for w in (8, 32, 128)]
    assert z2[0] == z2[1] == z2[2]  # ZeRO-2 keeps whole bf16 weights on every rank

    full = estimate(replace(s3, ce_chunk_tokens=0), 8).part("logits + cross-entropy")
    chunked = e.part("logits + cross-entropy")
    assert full > 35 * GiB  # all 64k rows x 152k vocabulary in fp32, and more
    assert chunked < full / 5

    via_set = estimate(stage("3", "activation_checkpointing=true", "sequence_parallel=4"), 8)
    assert not estimate(stage("3", "activation_checkpointing=false"), 8).fits
    assert via_set.total < ckpt.total and via_set.sequence_parallel == 4


def test_the_cross_stage_table_covers_every_llm_stage() -> None:
    stages = [stage(p.stem) for p in sorted((CONF_DIR / "stages").glob("*.yaml"))]
    text = stage_table(stages, (8, 32))
    lines = text.splitlines()
    for sid in ("1.1", "1.2", "2.1", "2.2", "3", "4.1", "4.2"):
        assert sum(1 for line in lines if line.split()[:1] == [sid]) == 2, sid
    assert "audio stages 0.1, 0.2, 0.3 left out" in text


# ---------------------------------------------------------------- against a measurement


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pipelines.demo_data import MULTILINGUAL, PHOTOS, photo_bytes
    from shards.manifest import write_shardset_manifest
    from shards.schema import Segment, make_sample
    from shards.writer import ShardWriter
    from trainer.data import corpus_texts, make_loader, resolve_entry
    from trainer.tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("estimate")
    rows = [make_sample("t", "text", [Segment("text", text=t)], locator=f"text/{lang}") for lang, t in MULTILINGUAL]
    rows += [
        make_sample(
            "t",
            "image_caption",
            [Segment("image", bytes=photo_bytes(n, size=(112, 112))), Segment("text", text=c)],
            locator=f"cap/{n}",
        )
        for n, c in PHOTOS.items()
    ]
    manifest = write_shardset_manifest(str(root / "m"), ShardWriter(str(root / "m"), "m", 8).write_all(rows))
    tok_dir = root / "tokenizer"
    tok = train_tiny_tokenizer(corpus_texts([manifest]), tok_dir, 600)
    cfg = copy.deepcopy(load_model_config("tiny"))
    cfg["llm"]["config"]["vocab_size"] = -(-len(tok) // 64) * 64
    entries = [
        resolve_entry({"name": k, "manifests": [manifest], "kinds": [k], "weight": 1})
        for k in ("image_caption", "text")
    ]
    seq = 512
    batch = next(iter(make_loader(entries, cfg, str(tok_dir), seq, 1, 5, 0, 1, 0)))
    model_yaml = root / "tiny-measured.yaml"
    model_yaml.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return {"batch": batch, "cfg": cfg, "tokenizer": tok, "seq": seq, "model_yaml": str(model_yaml)}


def _measure(model: torch.nn.Module, batch: dict) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves during one forward, by region (LLM layers, ViT blocks,
    the rest); parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region = ["rest"]
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a: region.__setitem__(0, "llm"))
        layer.register_forward_hook(lambda m, a, o: region.__setitem__(0, "rest"))
    for block in model.model.visual_model.blocks:
        block.register_forward_pre_hook(lambda m, a: region.__setitem__(0, "vit"))
        block.register_forward_hook(lambda m, a, o: region.__setitem__(0, "rest"))
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (region[0], t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out["loss"].backward()  # the graph is real: it runs backward
    sums = {"llm": 0, "vit": 0, "rest": 0}
    for r, n in seen.values():
        sums[r] += n
    return sums


def test_activation_formulas_match_a_real_tiny_model_s_saved_bytes(tiny_pack) -> None:
    from trainer.data import to_device
    from trainer.model import build_model
    from trainer.stages import set_trainable

    torch.manual_seed(0)
    cfg, batch, seq = tiny_pack["cfg"], to_device(tiny_pack["batch"], "cpu"), tiny_pack["seq"]
    model = build_model(cfg, tiny_pack["tokenizer"]).to(torch.bfloat16)  # bf16, as on GPUs
    model.train()
    set_trainable(model, ["vit", "projector", "llm", "lm_head"])  # stage 1.2's parts
    measured = _measure(model, batch)

    c = model.llm_config
    shape = LLMShape(
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        c.vocab_size,
    )
    tokens = batch["input_ids"].numel()
    llm_ratio = measured["llm"] / (tokens * shape.layers * llm_layer_bytes(shape))
    assert 0.9 < llm_ratio < 1.1, llm_ratio

    v = model.model.visual_model.config
    vis = VisionShape(v.embed_dim, int(v.embed_dim * v.mlp_ratio), v.depth, v.num_heads, 2, model.patch_dim)
    patches = batch["pixel_values"].shape[0]
    vit_ratio = measured["vit"] / (patches * vis.depth * vit_block_bytes(vis))
    assert 0.9 < vit_ratio < 1.1, vit_ratio

    # the whole estimate for this pack (its real image share) against everything the model saved
    image_share = patches / vis.merge**2 / tokens
    st = replace(
        stage("1.2"),
        model=tiny_pack["model_yaml"],
        seq_len=seq,
        micro_batch=batch["input_ids"].shape[0],
        trainable=["vit", "projector", "llm", "lm_head"],
    )
    e = estimate(st, 1, image_share=image_share)
    whole = sum(measured.values()) / e.activations
    print(
        f"tiny model, {tokens} tokens ({image_share:.0%} image): measured/estimated saved bytes: "
        f"LLM layers {llm_ratio:.3f}, ViT blocks {vit_ratio:.3f}, whole model {whole:.3f}"
    )
    assert 1 / 3 < whole < 3, whole


# ---------------------------------------------------------------- the command line


def test_cli_prints_the_estimate_and_reports_bad_flags_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from trainer.cli import main

    done = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "3", "--estimate", "--gpus", "8", "--gpu-memory", "80GB"]
        + ["--set", "activation_checkpointing=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for row in ("bf16 weights", "fp32 master + Adam m, v", "activations: LLM", "logits + cross-entropy", "total"):
        assert row in out, row
    assert "verdict: does not fit:" in out and "--set activation_checkpointing=true" in out
    assert "tokens/s" in out

    assert main(["train", "3", "--estimate", "--set", "activation_checkpointing=true"]) == 0
    assert "verdict: fits" in capsys.readouterr().out

    for bad, says in (
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "eight"], "is not a GPU count"),
        (["--gpu-memory", "lots"], "is not a size like 80GB"),
        (["--gpu", "b200"], "unknown card"),
        (["--set", "sequence_parallel=16"], "does not divide the 8 GPUs"),
    ):
        assert main(["train", "3", "--estimate", *bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("omni: error: ") and says in err and len(err.splitlines()) == 1, err

    assert main(["train", "0.1", "--estimate"]) == 2
    assert "covers the LLM stages" in capsys.readouterr().err
    assert main(["train-all", "--estimate", "--gpus", "8,32"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n3 ") == 2 and "audio stages" in table
