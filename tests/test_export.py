"""``omni export``: a finished stage (tiny real model, fp32) → safetensors shards + config.json + tokenizer,
reloaded by ``OmniModel.from_pretrained`` (every tensor and the logits of a text+image+audio prompt
identical), by ``transformers.Qwen2ForCausalLM`` (the LLM's logits identical, the towers reported unused)
and by ``AutoTokenizer`` (same ids); sharding, dtype conversion, tied embeddings, an audio stage, and the
user errors (exit 2, one line)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer.export import INDEX, LLM_PREFIXES, ExportError, read_export
from trainer.model import OmniModel

ROOT = Path(__file__).resolve().parents[1]


def _stage(run: Path, stage: str, state: dict, doc: dict) -> Path:
    final = run / stage / "final"
    final.mkdir(parents=True)
    torch.save(state, final / "model.pt")
    (final / "done.json").write_text(json.dumps({"stage": stage, "steps": 3, **doc}))
    return run / stage


def _tiny(cfg: dict, tok, seed: int):
    from trainer.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, tok)
    with torch.no_grad():  # no weight keeps its initial constant (a norm left at 1 would hide a skipped tensor)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, text_tokenizer_dir: str) -> dict:
    from trainer.tokenizer import load_tokenizer

    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(text_tokenizer_dir, run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer")
    cfg = yaml.safe_load((ROOT / "conf/models/tiny.yaml").read_text())
    model = _tiny(cfg, tok, 0)
    stage = _stage(
        run, "2.1", model.state_dict(), {"task": "llm", "model_config": cfg, "tokenizer": str(run / "tokenizer")}
    )
    return {"run": run, "tok": tok, "cfg": cfg, "model": model, "stage": stage}


def _omni(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from pipelines.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def exported(setup: dict) -> Path:
    from pipelines.cli import main

    out = setup["run"].parent / "hf"
    assert main(["export", str(setup["stage"]), "--out", str(out)]) == 0
    return out


def _prompt(model: OmniModel, tok) -> dict:
    """A text + image (16 patches → 4 visual tokens) + audio (1 s of noise → its frames) prompt."""
    sp = model.special
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(16, model.patch_dim, generator=g)
    mel = torch.randn(model.audio_tokenizer.encoder.config.num_mel_bins, 100, generator=g)
    codes = torch.cat(model.audio_tokenizer([mel]))
    text = tok.encode("Describe what you see and hear.", add_special_tokens=False)
    ids = (
        text
        + [sp.img_start, *[sp.img_pad] * 4, sp.img_end]
        + [sp.audio_start, *[sp.audio_pad] * codes.shape[0], sp.audio_end, sp.c_a]
    )
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "audio_codes": codes,
    }


@torch.no_grad()
def _outputs(model: OmniModel, prompt: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Text logits of every position and the audio head's logits for the prompt's frames."""
    from trainer.generate import prompt_embeddings

    hidden = model.model(inputs_embeds=prompt_embeddings(model, **prompt)).last_hidden_state
    codes = prompt["audio_codes"]
    head = model.audio_head(hidden[0, -codes.shape[0] :], model.embed_codes(codes))
    return model.lm_head(hidden), head


def test_export_reloads_with_identical_weights_and_logits(setup: dict, exported: Path) -> None:
    names = sorted(p.name for p in exported.iterdir())
    assert {"config.json", "generation_config.json", INDEX, "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert "model-00001-of-00001.safetensors" in names and not any(
        n.name.startswith(".") for n in exported.parent.iterdir()
    )
    model, tok = setup["model"], setup["tok"]
    again = OmniModel.from_pretrained(str(exported))
    assert not again.training and again.special == model.special
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    prompt = _prompt(model, tok)
    assert torch.equal(_prompt(again, tok)["audio_codes"], prompt["audio_codes"]), "the same audio tokenizer"
    (logits, head), (logits2, head2) = _outputs(model, prompt), _outputs(again, prompt)
    assert logits.dtype == torch.float32 and torch.equal(logits, logits2)
    assert all(torch.equal(a, b) for a, b in zip(head, head2, strict=True))
    doc = json.loads((exported / "config.json").read_text())
    assert doc["omni_stage"]["stage"] == "2.1" and doc["omni_stage"]["task"] == "llm"
    assert doc["omni"]["llm"]["config"]["vocab_size"] == model.lm_head.out_features
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["do_sample"] is True


