"""Every paper stage in order on the tiny model with 2 CPU ranks (DeepSpeed, gloo) on shards the
pipeline wrote; then a run killed mid-stage (SIGKILL to the launcher's process group) and resumed.

The stage configs are the real conf/stages/*.yaml, rewritten for the test: tiny model, short
sequences, a few steps, learning rates the tiny random model can move with, weight decay 0 (so a
changed weight means a gradient reached it), and every mixture entry pointed at the test shards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer.sample_data import build_sample_corpus
from trainer.stages import CONF_DIR, load_model_config, load_stage, load_yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
KILLED_STAGE_STEPS = 16  # long enough that the poller below always kills it mid-stage
MODULES = (
    "model.visual_model",
    "model.visual_bridge_model",
    "model.embed_tokens",
    "model.layers",
    "model.norm",
    "lm_head",
    "model.audio_embed_layers",
    "audio_head",
    "audio_tokenizer",
)


def tiny_stage_dir(out: Path, manifests: list[str], run_dir: Path) -> Path:
    kinds: set[str] = set()
    for m in manifests:
        kinds |= set(json.loads(Path(m).read_text())["totals"]["kinds"])
    out.mkdir(parents=True)
    for path in sorted((CONF_DIR / "stages").glob("*.yaml")):
        doc = load_yaml(path)
        steps = KILLED_STAGE_STEPS if doc["stage"] == "1.2" else STEPS
        doc.update(
            model="tiny",
            output=str(run_dir),
            seq_len=256,
            micro_batch=1,
            grad_accum=1,
            num_workers=1,
            budget={"steps": steps},
            save_every=2,
            log_every=1,
            warmup_steps=0,
            weight_decay=0.0,
        )
        if doc.get("task", "llm") != "llm":  # the audio stages: short clips, two per micro-batch
            doc.update(micro_batch=2, seq_len=0)
            doc["task_args"] = {**AUDIO_TASK_ARGS.get(doc["task"], {}), "max_seconds": 3.0}
        doc["lr"] = dict.fromkeys(doc["lr"], 2e-3)
        mixture = []
        for entry in doc["mixture"]:
            present = [k for k in entry["kinds"] if k in kinds]  # the demo corpus has no OCR shards
            if present:
                entry = {k: v for k, v in entry.items() if k != "manifest"}
                mixture.append({**entry, "kinds": present, "manifests": manifests, "weight": 1.0})
        doc["mixture"] = mixture
        (out / path.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


AUDIO_STAGES = ["0.1", "0.2", "0.3"]
AUDIO_TASK_ARGS: dict[str, dict] = {  # stage 0.1's semantic objective with a frozen tiny Qwen2 on the run's tokenizer
    "audio_tokenizer": {
        "semantic_llm": {
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 1024,
            }
        }
    }
}


def omni(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def steps_of(stage_dir: Path) -> dict[int, dict]:
    """The last record of every step (a resumed run logs the replayed steps again)."""
    records = [json.loads(line) for line in (stage_dir / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    manifests = build_sample_corpus(root / "corpus")
    run = root / "run"
    stages = tiny_stage_dir(root / "stages", manifests, run)
    out = finish(omni("train-all", "--stages", str(stages), "--nproc", "2"))
    return {"root": root, "stages": stages, "run": run, "log": out}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _initial_weights(stage_yaml: Path, run: Path) -> dict[str, torch.Tensor]:
    """Stage 1.1 starts from random weights: rebuild them as every rank did (same seed, same code)."""
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer

    stage = load_stage(stage_yaml)
    torch.manual_seed(stage.seed)
    return build_model(load_model_config("tiny"), load_tokenizer(run / "tokenizer")).state_dict()


def _loss_on_first_batches(stage, weights: dict[str, torch.Tensor], tokenizer_dir: Path, batches: int = 2) -> float:
    """The model's loss on the first micro-batches rank 0 trained on in this stage (same loader, same seed)."""
    from trainer.data import make_loader, resolve_entry, to_device
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer

    cfg = load_model_config(stage.model)
    model = build_model(cfg, load_tokenizer(tokenizer_dir))
    model.load_state_dict(weights)
    loader = make_loader(
        [resolve_entry(e) for e in stage.mixture],
        cfg,
        str(tokenizer_dir),
        stage.seq_len,
        stage.micro_batch,
        stage.seed,
        0,
        2,
        0,
    )
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            losses.append(float(model(**to_device(batch, "cpu"))["loss"]))
            if i + 1 == batches:
                return sum(losses) / len(losses)
    raise AssertionError("loader ended")


