"""Global dedup on Ray over a finished run with planted duplicates: precision and recall against
exact ground truth, the ledger and audit afterwards, resume at a phase, the distributed paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from filters.dedup import DedupConfig, run_dedup
from filters.dedup.apply import apply_unit, drops_by_shard_of
from filters.dedup.buckets import METHODS
from filters.dedup.inputs import resolve
from filters.dedup.planted import (
    PHOTOS_FOR_DEDUP,
    image_variants,
    level_recall,
    long_prompts,
    planted_text,
    reencode,
    score_clusters,
)
from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from shards.manifest import read_shardset_manifest
from shards.reader import iter_samples
from shards.schema import loads_meta

pytestmark = pytest.mark.slow

N_TEXT_BASES = 50
N_PHOTOS = 12
N_PROMPTS = 8
IMAGE_DUPLICATES = ("original", "jpeg_q30", "png", "half")  # the crop is a different image


@pytest.fixture(scope="module")
def corpus():
    return planted_text(N_TEXT_BASES)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory, corpus) -> dict:
    """A finished run: text documents with variants at known Jaccard levels, photographs with
    re-encoded and resized copies, recorded prompts re-encoded to mp3/ogg/flac/22 kHz."""
    root = tmp_path_factory.mktemp("planted")
    media = root / "media"
    media.mkdir()
    lines = [{"text": t, "item": f"text:{i}"} for i, t in enumerate(corpus.texts)]
    for p, name in enumerate(PHOTOS_FOR_DEDUP[:N_PHOTOS]):
        for variant, data in image_variants(name).items():
            path = media / f"{name}-{variant}.{'png' if variant == 'png' else 'jpg'}"
            path.write_bytes(data)
            lines.append({"image": str(path), "text": f"Photograph {p}, {variant}.", "item": f"image:{p}:{variant}"})
    for a, wav in enumerate(long_prompts(N_PROMPTS)):
        encodings = {"wav": wav.read_bytes(), **{e: reencode(wav, e) for e in ("mp3", "ogg", "flac")}}
        for enc, data in encodings.items():
            path = media / f"{wav.stem}-{enc}.{ {'wav': 'wav', 'mp3': 'mp3', 'ogg': 'ogg', 'flac': 'flac'}[enc] }"
            path.write_bytes(data)
            lines.append({"audio": str(path), "text": f"Prompt {a}.", "item": f"audio:{a}:{enc}"})
    manifest = root / "planted.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    recipe = recipe_from_dict(
        {
            "name": "planted",
            "output": str(root / "run"),
            "sources": [{"name": "planted", "type": "jsonl", "path": str(manifest), "unit_bytes": 60_000}],
            "pipeline": [],
            "shards": {"max_samples": 64},
        }
    )
    manifest_doc = run_recipe(recipe, executor="local", progress=False)
    assert manifest_doc["written"] == len(lines)
    return {"root": root, "run": root / "run", "items": len(lines)}


def items_by_id(run: Path) -> dict[str, str]:
    """Sample id -> planted item, from the shards and the ledger's locators."""
    out = {}
    for tar in sorted((run / "shards").glob("*.tar")):
        for s in iter_samples(str(tar)):
            out[s["id"]] = loads_meta(s["meta"])["item"]
    return out


def predicted_roots(items: dict[str, str], ledger: list[dict]) -> dict[str, str]:
    """Planted item -> the item its cluster kept (itself when it was kept)."""
    kept = {items[i]: items[i] for i in items}
    for row in ledger:
        kept[items[row["id"]]] = items[json.loads(row["detail"])["kept"]]
    return kept


def scores_for(prefix: str, roots: dict[str, str], true_pairs: list[tuple[str, str]]):
    names = sorted(k for k in roots if k.startswith(prefix))
    index = {k: i for i, k in enumerate(names)}
    predicted = [index[roots[k]] if roots[k] in index else -1 for k in names]
    # the kept item is the smallest node of its cluster, not necessarily the smallest name: map each
    # cluster to its smallest member so the scoring's "keep the smallest" matches
    smallest: dict[int, int] = {}
    for i, r in enumerate(predicted):
        smallest[r] = min(smallest.get(r, i), i)
    return score_clusters([smallest[r] for r in predicted], [(index[a], index[b]) for a, b in true_pairs])


