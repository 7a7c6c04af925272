"""``omni speak`` / ``omni generate`` from an ``omni export`` directory, and loading an export in bf16.

A tiny run (the tiny config's real modules: an LLM stage 2.1 with perturbed random weights, stages 0.2 and
0.3 as their stage modules export them) is exported with ``omni export``; speaking from the LLM export —
its flow decoder and vocoder found in the run it was exported from, or given with ``--flow`` /
``--vocoder`` as exports or as stage directories — writes the same WAV bytes as speaking from the run for
the same seed, and ``omni generate`` prints the same reply. The user errors are one line, exit 2.

``load_pretrained(DIR, dtype=bf16)`` builds the model in bf16 and reads one shard at a time: measured with
``trainer.memory.LiveBytes`` (shard reads counted too), its peak stays under 1.3x the bf16 model, where
building in fp32 and converting (as before) holds the fp32 model, every shard and the bf16 copy at once;
the model it gives is the one the fp32-then-convert load gave, tensor for tensor and buffer for buffer.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEAK = ["--text", "Good morning", "--seed", "5", "--min-frames", "3", "--max-frames", "3"]
SPEAK += ["--flow-steps", "2", "--chunk-frames", "2", "--overlap-frames", "1"]


def _omni(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from pipelines.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _stage(run: Path, stage: str, state: dict, doc: dict) -> Path:
    final = run / stage / "final"
    final.mkdir(parents=True)
    torch.save(state, final / "model.pt")
    (final / "done.json").write_text(json.dumps({"stage": stage, "steps": 3, **doc}))
    return run / stage


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, text_tokenizer_dir: str) -> dict:
    from pipelines.cli import main
    from trainer.flow_decoder import build_flow_decoder
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer
    from trainer.vocoder import build_vocoder

    base = tmp_path_factory.mktemp("export_generate")
    run = base / "run"
    shutil.copytree(text_tokenizer_dir, run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer")
    cfg = yaml.safe_load((ROOT / "conf/models/tiny.yaml").read_text())
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    with torch.no_grad():  # no weight left at its initial constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tok_dir = str(run / "tokenizer")
    _stage(run, "2.1", model.state_dict(), {"task": "omni", "model_config": cfg, "tokenizer": tok_dir})
    flow = build_flow_decoder(cfg, {"audio_tokenizer_from": None}, run)
    flow.tokenizer.load_state_dict(model.audio_tokenizer.state_dict())  # as in a real run
    _stage(run, "0.2", flow.state_dict(), {"task": "flow_decoder", "model_config": cfg})
    _stage(run, "0.3", build_vocoder(cfg, {}, run).state_dict(), {"task": "vocoder", "model_config": cfg})
    out = {"run": run, "base": base, "cfg": cfg, "tok": tok, "model": model}
    for stage, name in (("2.1", "llm"), ("0.2", "flow"), ("0.3", "vocoder")):
        out[name] = base / f"export-{name}"
        assert main(["export", str(run / stage), "--out", str(out[name])]) == 0
    return out


def _speak(source: list[str], wav: Path, capsys: pytest.CaptureFixture) -> bytes:
    rc, stdout, err = _omni(["speak", *source, *SPEAK, "--out", str(wav)], capsys)
    assert rc == 0, err
    assert f"{wav}: 3 frames, 0.24 s at 24000 Hz (stage 2.1)" in stdout
    return wav.read_bytes()


def test_speak_from_an_export_writes_the_runs_wav(run: dict, tmp_path: Path, capsys) -> None:
    import numpy as np

    want = _speak([str(run["run"])], tmp_path / "run.wav", capsys)
    pcm = np.frombuffer(want[44:], dtype="<i2")
    assert len(pcm) == 3 * 1920 and np.abs(pcm).max() > 0
    llm = str(run["llm"])
    doc = json.loads((run["llm"] / "config.json").read_text())
    assert Path(doc["omni_stage"]["source"]) == (run["run"] / "2.1" / "final").resolve()
    sources = {
        "the exported run's 0.2 / 0.3": [llm],
        "exports": [llm, "--flow", str(run["flow"]), "--vocoder", str(run["vocoder"])],
        "stage directories": [llm, "--flow", str(run["run"] / "0.2"), "--vocoder", str(run["run"] / "0.3" / "final")],
    }
    for i, (what, source) in enumerate(sources.items()):
        assert _speak(source, tmp_path / f"export-{i}.wav", capsys) == want, what


def test_generate_from_an_export_gives_the_runs_reply(run: dict, tmp_path: Path, capsys) -> None:
    args = ["--prompt", "Say hello", "--seed", "3", "--max-new-tokens", "6", "--max-frames", "2"]
    args += ["--flow-steps", "2", "--text-temperature", "1.5", "--text-top-k", "0", "--top-p", "1"]
    replies = []
    for name, source in (("run", run["run"]), ("export", run["llm"])):
        out_dir = tmp_path / name
        rc, stdout, err = _omni(["generate", str(source), *args, "--out-dir", str(out_dir)], capsys)
        assert rc == 0, err
        wavs = {p.name: p.read_bytes() for p in sorted(out_dir.glob("reply-*.wav"))}
        replies.append((stdout.replace(str(out_dir), "OUT"), wavs))
    assert replies[0] == replies[1]

    # and with speech in the reply (a random model seldom starts it: the second step is made to)
    import numpy as np

    from trainer.export import load_generator
    from trainer.generate import OmniGenerator

    def speak_second(start: int):  # noqa: ANN202
        def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
            if len(generated) != 1:
                return logits
            return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([start]), 0.0)

        return force

    parts = []
    for gen in (OmniGenerator.from_run(run["run"]), load_generator(run["llm"], require_audio=True)):
        force = speak_second(gen.sp.audiogen_start)
        parts.append(
            gen.generate("Say hello", seed=3, max_new_tokens=4, max_frames=3, min_frames=3, logits_processor=force)
        )
    assert [p["type"] for p in parts[0]] == [p["type"] for p in parts[1]]
    assert [p["frames"] for p in parts[0] if p["type"] == "audio"][:1] == [3]
    for a, b in zip(*parts, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_export_generation_errors_are_one_line_exit_2(run: dict, tmp_path: Path, capsys) -> None:
    moved = tmp_path / "moved"  # an export whose run is gone
    shutil.copytree(run["llm"], moved)
    doc = json.loads((moved / "config.json").read_text())
    doc["omni_stage"]["source"] = str(tmp_path / "gone" / "2.1" / "final")
    (moved / "config.json").write_text(json.dumps(doc))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    wav = tmp_path / "x.wav"
    flow, llm = str(run["flow"]), str(run["llm"])
    cases = [
        ([flow], "audio stage"),
        ([str(foreign)], "not an omni export"),
        ([str(moved)], "pass --flow DIR (stage 0.2's export or stage directory) and --vocoder DIR"),
        ([str(moved), "--flow", flow], "(the run it was exported from has none): pass --vocoder DIR"),
        ([llm, "--vocoder", flow], "not a vocoder export"),
        ([llm, "--flow", str(run["run"] / "0.3")], "not a flow_decoder stage"),
        ([llm, "--flow", str(tmp_path / "nowhere")], "no stage directory"),
        ([llm, "--stage", "3.1"], "is an export of stage 2.1"),
        ([str(run["run"]), "--flow", flow], "--flow / --vocoder go with an export directory"),
    ]
    for source, words in cases:
        rc, _, err = _omni(["speak", *source, "--text", "hi", "--out", str(wav)], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("omni: error: "), (source, err)
        assert words in lines[0], (source, err)
        assert "--flow" not in source or "--flow DIR" not in lines[0], "only what is missing is asked for"
    assert not wav.exists()


# ---------------------------------------------------------------- loading in bf16


def _counted_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' ``load_file`` creates its tensors outside torch's dispatcher, which ``LiveBytes`` watches:
    a clone of each read (the original freed at once) makes a shard's bytes count while it is held."""
    import safetensors.torch

    read = safetensors.torch.load_file

    def counted(filename, device="cpu"):  # noqa: ANN001, ANN202
        return {k: v.clone() for k, v in read(filename, device=device).items()}

    monkeypatch.setattr(safetensors.torch, "load_file", counted)