def test_the_audio_stages_train_first_and_stage_2_1_hears_through_their_tokenizer(trained) -> None:
    run = trained["run"]
    exports = {}
    for stage_id, task in zip(AUDIO_STAGES, ("audio_tokenizer", "flow_decoder", "vocoder"), strict=True):
        done = json.loads((run / stage_id / "final" / "done.json").read_text())
        assert (done["task"], done["steps"]) == (task, STEPS)
        assert done["model_config"]["name"] == "tiny" and Path(done["tokenizer"]).is_dir()
        records = list(steps_of(run / stage_id).values())
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(np.isfinite(r["loss"]) and r["metrics"] for r in records), records[-1]
        if task == "audio_tokenizer":  # every objective reports: reconstruction, commitment, semantic, usage
            assert {"recon", "commit", "semantic", "usage_l0", "usage_l7"} <= set(records[-1]["metrics"])
        exports[stage_id] = _weights(run / stage_id / "final" / "model.pt")
    assert any(k.startswith("flow.") for k in exports["0.2"]) and any(
        k.startswith("generator.") for k in exports["0.3"]
    )
    trained_tokenizer = {k[len("tokenizer.") :]: v for k, v in exports["0.1"].items() if k.startswith("tokenizer.")}
    for stage_id in ("2.1", "4.2"):  # loaded at 2.1, then frozen through every later stage
        llm = _weights(run / stage_id / "final" / "model.pt")
        for k, v in trained_tokenizer.items():
            assert torch.equal(llm[f"audio_tokenizer.{k}"], v), f"stage {stage_id}: audio_tokenizer.{k}"
    assert "stage 0.1 (audio-tokenizer): training the audio tokenizer" in trained["log"]


def test_omni_speak_from_the_trained_run(trained, tmp_path: Path) -> None:
    """The launcher's exports are all `omni speak` needs: the last LLM stage, 0.2's flow, 0.3's vocoder."""
    import wave

    outs = []
    for name in ("a.wav", "b.wav"):
        out = tmp_path / name
        args = ("speak", str(trained["run"]), "--text", "Please hold.", "--out", str(out), "--seed", "7")
        log = finish(omni(*args, "--min-frames", "4", "--max-frames", "9", "--flow-steps", "2"), timeout=120)
        frames = int(log.split(" frames")[0].rsplit(" ", 1)[-1])
        with wave.open(str(out)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (24_000, 1, frames * 8 * 240)
        assert "(stage 4.2)" in log and 4 <= frames <= 9
        outs.append(out.read_bytes())
    assert outs[0] == outs[1], "same seed, same WAV"


def test_every_stage_trains_exactly_its_modules_and_loss_falls(trained) -> None:
    run, stages = trained["run"], trained["stages"]
    configs = sorted((load_stage(p) for p in stages.glob("*.yaml")), key=lambda s: [int(x) for x in s.stage.split(".")])
    assert [s.stage for s in configs] == [*AUDIO_STAGES, "1.1", "1.2", "2.1", "2.2", "3", "4.1", "4.2"]
    configs = [s for s in configs if not s.is_audio]
    before = _initial_weights(next(stages.glob("1.1-*.yaml")), run)
    tokenizer_weights = _weights(run / "0.1" / "final" / "model.pt")
    for stage in configs:
        if stage.audio_tokenizer_from:  # stage 2.1 swaps in stage 0.1's tokenizer before it trains
            before = {
                **before,
                **{f"audio_{k}": v for k, v in tokenizer_weights.items() if k.startswith("tokenizer.")},
            }
        done = json.loads((run / stage.stage / "final" / "done.json").read_text())
        assert done["steps"] == stage.budget["steps"]
        after = _weights(run / stage.stage / "final" / "model.pt")
        assert after.keys() == before.keys()
        changed = {
            m: any(not torch.equal(before[k], after[k]) for k in after if k == m or k.startswith(m + "."))
            for m in MODULES
        }
        assert changed == {m: m in stage.trainable for m in MODULES}, f"stage {stage.stage}"
        assert sorted(steps_of(run / stage.stage)) == list(range(1, int(stage.budget["steps"]) + 1))
        loss_before = _loss_on_first_batches(stage, before, run / "tokenizer")
        loss_after = _loss_on_first_batches(stage, after, run / "tokenizer")
        assert loss_after < loss_before, f"stage {stage.stage}: loss {loss_before:.4f} -> {loss_after:.4f}"
        before = after
    assert (run / "1.1" / "tb").is_dir() and any((run / "1.1" / "tb").iterdir()), "TensorBoard events written"
    assert "tokens/s" in trained["log"] and "samples/s" in trained["log"]


def test_a_killed_run_resumes_with_the_same_losses_and_samples(trained) -> None:
    run, root = trained["run"], trained["root"]
    again = root / "again"
    again.mkdir()
    shutil.copytree(run / "tokenizer", again / "tokenizer")
    stage_yaml = next(trained["stages"].glob("1.2-*.yaml"))
    overrides = ["--set", f"output={again}", "--set", f"init_from={run / '1.1' / 'final' / 'model.pt'}"]
    args = ("train", str(stage_yaml), "--nproc", "2", *overrides)

    proc = omni(*args, start_new_session=True)
    committed = again / "1.2" / "checkpoints" / "committed"
    deadline = time.monotonic() + 240
    while not (committed.is_file() and committed.read_text().strip() >= "step00000004"):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (again / "1.2" / "final" / "done.json").exists(), "killed before the stage finished"
    killed_at = max(steps_of(again / "1.2"))
    assert killed_at < KILLED_STAGE_STEPS

    out = finish(omni(*args))
    assert "resumed at step" in out
    resumed = steps_of(again / "1.2")
    reference = steps_of(run / "1.2")
    assert sorted(resumed) == sorted(reference) == list(range(1, KILLED_STAGE_STEPS + 1))
    for step, ref in reference.items():
        assert resumed[step]["sample_ids"] == ref["sample_ids"], f"step {step}: different samples"
        assert resumed[step]["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), f"step {step}"
