"""``omni train --smoke``'s rewriting of the real stage configs (trainer/smoke.py), without training: the
shrunk settings, ``--set`` on top, missing shards replaced by the sample set (and kinds it lacks dropped),
present shards kept, ``init_from`` kept within a chain and dropped without an export, and an output
directory that is not a smoke run's left alone. ``tests/test_packaging.py`` runs one for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trainer.smoke import MARKER, SmokeError, prepare
from trainer.stages import CONF_DIR, load_stage, load_yaml, resolve_stage_ref


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke root whose sample set is built once for the module (each test copies it)."""
    root = tmp_path_factory.mktemp("smoke-sample")
    said: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNI_SHARDS", str(root / "no-shards-here"))
        prepare([resolve_stage_ref("1.1")], root=root, say=said.append)
    assert any("building the sample shard set" in m for m in said)
    return root / "sample-shards"


@pytest.fixture
def root(tmp_path: Path, sample_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMNI_SHARDS", str(tmp_path / "no-shards-here"))
    shutil.copytree(sample_root, tmp_path / "smoke" / "sample-shards", symlinks=True)
    return tmp_path / "smoke"


def test_stage_ids_resolve_to_the_shipped_configs() -> None:
    assert resolve_stage_ref("1.1") == CONF_DIR / "stages" / "1.1-image-projector.yaml"
    assert resolve_stage_ref("0.2-flow-decoder") == CONF_DIR / "stages" / "0.2-flow-decoder.yaml"
    assert resolve_stage_ref("3").name == "3-omni-pretrain.yaml"
    with pytest.raises(FileNotFoundError, match=r"stage id '9\.9' .*0\.1, 0\.2, 0\.3, 1\.1"):
        resolve_stage_ref("9.9")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_stage_ref("missing/1.1.yaml")


def test_smoke_shrinks_a_chain_and_points_missing_shards_at_the_sample_set(root: Path) -> None:
    said: list[str] = []
    paths = [resolve_stage_ref("1.1"), resolve_stage_ref("1.2")]
    out = prepare(paths, ["budget.steps=2", "lr.default=0.01"], root=root, say=said.append)
    assert [p.name for p in out] == ["1.1-image-projector.yaml", "1.2-image-text.yaml"]
    assert not any("building" in m for m in said)  # the sample set is reused
    s11, s12 = (load_stage(p) for p in out)
    sample = root / "sample-shards"
    sample_manifests = {str((sample / d / "manifest.json").resolve()) for d in ("run/shards", "extra")}
    for s in (s11, s12):
        assert (s.seq_len, s.micro_batch, s.grad_accum, s.num_workers, s.warmup_steps) == (256, 1, 1, 0, 0)
        assert s.budget == {"steps": 2.0} and s.lr["default"] == 0.01  # --set wins over the smoke settings
        assert s.model == str(CONF_DIR / "models" / "tiny.yaml") and s.model_config()["name"] == "tiny"
        assert Path(s.deepspeed).is_file() and s.save_every > 1000
        assert Path(s.output) == (root / "run").resolve() and (s.out_dir / MARKER).is_file()
        assert {m for e in s.mixture for m in e["manifests"]} == sample_manifests
    assert [e["name"] for e in s12.mixture] == ["interleaved", "caption", "text"]  # no OCR in the sample set
    assert s12.init_from == "1.1"  # trained earlier in the same command
    (note,) = [m for m in said if m.startswith("stage 1.2:")]
    assert note.startswith("stage 1.2: interleaved, caption, text -> sample set") and "ocr-chart dropped" in note


def test_a_stage_alone_starts_fresh_without_its_predecessors_export(root: Path) -> None:
    said: list[str] = []
    (out,) = prepare([resolve_stage_ref("2.1")], root=root, say=said.append)
    stage = load_stage(out)
    assert stage.init_from is None and stage.audio_tokenizer_from is None
    assert any("init_from 1.2 dropped" in m for m in said) and any("audio_tokenizer_from 0.1" in m for m in said)
    # once 1.2 has an export in the smoke run, 2.1 starts from it
    export = root / "run" / "1.2" / "final" / "model.pt"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"weights")
    (out,) = prepare([resolve_stage_ref("2.1")], root=root, say=said.append)
    assert load_stage(out).init_from == "1.2"


def test_audio_stages_get_short_clips_and_no_pretrained_parts(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNI_SEMANTIC_LLM_DIR", "/models/Qwen2.5-1.5B")
    monkeypatch.setenv("OMNI_WHISPER_DIR", "/models/whisper")
    monkeypatch.setenv("OMNI_VOCODER_CKPT", "/models/hift.pt")
    out = prepare([resolve_stage_ref(s) for s in ("0.1", "0.2", "0.3")], root=root, say=lambda m: None)
    s01, s02, s03 = (load_stage(p) for p in out)
    for s in (s01, s02, s03):
        assert s.micro_batch == 2 and s.task_args["max_seconds"] == 3.0 and s.budget == {"steps": 5.0}
        assert {k for e in s.mixture for k in e["kinds"]} <= {"asr", "tts", "speech_text_interleaved"}
    assert s01.task_args["encoder_from"] is None and s01.task_args["semantic_llm"] is None
    assert s02.audio_tokenizer_from == "0.1" and s02.task_args["cfg_dropout"] == 0.2
    assert s03.task_args["vocoder_from"] is None


def test_present_shards_are_kept(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(root / "sample-shards" / "run" / "shards", shards / "image_caption")
    monkeypatch.setenv("OMNI_SHARDS", str(shards))
    said: list[str] = []
    (out,) = prepare([resolve_stage_ref("1.1")], root=root, say=said.append)
    assert load_yaml(out)["mixture"][0]["manifest"] == f"{shards}/image_caption"
    assert not any("sample set" in m for m in said)


def test_a_directory_that_is_not_a_smoke_run_is_never_removed(root: Path) -> None:
    real = root.parent / "real-run"
    (real / "1.1" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SmokeError, match="is not a smoke run's output"):
        prepare([resolve_stage_ref("1.1")], [f"output={real}"], root=root, say=lambda m: None)
    assert (real / "1.1" / "checkpoints").is_dir()
    # a smoke run's own output is replaced, so the same command trains again
    (out,) = prepare([resolve_stage_ref("1.1")], root=root, say=lambda m: None)
    stage_dir = load_stage(out).out_dir
    (stage_dir / "final").mkdir()
    prepare([resolve_stage_ref("1.1")], root=root, say=lambda m: None)
    assert not (stage_dir / "final").exists() and json.loads((stage_dir / MARKER).read_text())["stage"] == "1.1"
