"""`omni plan --mixtures DIR` writes mixture files that `omni train-all --mixtures DIR` runs as they are,
and the corpus config holds the SFT pair counts of Table 4 and the image categories of Table 5."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.plan import PlanError, format_plan, load_corpus, make_plan, plan_mixtures, sft_categories, sft_pairs
from shards.manifest import ShardInfo, ShardStats, read_shardset_manifest, write_shardset_manifest
from trainer.sample_data import build_sample_corpus
from trainer.stages import CONF_DIR, load_stage

CORPUS = Path(__file__).resolve().parents[1] / "conf" / "corpus" / "omni500b.yaml"
STAGES = CONF_DIR / "stages"
TABLE4 = {"text": 400e3, "image": 16e6, "video": 100e3, "audio": 282e3, "image_audio": 60e3}
TABLE5 = {
    "general_qa": 0.3226,
    "ocr": 0.2651,
    "graphical": 0.0904,
    "mathematics": 0.1031,
    "spatiotemporal": 0.0263,
    "captioning": 0.0823,
    "medical": 0.1102,
}


@pytest.fixture(scope="module")
def sample_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two shard sets: the pipeline's and the trainer's extra kinds (one conversation of each SFT kind;
    no OCR)."""
    return build_sample_corpus(tmp_path_factory.mktemp("plan-mixtures") / "corpus")


