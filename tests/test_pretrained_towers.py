"""Pretrained towers from local Hugging Face directories (trainer/pretrained.py): tiny real-architecture
Qwen2, Qwen2-VL and Whisper checkpoints written with ``save_pretrained`` load into the tiny omni model
tensor by tensor, and each tower's output equals the Hugging Face module's own on the same input; the
same towers load into a ZeRO-3 partitioned build (2 gloo ranks); the full-size model's first stage refuses
to start from random towers."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import hf_compat  # noqa: F401  (before transformers)
from trainer.model import OmniModel, build_model
from trainer.pretrained import (
    PretrainedError,
    PretrainedMissing,
    check_stages,
    detached_config,
    load_vision,
    load_whisper_encoder,
    setting,
)
from trainer.stages import CONF_DIR, load_model_config, load_stage
from trainer.weights import WeightsMismatch

TINY = load_model_config("tiny")
LLM, VIS, ENC = TINY["llm"]["config"], TINY["vision"]["config"], TINY["audio"]["encoder"]
CKPT_VOCAB = 256


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three Hugging Face models (eval) and their saved directories."""
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    llm_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=CKPT_VOCAB,
            max_position_embeddings=32768,
            rope_theta=LLM["rope_theta"],
            rms_norm_eps=LLM["rms_norm_eps"],
            tie_word_embeddings=False,
            **{k: LLM[k] for k in llm_keys},
        )
    ).eval()
    qwen.save_pretrained(root / "qwen2")
    vl = Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(
            vision_config={**VIS, "hidden_size": 48},  # the merger's output width: Qwen's LLM, not ours
            text_config={
                "vocab_size": 128,
                "hidden_size": 48,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "rope_scaling": {"type": "mrope", "mrope_section": [4, 4, 4]},
            },
        )
    ).eval()
    vl.save_pretrained(root / "qwen2vl", max_shard_size="100KB")  # sharded, with an index
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            vocab_size=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            decoder_start_token_id=3,
            begin_suppress_tokens=None,
            suppress_tokens=None,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            max_target_positions=32,
            **{k: ENC[k] for k in ENC},
        )
    ).eval()
    whisper.save_pretrained(root / "whisper")
    return {"root": root, "qwen": qwen, "vl": vl, "whisper": whisper}


def _cfg(**towers: str | None) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY)
    for key, value in towers.items():
        section, name = {"llm": ("llm", "pretrained"), "vision": ("vision", "pretrained")}.get(
            key, ("audio", "encoder_pretrained")
        )
        cfg[section][name] = value
    return cfg


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