def test_transformers_loads_the_llm_and_the_tokenizer(setup: dict, exported: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    from trainer.tokenizer import MODALITY_TOKENS

    model, tok = setup["model"], setup["tok"]
    conf = AutoConfig.from_pretrained(str(exported))
    assert conf.model_type == "qwen2" and conf.architectures == ["Qwen2ForCausalLM"]
    assert conf.vocab_size == model.lm_head.out_features and conf.hidden_size == model.llm_config.hidden_size
    hf, info = Qwen2ForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert info["missing_keys"] == [] and info["mismatched_keys"] == [] and info["error_msgs"] == []
    towers = {k for k in model.state_dict() if not k.startswith(LLM_PREFIXES)}
    assert set(info["unexpected_keys"]) == towers, "only the towers are left out"
    assert hf.dtype == torch.float32
    text = "The quick brown fox 敏捷的棕色狐狸 " + "".join(MODALITY_TOKENS[:3])
    auto = AutoTokenizer.from_pretrained(str(exported))
    ids = tok.encode(text, add_special_tokens=False)
    assert auto.encode(text, add_special_tokens=False) == ids and auto.decode(ids) == tok.decode(ids)
    assert len(auto) == len(tok) and auto.eos_token_id == tok.eos_token_id
    batch = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        ours = model.lm_head(model.model(input_ids=batch).last_hidden_state)
        theirs = hf(input_ids=batch).logits
    assert torch.equal(ours, theirs)


def test_small_shards_cover_every_tensor_once_and_dtype_converts(setup: dict, capsys) -> None:
    from safetensors import safe_open

    out = setup["run"].parent / "sharded"
    rc, stdout, _ = _omni(
        ["export", str(setup["stage"] / "final"), "--out", str(out), "--max-shard-size", "200KB", "--dtype", "bf16"],
        capsys,
    )
    assert rc == 0 and "bfloat16" in stdout
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / INDEX).read_text())
    state = setup["model"].state_dict()
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(shards)
    seen: list[str] = []
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            keys = list(f.keys())
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
            assert sum(f.get_tensor(k).numel() * 2 for k in keys) <= 200_000 or len(keys) == 1
        assert all(index["weight_map"][k] == name for k in keys)
        seen += keys
    assert sorted(seen) == sorted(state), "every tensor in exactly one shard"
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    low = OmniModel.from_pretrained(str(out), dtype="auto")
    assert low.lm_head.weight.dtype == torch.bfloat16
    assert all(torch.equal(v, state[k].to(torch.bfloat16)) for k, v in low.state_dict().items())