@pytest.fixture(scope="module")
def planned(sample_corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("mix") / "mixtures"
    have = [str(Path(sample_corpus[0]).parents[1]), sample_corpus[1]]  # a run dir and a manifest file
    code = main(["plan", str(CORPUS), "--have", *have, "--mixtures", str(out)])
    held = {k for m in sample_corpus for k, n in _held_kinds(m).items() if n}
    assert "ocr" not in held, "the sample corpus gained OCR: the tests below expect 1.2 to lose it"
    return {"code": code, "dir": out, "have": have, "held": held}


def _held_kinds(manifest: str) -> dict[str, int]:
    return read_shardset_manifest(manifest)["totals"]["kinds"]


def test_table4_and_table5_are_in_the_corpus_config() -> None:
    corpus = load_corpus(str(CORPUS))
    assert {k: float(v) for k, v in corpus["sft"]["table4"].items()} == TABLE4
    pairs = sft_pairs(corpus)
    assert set(pairs) == {"sft_text", "sft_image", "sft_video", "sft_audio", "sft_audio_generation", "sft_image_audio"}
    assert (pairs["sft_text"], pairs["sft_image"], pairs["sft_video"]) == (400e3, 16e6, 100e3)
    assert pairs["sft_audio"] + pairs["sft_audio_generation"] == TABLE4["audio"]
    assert pairs["sft_image_audio"] == TABLE4["image_audio"]
    assert sum(pairs.values()) == pytest.approx(17e6, rel=0.01)  # "approximately 17 million data pairs"
    assert sft_categories(corpus) == {"sft_image": TABLE5}
    # stage 4.1 mixes the understanding pairs by their counts; 4.2 the spoken answers; the audio stages are there
    stages = corpus["training_stages"]
    understanding = {k: pairs[k] for k in stages["4.1"]}
    for kind, w in stages["4.1"].items():
        assert w == pytest.approx(understanding[kind] / sum(understanding.values()), rel=0.02, abs=1e-4)
    assert stages["4.2"][0] == {"name": "spoken-answers", "kinds": ["sft_audio_generation"], "weight": 0.8}
    assert set(stages) >= {"0.1", "0.2", "0.3", "1.1", "1.2", "2.1", "2.2", "3", "4.1", "4.2"}
    assert set(stages["0.1"]) == {"asr", "speech_text_interleaved"} and set(stages["0.2"]) == {"asr", "tts"}
    plan = make_plan(corpus, [])
    rows = {k.kind: k for k in plan.kinds}
    assert rows["sft_image"].target_pairs == 16e6 and rows["sft_image"].samples_needed == 16e6
    assert rows["sft_image"].target_tokens == 16e6 * corpus["default_tokens_per_sample"]["sft_image"]
    medical = next(c for c in plan.categories if c.category == "medical")
    assert medical.target_pairs == pytest.approx(0.1102 * 16e6)
    broken = copy.deepcopy(corpus)
    broken["sft"]["pairs"]["sft_audio"]["pairs"] = 100e3
    with pytest.raises(PlanError, match="column 'audio' add up to 241,000, not Table 4's 282,000"):
        sft_pairs(broken)
    broken = copy.deepcopy(corpus)
    broken["sft"]["categories"]["sft_image"]["medical"] = 0.2
    with pytest.raises(PlanError, match="shares add up to"):
        sft_categories(broken)


def test_plan_drops_entries_no_shard_set_holds(planned: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert planned["code"] == 0
    out_dir: Path = planned["dir"]
    corpus = load_corpus(str(CORPUS))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"mixture-{s}.yaml" for s in corpus["training_stages"])
    for path in out_dir.iterdir():
        doc = yaml.safe_load(path.read_text())
        if doc["mixture"]:
            assert sum(e["weight"] for e in doc["mixture"]) == pytest.approx(1.0)
        for entry in doc["mixture"]:  # every manifest exists and holds the entry's data types
            assert entry["manifests"]
            for m in entry["manifests"]:
                assert Path(m).is_absolute() and Path(m).is_file()
                assert any(_held_kinds(m).get(k) for k in entry["kinds"]), (path.name, entry["name"], m)
    mix12 = yaml.safe_load((out_dir / "mixture-1.2.yaml").read_text())
    assert [d["name"] for d in mix12["dropped"]] == ["ocr"]
    assert mix12["dropped"][0]["reason"] == "no shard set of the --have runs holds ocr"
    assert mix12["dropped"][0]["planned_weight"] == 0.10
    kept = {e["name"]: e for e in mix12["mixture"]}
    assert set(kept) == {"image_caption", "interleaved_image_text", "text"}
    for e in kept.values():  # renormalised over the 0.9 that is left
        assert e["weight"] == pytest.approx(e["planned_weight"] / 0.9)
    mix11 = yaml.safe_load((out_dir / "mixture-1.1.yaml").read_text())
    assert mix11["mixture"][0]["manifests"] == [str(Path(planned["have"][0]) / "shards" / "manifest.json")]
    assert "dropped" not in mix11
    for stage, spec in corpus["training_stages"].items():  # exactly the entries of data types no shard set holds
        doc = yaml.safe_load((out_dir / f"mixture-{stage}.yaml").read_text())
        entries = spec if isinstance(spec, list) else [{"name": k, "kinds": [k]} for k in spec]
        missing = [e["name"] for e in entries if not set(e["kinds"]) & planned["held"]]
        by_kind = [d["name"] for d in doc.get("dropped", []) if not d.get("categories")]  # categories: below
        assert by_kind == missing, stage
        assert len(doc["mixture"]) == len(entries) - len(missing)
    # the warnings, printed by plan
    assert main(["plan", str(CORPUS), "--have", *planned["have"], "--mixtures", str(out_dir)]) == 0
    err = capsys.readouterr().err
    assert "omni plan: warning: stage 1.2: ocr dropped (weight 0.1): no shard set of the --have runs holds ocr" in err
    # the planned stage loads as it is
    stage = load_stage(STAGES / "1.2-image-text.yaml", mixtures=out_dir)
    assert [e["name"] for e in stage.mixture] == [e["name"] for e in mix12["mixture"]]


def test_plan_strict_names_the_missing_shard_sets(
    sample_corpus: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "strict"
    assert main(["plan", str(CORPUS), "--have", *sample_corpus, "--mixtures", str(out_dir), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("omni: error: no shard set of the --have runs holds ocr")
    held = {k for m in sample_corpus for k, n in _held_kinds(m).items() if n}
    for spec in load_corpus(str(CORPUS))["training_stages"].values():
        for entry in spec if isinstance(spec, list) else [{"kinds": [k]} for k in spec]:
            for kind in set(entry["kinds"]) - held:
                assert f"{kind} (stage" in err
    assert "ocr (stage 1.2)" in err
    assert not out_dir.exists()
    assert main(["plan", str(CORPUS), "--have", *sample_corpus, "--strict"]) == 2  # the check without --mixtures
    capsys.readouterr()
    held_only = load_corpus(str(CORPUS))
    held_only["training_stages"] = {
        "1.1": {"image_caption": 1.0},
        "2.1": [
            {"name": "asr", "kinds": ["asr"], "weight": 0.5},
            {"name": "itts", "kinds": ["speech_text_interleaved"], "weight": 0.5, "format": "itts"},
        ],
    }
    corpus_path = tmp_path / "held.yaml"
    corpus_path.write_text(yaml.safe_dump(held_only))
    assert main(["plan", str(corpus_path), "--have", *sample_corpus, "--mixtures", str(out_dir), "--strict"]) == 0
    mix21 = yaml.safe_load((out_dir / "mixture-2.1.yaml").read_text())
    assert mix21["mixture"][1]["format"] == "itts" and mix21["mixture"][1]["manifests"] == [sample_corpus[1]]
    assert sorted(p.name for p in out_dir.iterdir()) == ["mixture-1.1.yaml", "mixture-2.1.yaml"]


def test_plan_counts_the_image_categories_of_the_manifests(tmp_path: Path) -> None:
    corpus = load_corpus(str(CORPUS))
    before = format_plan(make_plan(corpus, []))
    assert "sft_image by category (Table 5 shares of 16.00M pairs)" in before
    assert "the manifests count no sft_image category yet: targets from the config's shares" in before
    stats = ShardStats()
    for category in ["ocr", "ocr", "medical", None, "ocr", "cooking"]:
        meta = json.dumps({"category": category, "format": "llava"})
        stats.add({"kind": "sft_image", "source": "s", "meta": meta, "segments": []})
        stats.add({"kind": "text", "source": "s", "meta": json.dumps({"category": "ocr"}), "segments": []})
    manifest = write_shardset_manifest(str(tmp_path / "sft"), [ShardInfo("00000.tar", "0" * 64, 1, stats)])
    doc = read_shardset_manifest(manifest)
    assert {"kind": "sft_image", "category": "ocr", "samples": 3} in doc["totals"]["categories"]
    assert ShardStats.from_dict(doc["shards"][0]).categories == stats.categories
    plan = make_plan(corpus, [manifest])
    rows = {c.category: c for c in plan.categories if c.kind == "sft_image"}
    assert (rows["ocr"].have_samples, rows["medical"].have_samples, rows["mathematics"].have_samples) == (3, 1, 0)
    assert rows["ocr"].gap_pairs == pytest.approx(0.2651 * 16e6 - 3)
    assert rows["cooking"].share == 0 and rows["cooking"].have_samples == 1  # counted, not in Table 5
    assert plan.categories_counted == {"sft_image": True}
    text = format_plan(plan)
    assert "count no sft_image category" not in text and "  ocr                 26.51%" in text
    sft_row = next(k for k in plan.kinds if k.kind == "sft_image")
    assert sft_row.have_samples == 6 and sft_row.samples_needed == 16e6 - 6


def test_train_all_runs_the_planned_mixtures(
    planned: dict, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every stage as shipped (0.1 -> 4.2), on the planned mixtures (1.2 without its OCR entry): nothing
    edited, the tiny model through --set; the ranks read the mixtures themselves (the shipped mixtures'
    shards do not exist here)."""
    monkeypatch.delenv("OMNI_SHARDS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    tiny = ["model=tiny", "seq_len=256", "budget.steps=2", f"output={run}", "num_workers=0", "grad_accum=1"]
    tiny += ["micro_batch=1", "save_every=1000", "log_every=1", "warmup_steps=0", "task_args.max_seconds=3"]
    args = ["train-all", "--mixtures", str(planned["dir"]), "--nproc", "1"]
    assert main(args + [a for s in tiny for a in ("--set", s)]) == 0
    out = capfd.readouterr().out
    assert f"mixtures: stage 1.2: {planned['dir'] / 'mixture-1.2.yaml'} (ocr dropped by the plan)" in out
    stages = ("0.1", "0.2", "0.3", "1.1", "1.2", "2.1", "2.2", "3", "4.1", "4.2")
    for stage in stages:
        assert json.loads((run / stage / "final" / "done.json").read_text())["steps"] == 2, stage
    tags = {t for line in (run / "1.2" / "steps.jsonl").read_text().splitlines() for t in json.loads(line)["by_tag"]}
    assert tags <= {"image", "text", "interleaved"} and "image" in tags


def test_train_all_mixtures_refusals(
    planned: dict, sample_corpus: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["train-all", "--mixtures", str(tmp_path / "nowhere")]) == 2
    assert "omni: error: --mixtures " in capfd.readouterr().err
    # a stage whose planned mixture keeps nothing (here 4.1 on OCR only): stopped before any rank starts
    corpus = load_corpus(str(CORPUS))
    corpus["training_stages"] = {"4.1": {"ocr": 1.0}}
    (tmp_path / "ocr.yaml").write_text(yaml.safe_dump(corpus))
    assert main(["plan", str(tmp_path / "ocr.yaml"), "--have", *sample_corpus, "--mixtures", str(tmp_path / "o")]) == 0
    assert "stage 4.1: no data type of it has a shard set" in capfd.readouterr().err
    assert main(["train-all", "--mixtures", str(tmp_path / "o"), "--from", "4.1", "--until", "4.1"]) == 2
    err = capfd.readouterr().err
    assert "stage 4.1: the planned mixture" in err and "keeps no entry (ocr: no shard set of the --have runs" in err
    # a stage without a planned file trains on its own mixture, and says so (here: its shards are missing)
    partial = tmp_path / "partial"
    shutil.copytree(planned["dir"], partial)
    (partial / "mixture-1.1.yaml").unlink()
    code = main(["train-all", "--mixtures", str(partial), "--from", "1.1", "--until", "1.1"])
    captured = capfd.readouterr()
    assert f"mixtures: stage 1.1: no mixture-1.1.yaml in {partial}; the stage's own mixture" in captured.out
    assert code == 2 and "shards/image_caption/manifest.json" in captured.err


def test_plan_mixtures_keep_the_order_and_formats_of_list_entries(sample_corpus: list[str]) -> None:
    corpus = {
        "training_stages": {
            "2.1": [
                {"name": "intlv", "kinds": ["speech_text_interleaved"], "weight": 3, "format": "intlv"},
                {"name": "ocr", "kinds": ["ocr", "asr"], "weight": 1},
            ]
        }
    }
    (m,) = plan_mixtures(corpus, sample_corpus)
    assert [(e["name"], e.get("format"), e["weight"]) for e in m.entries] == [
        ("intlv", "intlv", 0.75),
        ("ocr", None, 0.25),
    ]
    assert m.entries[1]["manifests"] == [sample_corpus[0]] and m.dropped == []
    with pytest.raises(PlanError, match="an entry needs kinds"):
        plan_mixtures({"training_stages": {"9": [{"name": "x"}]}}, sample_corpus)


def test_sft_entries_split_by_the_categories_the_shard_sets_hold(planned: dict, sample_corpus: list[str]) -> None:
    """Table 5 reaches the mixture weights: 4.1's sft_image entry becomes one entry per category held
    (weight x share), the others are dropped with a reason, and the loader keeps only that category."""
    from trainer.data import EntryStream, resolve_entry, sample_category

    doc = yaml.safe_load((planned["dir"] / "mixture-4.1.yaml").read_text())
    image = [e for e in doc["mixture"] if e["kinds"] == ["sft_image"]]
    assert [e["categories"] for e in image] == [["captioning"]] and image[0]["name"].endswith("/captioning")
    dropped = {d["name"].split("/")[-1] for d in doc.get("dropped", []) if d["kinds"] == ["sft_image"]}
    assert {"ocr", "mathematics", "medical"} <= dropped
    stream = EntryStream(resolve_entry(image[0]), seed=0, index=0, stream=0, streams=1)
    assert {sample_category(stream.next_sample()) for _ in range(3)} == {"captioning"}