def test_qwen2_llm_loads_exactly_and_gives_the_same_logits(hf) -> None:
    path = str(hf["root"] / "qwen2")
    model = OmniModel(_cfg(llm=path)).eval()
    ours = model.state_dict()
    _assert_same({k: ours[k] for k in hf["qwen"].state_dict()}, hf["qwen"].state_dict())
    assert model.llm_config.max_position_embeddings == LLM["max_position_embeddings"]  # llm.config's runtime keys
    ids = torch.randint(0, CKPT_VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        assert torch.allclose(logits, hf["qwen"](input_ids=ids).logits, atol=1e-5, rtol=0)

    # a tokenizer longer than the checkpoint's vocabulary: resized to a multiple of 64, new rows at the mean
    bigger = OmniModel(_cfg(llm=path), vocab_size=CKPT_VOCAB + 5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w, src = bigger.state_dict()[name], hf["qwen"].state_dict()[name]
        assert w.shape[0] == 320 and torch.equal(w[:CKPT_VOCAB], src)
        assert torch.allclose(w[CKPT_VOCAB:], src.mean(0).expand(64, -1), atol=1e-6)

    # the export's config rebuilds the same shapes without the directory
    detached = detached_config(_cfg(llm=path), bigger)
    assert setting(detached, "llm.pretrained") is None and detached["llm"]["config"]["vocab_size"] == 320
    rebuilt = OmniModel(detached, vocab_size=CKPT_VOCAB + 5)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in bigger.state_dict().items()}

    wrong = _cfg(llm=path)
    wrong["llm"]["config"]["hidden_size"] = 32
    with pytest.raises(PretrainedError, match=r"hidden_size: checkpoint 64, config 32"):
        OmniModel(wrong)


def test_qwen2_vl_vision_tower_without_merger_equals_the_tower_before_its_merger(hf) -> None:
    path = hf["root"] / "qwen2vl"
    torch.manual_seed(5)
    model = OmniModel(_cfg(vision=str(path)), 300).eval()
    torch.manual_seed(5)
    plain = OmniModel(_cfg(), 300)
    visual = hf["vl"].model.visual
    theirs = {k: v for k, v in visual.state_dict().items() if not k.startswith("merger.")}
    _assert_same(model.model.visual_model.state_dict(), theirs)
    # the merger is not loaded: our bridge is as initialised, and no merger key was read
    _assert_same(model.model.visual_bridge_model.state_dict(), plain.model.visual_bridge_model.state_dict())
    ckpt = load_vision(OmniModel(_cfg(), 300).model.visual_model, path)
    assert ckpt.read_keys and all(k.startswith("visual.") and ".merger." not in k for k in ckpt.read_keys)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tower_files = {f for k, f in index.items() if k.startswith("visual.") and ".merger." not in k}
    assert ckpt.opened == tower_files and len(set(index.values()) - tower_files) >= 1  # the LLM's shards unread

    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * VIS["temporal_patch_size"] * VIS["patch_size"] ** 2, generator=g)
    seen: list[torch.Tensor] = []
    hook = visual.merger.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid)
            ours = model.model.visual_model(pixels, grid_thw=grid)
    finally:
        hook.remove()
    assert torch.allclose(ours, seen[0], atol=1e-5, rtol=0)

    # the transformers >= 4.52 in-memory prefix (model.visual.*), one file: the same weights
    alt = hf["root"] / "qwen2vl-model-visual"
    alt.mkdir()
    shutil.copy(path / "config.json", alt / "config.json")
    state = {}
    for f in sorted(set(index.values())):
        state.update(load_file(path / f))
    save_file(
        {("model." + k if k.startswith("visual.") else k): v for k, v in state.items()}, alt / "model.safetensors"
    )
    again = OmniModel(_cfg(vision=str(alt)), 300)
    _assert_same(again.model.visual_model.state_dict(), theirs)

    # a tower key missing from the checkpoint: the strict load refuses, naming it
    broken = hf["root"] / "qwen2vl-broken"
    broken.mkdir()
    shutil.copy(path / "config.json", broken / "config.json")
    save_file({k: v for k, v in state.items() if k != "visual.blocks.0.mlp.fc2.bias"}, broken / "model.safetensors")
    with pytest.raises(WeightsMismatch, match=r"missing: blocks\.0\.mlp\.fc2\.bias"):
        OmniModel(_cfg(vision=str(broken)), 300)


def test_whisper_encoder_loads_exactly_and_encodes_the_same(hf, tmp_path: Path) -> None:
    model = OmniModel(_cfg(audio=str(hf["root"] / "whisper")), 300).eval()
    encoder = hf["whisper"].model.encoder
    _assert_same(model.audio_tokenizer.encoder.state_dict(), encoder.state_dict())
    mel = torch.randn(
        1, ENC["num_mel_bins"], 2 * ENC["max_source_positions"], generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        ours, _ = model.audio_tokenizer.encode(mel, torch.tensor([mel.shape[-1]]))
        theirs = encoder(mel).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)

    # WhisperModel's layout (encoder.*) from pytorch_model.bin: the stage 0.1 loader is this one
    hf["whisper"].model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    other = OmniModel(_cfg(), 300)
    load_whisper_encoder(other.audio_tokenizer.encoder, tmp_path / "bin", what="encoder_from")
    _assert_same(other.audio_tokenizer.encoder.state_dict(), encoder.state_dict())


def test_mismatch_and_missing_directory_are_one_clear_error(hf, tmp_path: Path) -> None:
    cfg = _cfg(vision=str(hf["root"] / "qwen2vl"))
    cfg["vision"]["config"]["embed_dim"] = 48
    with pytest.raises(PretrainedError) as e:
        OmniModel(cfg, 300)
    assert "embed_dim: checkpoint 32, config 48" in str(e.value) and "\n" not in str(e.value)
    cfg = _cfg(audio=str(hf["root"] / "whisper"))
    cfg["audio"]["encoder"]["encoder_ffn_dim"] = 128
    with pytest.raises(PretrainedError, match=r"encoder_ffn_dim: checkpoint 64, config 128"):
        OmniModel(cfg, 300)
    with pytest.raises(PretrainedMissing, match=r"vision\.pretrained: no directory .*nowhere"):
        OmniModel(_cfg(vision=str(tmp_path / "nowhere")), 300)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedMissing, match=r"no config\.json"):
        OmniModel(_cfg(audio=str(tmp_path / "empty")), 300)
    with pytest.raises(PretrainedError, match=r"'qwen2_vl' checkpoint, not a Qwen2/Qwen2\.5 LLM"):
        OmniModel(_cfg(llm=str(hf["root"] / "qwen2vl")), 300)
    newer = tmp_path / "qwen2.5-vl"
    shutil.copytree(hf["root"] / "qwen2vl", newer)
    doc = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**doc, "model_type": "qwen2_5_vl"}))
    with pytest.raises(PretrainedError, match=r"Qwen2\.5-VL, whose vision tower .* is not Qwen2-VL's"):
        OmniModel(_cfg(vision=str(newer)), 300)