def test_tied_embeddings_export_once_and_load_everywhere(setup: dict, capsys) -> None:
    from transformers import Qwen2ForCausalLM

    cfg = copy.deepcopy(setup["cfg"])
    cfg["llm"]["config"]["tie_word_embeddings"] = True
    model = _tiny(cfg, setup["tok"], 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    run = setup["run"].parent / "tied_run"
    stage = _stage(
        run,
        "1.2",
        model.state_dict(),
        {"task": "llm", "model_config": cfg, "tokenizer": str(setup["run"] / "tokenizer")},
    )
    out = run.parent / "tied"
    assert _omni(["export", str(stage), "--out", str(out)], capsys)[0] == 0
    assert "lm_head.weight" not in json.loads((out / INDEX).read_text())["weight_map"]
    again = OmniModel.from_pretrained(str(out))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    hf, info = Qwen2ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == []
    ids = torch.tensor([setup["tok"].encode("hello there", add_special_tokens=False)])
    with torch.no_grad():
        ours = model.lm_head(model.model(input_ids=ids).last_hidden_state)
        assert torch.equal(ours, again.lm_head(again.model(input_ids=ids).last_hidden_state))
        assert torch.equal(ours, hf(input_ids=ids).logits)


def test_audio_stages_export_their_modules_and_generate_from_exports(setup: dict, exported: Path, capsys) -> None:
    from trainer.export import load_generator
    from trainer.flow_decoder import build_flow_decoder
    from trainer.generate import OmniGenerator, Sampling
    from trainer.vocoder import build_vocoder

    run, cfg = setup["run"].parent / "audio_run", setup["cfg"]
    run.mkdir()
    torch.manual_seed(3)
    flow_task = build_flow_decoder(cfg, {"audio_tokenizer_from": None}, run)
    voc_task = build_vocoder(cfg, {}, run)
    outs = {}
    for stage_id, task, module in (("0.2", "flow_decoder", flow_task), ("0.3", "vocoder", voc_task)):
        state = module.state_dict()
        stage = _stage(run, stage_id, state, {"task": task, "model_config": cfg, "tokenizer": "/nowhere"})
        outs[task] = out = run.parent / task
        rc, stdout, _ = _omni(["export", str(stage), "--out", str(out)], capsys)
        assert rc == 0 and "not transformers-loadable" in stdout
        doc, back = read_export(out)
        assert "model_type" not in doc and doc["omni_stage"]["task"] == task and doc["omni"]["vocoder"]
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
        with pytest.raises(ExportError, match="audio stage"):
            OmniModel.from_pretrained(str(out))
    # generation from the three exports equals generation from the modules they were written from
    direct = OmniGenerator(setup["model"], setup["tok"], flow_task.flow, voc_task.generator, cfg, "2.1")
    with pytest.warns(UserWarning, match="another audio tokenizer"):  # as from_run warns: flow_task's own
        loaded = load_generator(exported, flow=outs["flow_decoder"], vocoder=outs["vocoder"])
    greedy = Sampling(temperature=0)
    codes = direct.speak_codes("hello", max_frames=4, temperature=0)
    assert codes.shape == (4, 8) and torch.equal(loaded.speak_codes("hello", max_frames=4, temperature=0), codes)
    assert np.array_equal(direct.codes_to_wave(codes, seed=1), loaded.codes_to_wave(codes, seed=1))
    text = direct.decode(direct.tts_prompt_ids("hi")[:-1], max_new_tokens=5, text=greedy, audio=greedy)
    assert text == loaded.decode(loaded.tts_prompt_ids("hi")[:-1], max_new_tokens=5, text=greedy, audio=greedy)
    with pytest.raises(ExportError, match="not a vocoder export"):
        load_generator(exported, vocoder=outs["flow_decoder"])


def test_user_errors_are_one_line_exit_2(setup: dict, capsys) -> None:
    base = setup["run"].parent
    stage = str(setup["stage"])

    def fails(argv: list[str], pattern: str) -> None:
        rc, _, err = _omni(argv, capsys)
        assert rc == 2 and err.startswith("omni: error: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), err

    fails(["export", str(base / "nowhere"), "--out", str(base / "x1")], "no stage directory")
    (base / "bare" / "1.1").mkdir(parents=True)
    fails(["export", str(base / "bare" / "1.1"), "--out", str(base / "x1")], "no final/")
    unfinished = base / "bare" / "1.2" / "final"
    unfinished.mkdir(parents=True)
    shutil.copy(setup["stage"] / "final" / "model.pt", unfinished / "model.pt")
    fails(["export", str(unfinished.parent), "--out", str(base / "x1")], "no done.json: the stage has not finished")
    fails(["export", stage, "--out", str(base / "x1"), "--max-shard-size", "5XB"], "not a size")
    fails(["export", stage, "--out", str(base / "x1"), "--max-shard-size", "0"], "must be positive")
    occupied = base / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    (occupied / "model-00007-of-00009.safetensors").write_text("stale")
    fails(["export", stage, "--out", str(occupied)], "not empty")
    assert not (base / "x1").exists() and not list(base.glob(".*tmp*")), "nothing written by a refused export"
    with pytest.raises(SystemExit) as e:
        _omni(["export", stage, "--out", str(base / "x1"), "--dtype", "fp8"], capsys)
    assert e.value.code == 2
    assert _omni(["export", stage, "--out", str(occupied), "--force"], capsys)[0] == 0
    assert (occupied / "notes.txt").read_text() == "mine", "--force replaces the export's files only"
    assert not (occupied / "model-00007-of-00009.safetensors").exists(), "stale shards of an older export go"
    assert OmniModel.from_pretrained(str(occupied)).lm_head.weight.shape == setup["model"].lm_head.weight.shape


def test_release_format_writes_the_released_layout(setup: dict, capsys) -> None:
    from trainer.release import read_release, release_to_ours

    cfg = copy.deepcopy(setup["cfg"])
    cfg["audio"]["bridge"] = {"bias": False}  # the released structure (conf/models/baichuan-omni-1.5.yaml)
    cfg["audio_head"].update(
        norm="rms", bias=True, ffn_residual="normed", hidden_input="first", unused_ffn_bias=True, layers=1
    )
    model = _tiny(cfg, setup["tok"], 4)
    run = setup["run"].parent / "release_run"
    tok = str(setup["run"] / "tokenizer")
    stage = _stage(run, "2.2", model.state_dict(), {"task": "llm", "model_config": cfg, "tokenizer": tok})
    out = run.parent / "released"
    rc, _, err = _omni(["export", str(stage), "--out", str(out), "--format", "release"], capsys)
    assert rc == 2 and "audio_tokenizer.decoder" in err and not out.exists(), "our decoder has no released place"
    rc, stdout, _ = _omni(["export", str(stage), "--out", str(out), "--format", "release", "--partial"], capsys)
    assert rc == 0 and "not written: audio_tokenizer.decoder" in stdout
    assert (out / "tokenizer.json").is_file()
    state, _ = read_release(out)
    assert any(".W_pack." in k for k in state), "the fused QKV of the release"
    back = release_to_ours(state, cfg)
    mine = {k: v for k, v in model.state_dict().items() if not k.startswith("audio_tokenizer.decoder.")}
    assert back.keys() == mine.keys() and all(torch.equal(back[k], mine[k]) for k in mine)