def _nbytes(model: torch.nn.Module) -> int:
    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def _convert_after_fp32(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The load before building in the target dtype: fp32 model, every shard, then ``.to(dtype)``."""
    from trainer.export import read_config, read_state
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer
    from trainer.weights import load_into

    model = build_model(read_config(path)["omni"], load_tokenizer(path))
    load_into(model, read_state(path))
    return model.to(dtype).eval()


def test_bf16_load_builds_in_bf16_one_shard_at_a_time(run: dict, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from trainer.export import load_pretrained, weight_files
    from trainer.memory import LiveBytes

    fp32_dir, bf16_dir = run["base"] / "fp32-small-shards", run["base"] / "bf16-small-shards"
    for out, dtype in ((fp32_dir, "fp32"), (bf16_dir, "bf16")):
        argv = ["export", str(run["run"] / "2.1"), "--out", str(out), "--max-shard-size", "64KB", "--dtype", dtype]
        assert _omni(argv, capsys)[0] == 0
    _counted_reads(monkeypatch)
    peaks = {}
    models = {}
    for name, load in (
        ("fp32 export, bf16 load", lambda: load_pretrained(fp32_dir, dtype=torch.bfloat16)),
        ("bf16 export, auto load", lambda: load_pretrained(bf16_dir, dtype="auto")),
        ("fp32 export, fp32 build then bf16", lambda: _convert_after_fp32(fp32_dir, torch.bfloat16)),
    ):
        with LiveBytes() as meter:
            models[name] = load()
        peaks[name] = meter.peak
    size = _nbytes(models["fp32 export, bf16 load"])
    assert _nbytes(run["model"]) == 2 * size, "the fp32 model is twice the bf16 one"
    print({k: f"{v / size:.2f}x the bf16 model" for k, v in peaks.items()}, f"(bf16 model: {size} bytes)")
    assert peaks["bf16 export, auto load"] < 1.3 * size
    # an fp32 export read into bf16: the model, the largest shard and one tensor's bf16 copy (load_into's cast);
    # here that is 1.3x because one tensor is a fifth of this tiny model (at 10.9B: 22 GB + a 5 GB shard)
    shard = max(sum(math.prod(shape) * 4 for shape, _ in info.values()) for _, info in weight_files(fp32_dir))
    tensor = max(t.numel() * 2 for t in models["fp32 export, bf16 load"].state_dict().values())
    assert shard / size < 0.25 and peaks["fp32 export, bf16 load"] <= size + shard + tensor + 1024
    assert peaks["fp32 export, fp32 build then bf16"] > 3.5 * size, "the fp32 model and every shard at once"
    before = models["fp32 export, fp32 build then bf16"]
    for model in (models["fp32 export, bf16 load"], models["bf16 export, auto load"]):
        assert not model.training and model.special == before.special
        for mine, theirs in (
            (dict(model.named_parameters()), dict(before.named_parameters())),
            (dict(model.named_buffers()), dict(before.named_buffers())),  # the rotary inv_freq too
        ):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