def test_the_full_size_model_refuses_random_towers_in_its_first_stage(monkeypatch, tmp_path: Path) -> None:
    for var in ("OMNI_QWEN25_DIR", "OMNI_QWEN2VL_DIR", "OMNI_WHISPER_DIR"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_model_config("baichuan-omni-1.5")
    assert all(setting(cfg, k) is None for k in ("llm.pretrained", "vision.pretrained", "audio.encoder_pretrained"))
    build_model(cfg, device="meta")  # a parameter count needs no weights
    with pytest.raises(PretrainedMissing) as e:
        build_model(cfg, device="meta", pretrained="require")
    msg = str(e.value)
    assert "\n" not in msg and all(v in msg for v in ("OMNI_QWEN25_DIR", "OMNI_QWEN2VL_DIR", "OMNI_WHISPER_DIR"))

    first, later = (load_stage(CONF_DIR / "stages" / f) for f in ("1.1-image-projector.yaml", "1.2-image-text.yaml"))
    check_stages([later])  # init_from: its weights come from stage 1.1
    with pytest.raises(PretrainedMissing, match=r"stage 1\.1 .*set OMNI_QWEN25_DIR, OMNI_QWEN2VL_DIR"):
        check_stages([first])
    monkeypatch.setenv("OMNI_QWEN25_DIR", str(tmp_path / "qwen"))
    monkeypatch.setenv("OMNI_QWEN2VL_DIR", str(tmp_path))
    monkeypatch.setenv("OMNI_WHISPER_DIR", str(tmp_path))
    with pytest.raises(PretrainedMissing, match=r"llm\.pretrained .*qwen is not a Hugging Face checkpoint"):
        check_stages([load_stage(CONF_DIR / "stages" / "1.1-image-projector.yaml")])
    from trainer.launch import launch

    monkeypatch.delenv("OMNI_QWEN2VL_DIR")
    with pytest.raises(PretrainedMissing, match=r"set OMNI_QWEN2VL_DIR"):  # before any rank starts
        launch([load_stage(CONF_DIR / "stages" / "1.1-image-projector.yaml")], [])


RANK_SCRIPT = """
import json, sys
import deepspeed, torch
import torch.distributed as dist
from trainer import memory
from trainer.model import OmniModel
from trainer.train import no_cpu_op_builds

no_cpu_op_builds()
deepspeed.init_distributed(dist_backend="gloo")
cfg, out = json.loads(sys.argv[1]), sys.argv[2]
ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
with memory.partitioned_build(ds):
    model = OmniModel(cfg)
held = {n: [memory.local_numel(p), memory.full_numel(p)] for n, p in model.named_parameters()}
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    if dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out + "/state.pt")
with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(held, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_towers_load_into_a_zero3_partitioned_model(hf, tmp_path: Path) -> None:
    import subprocess
    import sys

    from trainer.launch import free_port, rank_env

    root = hf["root"]
    cfg = _cfg(llm=str(root / "qwen2"), vision=str(root / "qwen2vl"), audio=str(root / "whisper"))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), str(tmp_path / "rank.py"), json.dumps(cfg), str(tmp_path)]
    env = {**rank_env(False, 2), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in (0, 1):  # no rank holds a whole tower: every parameter is split between the two
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert all(local < full for local, full in held.values() if full > 1)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    _assert_same({k: state[k] for k in hf["qwen"].state_dict()}, hf["qwen"].state_dict())
    vis = {k: v for k, v in hf["vl"].model.visual.state_dict().items() if not k.startswith("merger.")}
    _assert_same({k: state["model.visual_model." + k] for k in vis}, vis)
    enc = hf["whisper"].model.encoder.state_dict()
    _assert_same({k: state["audio_tokenizer.encoder." + k] for k in enc}, enc)