@pytest.fixture(scope="module")
def analysed(planted_run, ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every phase run once (nothing applied) on a copy of the run; the tests below resume from it."""
    root = tmp_path_factory.mktemp("analysed")
    run = root / "run"
    shutil.copytree(planted_run["run"], run)
    report = run_dedup(str(run), work_dir=str(root / "work"), config=CONFIG, apply=False)
    return {"run": run, "work": root / "work", "report": report, "before": items_by_id(run)}


CONFIG = {"partitions": 2}
LATER = ("edges", "components", "duplicates")


def copy_work(analysed: dict, to: Path, forget: tuple[str, ...]) -> Path:
    """The analysed work directory as if the job had crashed before the phases in ``forget``."""
    shutil.copytree(analysed["work"], to)
    for phase in forget:
        (to / "_done" / f"{phase}.json").unlink()
    return to


def drops(work: Path) -> set[tuple[int, int, str, int]]:
    t = pq.read_table(work / "duplicates")
    cols = [t[c].to_pylist() for c in ("node", "root", "root_id", "method")]
    return set(zip(*cols, strict=True))


def test_dedup_resumes_at_a_phase_and_refuses_another_config(analysed, tmp_path: Path) -> None:
    work = copy_work(analysed, tmp_path / "work", ("components", "duplicates"))
    shutil.rmtree(work / "duplicates")
    (work / "components" / "part-9.parquet").write_bytes(b"half-written garbage")  # the crash's leftovers
    report = run_dedup(str(analysed["run"]), work_dir=str(work), config=CONFIG, apply=False)
    assert all(report["phases"][p].get("resumed") for p in ("features", "candidates", "edges"))
    assert not any(report["phases"][p].get("resumed") for p in ("components", "duplicates"))
    assert drops(work) == drops(analysed["work"]) and report["duplicates"] == analysed["report"]["duplicates"] > 0
    with pytest.raises(RuntimeError, match="another config"):
        run_dedup(str(analysed["run"]), work_dir=str(work), config={**CONFIG, "minhash": {"threshold": 0.7}})


def test_distributed_paths_match_the_local_ones(analysed, tmp_path: Path) -> None:
    """Verification, connected components (star contraction) and the kept-id join as shuffles,
    forced with ``local_graph_max: 0``, drop exactly what their in-driver forms drop."""
    work = copy_work(analysed, tmp_path / "work", LATER)
    config = {**CONFIG, "local_graph_max": 0}
    report = run_dedup(str(analysed["run"]), work_dir=str(work), config=config, apply=False)
    assert report["phases"]["edges"]["verify"] == "distributed"
    assert report["phases"]["components"]["mode"] == "distributed"
    assert report["phases"]["duplicates"]["mode"] == "distributed"
    assert drops(work) == drops(analysed["work"]), report["phases"]
    print(report["phases"])


def test_shard_set_gets_a_filtered_copy(planted_run, ray_local, tmp_path: Path) -> None:
    shards = planted_run["run"] / "shards"
    out = tmp_path / "filtered"
    config = {**CONFIG, "phash": False, "chromaprint": False}
    report = run_dedup(str(shards), work_dir=str(tmp_path / "work"), out=str(out), config=config)
    manifest = read_shardset_manifest(str(out / "shards"))
    rejects = pq.read_table(out / "rejects" / "dedup.parquet").to_pylist()
    assert manifest["totals"]["samples"] + len(rejects) == report["samples"] == planted_run["items"]
    assert len(rejects) == report["duplicates"] > 0
    kept_ids = {s["id"] for tar in sorted((out / "shards").glob("*.tar")) for s in iter_samples(str(tar))}
    assert not kept_ids & {r["id"] for r in rejects}
    assert {r["reason"] for r in rejects} == {"exact duplicate", "near-duplicate"}


def test_dedup_finds_planted_duplicates_and_the_run_still_balances(analysed, corpus, capsys) -> None:
    """Applies the analysed job to its run (last: it rewrites the run's shards)."""
    run, before = analysed["run"], analysed["before"]
    # a crash in the apply phase: one unit rewritten and committed, its old shards still on disk
    inputs = resolve(str(run))
    drops_by_shard = drops_by_shard_of(pq.read_table(analysed["work"] / "duplicates"))
    shard = inputs.shards[min(drops_by_shard)]
    unit_shards = [s for s in inputs.shards if s.unit == shard.unit]
    job_id = f"dd{DedupConfig.from_dict(CONFIG).config_hash()[:8]}"
    drops = {s.index: drops_by_shard[s.index] for s in unit_shards if s.index in drops_by_shard}
    assert apply_unit(str(run), shard.unit, unit_shards, drops, job_id)["dropped"] > 0
    assert (run / "shards" / shard.name).exists()  # replaced but not yet removed: unowned
    assert audit(str(run)).balanced  # the markers never disagree with the shards they list

    report = run_dedup(str(run), work_dir=str(analysed["work"]), config=CONFIG)
    assert report["samples"] == len(before)
    assert all(report["phases"][p].get("resumed") for p in ("features", "candidates", *LATER))
    assert not (run / "shards" / shard.name).exists() and report["applied"]["stale_files_removed"] >= 1
    assert report["applied"]["units_already_applied"] == 1

    # every drop is in the ledger with the kept id; ingested = written + rejected still holds
    audit_report = audit(str(run))
    assert audit_report.balanced, audit_report.summary()
    ledger = RunDir(str(run)).read_ledger().to_pylist()
    assert len(ledger) == report["duplicates"] == report["applied"]["dropped"] > 0
    assert {r["stage"] for r in ledger} == {"dedup"}
    assert {r["reason"] for r in ledger} == {"exact duplicate", "near-duplicate"}
    after = items_by_id(run)
    dropped = {r["id"] for r in ledger}
    assert set(after) | dropped == set(before) and not set(after) & dropped
    for r in ledger:
        detail = json.loads(r["detail"])
        assert detail["kept"] in after and detail["method"] in METHODS and 0 < detail["score"] <= 1

    # running it again changes nothing
    again = run_dedup(str(run), work_dir=str(analysed["work"]), config=CONFIG)
    assert again.get("resumed") and again["duplicates"] == report["duplicates"] and items_by_id(run) == after

    roots = predicted_roots(before, ledger)

    # text: exact Jaccard >= 0.8 is a duplicate
    text_truth = [(f"text:{a}", f"text:{b}") for a, b in corpus.true_pairs(0.8)]
    text = scores_for("text:", roots, text_truth)
    order = sorted((k for k in roots if k.startswith("text:")), key=lambda k: int(k.split(":")[1]))
    levels = level_recall(corpus, [int(roots[k].split(":")[1]) for k in order])

    # images: the original, JPEG q30, PNG and half-size copies of a photograph are duplicates
    image_truth = [
        (f"image:{p}:{a}", f"image:{p}:{b}")
        for p in range(N_PHOTOS)
        for i, a in enumerate(IMAGE_DUPLICATES)
        for b in IMAGE_DUPLICATES[i + 1 :]
    ]
    images = scores_for("image:", roots, image_truth)

    # audio: a prompt and its mp3, ogg and flac re-encodings are duplicates
    encodings = ("wav", "mp3", "ogg", "flac")
    audio_truth = [
        (f"audio:{p}:{a}", f"audio:{p}:{b}")
        for p in range(N_PROMPTS)
        for i, a in enumerate(encodings)
        for b in encodings[i + 1 :]
    ]
    audio = scores_for("audio:", roots, audio_truth)

    with capsys.disabled():
        print(f"\ndedup text  (J>=0.8, {text.true_pairs} true pairs): {text}")
        print(f"dedup text recall by planted Jaccard level: {levels}")
        print(f"dedup image (re-encoded/resized): {images}")
        print(f"dedup audio (mp3/ogg/flac re-encodes): {audio}")

    assert text.pair_recall >= 0.95 and text.pair_precision >= 0.99
    assert text.drop_recall >= 0.95 and text.drop_precision >= 0.99
    assert levels[0.8] >= 0.95 and levels[0.5] == 0.0 and levels[0.3] == 0.0
    assert images.pair_recall == 1.0 and images.pair_precision == 1.0
    assert audio.pair_recall >= 0.95 and audio.pair_precision == 1.0
