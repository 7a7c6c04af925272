"""The trainer's parts without DeepSpeed: the model (tiny and paper-sized on meta), tokenizer, sequences
and loss masks per data type, the shard loader's split and exact resume, stage configs, the CLI."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.demo_data import MULTILINGUAL, PHOTOS, photo_bytes
from shards.manifest import write_shardset_manifest
from shards.reader import iter_samples
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter
from trainer.data import (
    DataPosition,
    EntryStream,
    MixtureEntry,
    collate,
    corpus_texts,
    make_loader,
    resolve_entry,
    to_device,
)
from trainer.media import MediaProcessor, audio_frame_count
from trainer.model import TAGS, AudioTokenizer, build_model, parameter_groups
from trainer.sample_data import write_extra_kinds
from trainer.sequence import IGNORE, SkipSample, build_example, spoken_words
from trainer.stages import StageError, apply_override, load_model_config, load_stage, param_groups, set_trainable
from trainer.tokenizer import MODALITY_TOKENS, load_tokenizer, special_ids, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("trainer_units")
    extra = write_extra_kinds(root / "extra")
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
    mixed = write_shardset_manifest(str(root / "mixed"), ShardWriter(str(root / "mixed"), "m", 5).write_all(rows))
    manifests = [mixed, extra]
    tok_dir = root / "tokenizer"
    train_tiny_tokenizer(corpus_texts(manifests), tok_dir, 600)
    cfg = load_model_config("tiny")
    return {
        "manifests": manifests,
        "tokenizer": str(tok_dir),
        "cfg": cfg,
        "media": MediaProcessor.from_model_config(cfg),
    }


def samples_of(manifest: str) -> list[dict]:
    from shards.manifest import shard_urls

    return [s for url in shard_urls(manifest) for s in iter_samples(url)]


def test_baichuan_omni_builds_on_meta_with_about_10_9b_parameters() -> None:
    model = build_model(load_model_config("baichuan-omni-1.5"), device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert abs(total - 10.9e9) / 10.9e9 < 0.05, f"{total / 1e9:.3f}B"
    groups = parameter_groups(model)
    assert sum(groups.values()) == total, "every parameter belongs to a freezable group"
    assert 7.5e9 < groups["llm"] + groups["lm_head"] < 7.7e9  # Qwen2.5-7B
    assert 1.4e9 < groups["audio_head"] < 1.5e9  # 3 depth layers with per-codebook FFNs + 8 classifiers
    assert 0.6e9 < groups["vit"] < 0.7e9


def test_tiny_tokenizer_keeps_every_modality_token_whole(corpus) -> None:
    tok = load_tokenizer(corpus["tokenizer"])
    for t in MODALITY_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = "The quick brown fox 敏捷的棕色狐狸"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    with pytest.raises(FileNotFoundError):
        load_tokenizer(Path(corpus["tokenizer"]).parent / "nowhere")


def _example(corpus, kind: str, fmt: str | None = None):
    tok = load_tokenizer(corpus["tokenizer"])
    sp = special_ids(tok)
    sample = next(s for m in corpus["manifests"] for s in samples_of(m) if s["kind"] == kind)
    return build_example(sample, fmt, tok, sp, corpus["media"]), sample, tok, sp


def _trainable_text(ex, tok) -> str:
    return tok.decode([i for i, lab in zip(ex.ids, ex.labels, strict=True) if lab != IGNORE and i >= 0])


def test_sequences_follow_the_loss_rules_of_each_data_type(corpus) -> None:
    tts, sample, tok, sp = _example(corpus, "tts")
    assert [a.generate for a in tts.audios] == [True]
    assert tts.ids.count(sp.audio_pad) == tts.audios[0].frames > 0
    assert _trainable_text(tts, tok).strip() == "<audiogen_end_baichuan>", "TTS learns the audio, not its text"

    intlv, sample, _, _ = _example(corpus, "speech_text_interleaved")
    texts = [s["text"] for s in sample["segments"] if s["modality"] == "text"]
    assert [a.generate for a in intlv.audios] == [False, False]
    assert all(t in _trainable_text(intlv, tok) for t in texts), "INTLV learns every text segment"
    itts, _, _, _ = _example(corpus, "speech_text_interleaved", "itts")
    spoken = [spoken_words(s) for s in sample["segments"] if s["modality"] == "audio"]
    assert all(spoken) and [a.generate for a in itts.audios] == [True, True]
    learned = []
    for words, (start, _, kind, _) in zip(spoken, [s for s in itts.spans if s[2] == "audio"], strict=True):
        before = tok.encode(words, add_special_tokens=False)
        assert kind == "audio" and itts.ids[start] == sp.audiogen_start
        assert itts.ids[start - len(before) : start] == before, "ITTS: each speech clip follows its own words"
        learned.append(any(lab != IGNORE for lab in itts.labels[start - len(before) : start]))
    assert learned == [False, True], "ITTS: loss on all text but the first"
    assert texts[0] in _trainable_text(itts, tok)

    iat, sample, _, _ = _example(corpus, "image_audio_text")
    assert len(iat.images) == 1 and iat.ids.count(sp.img_pad) == iat.images[0].tokens
    assert [a.generate for a in iat.audios] == [False]
    assert _trainable_text(iat, tok).startswith(sample["segments"][2]["text"]), "only the remaining text is learned"

    vat, _, _, _ = _example(corpus, "video_audio_text")
    assert len(vat.images) >= 2 and len(vat.audios) == 1, "frames at 1 fps plus the video's own audio track"
    assert vat.ids.count(sp.video_start) == 1 and vat.ids.count(sp.img_pad) == sum(i.tokens for i in vat.images)
    assert all(lab == IGNORE for i, lab in zip(vat.ids, vat.labels, strict=True) if i == sp.img_pad)

    cap, _, _, _ = _example(corpus, "image_caption")
    assert cap.tag == TAGS.index("image") and cap.labels[0] == IGNORE


def test_truncation_never_cuts_a_media_span(corpus) -> None:
    vat, _, _, sp = _example(corpus, "video_audio_text")
    inner = next(s for s in vat.spans if s[2] == "image")
    cut = vat.truncated(inner[0] + 2)
    assert len(cut) <= inner[0] + 2 and not cut.images and sp.video_start not in cut.ids[inner[0] - 1 :]
    assert vat.truncated(len(vat)) is vat


def test_a_sample_without_anything_to_learn_is_skipped(corpus) -> None:
    tok = load_tokenizer(corpus["tokenizer"])
    image_only = make_sample("t", "image", [Segment("image", bytes=photo_bytes("coins", size=(64, 64)))], "x")
    with pytest.raises(SkipSample, match="no training format"):
        build_example(image_only, None, tok, special_ids(tok), corpus["media"])
    broken = make_sample("t", "asr", [Segment("audio", bytes=b"RIFF0000WAVEjunk"), Segment("text", text="hi")], "y")
    with pytest.raises(SkipSample):
        build_example(broken, None, tok, special_ids(tok), corpus["media"])


def test_streams_split_shards_without_overlap(corpus) -> None:
    entry = resolve_entry({"name": "mixed", "manifest": corpus["manifests"][0]})
    assert len(entry.shards) == 4 and entry.samples == 20
    for streams in (2, 4):  # 2 ranks x 1 worker, 2 ranks x 2 workers
        seen = []
        for s in range(streams):
            stream = EntryStream(entry, seed=5, index=0, stream=s, streams=streams)
            shards = {stream._shard(k) for k in range(s, len(entry.shards), streams)}
            n = sum(len(list(iter_samples(u))) for u in shards)
            seen.append([stream.next_sample()["id"] for _ in range(n)])
        ids = [i for ids in seen for i in ids]
        assert len(ids) == len(set(ids)) == 20, "one epoch: every sample once, on exactly one stream"


def test_a_truncated_shard_is_skipped_not_fatal(corpus, tmp_path: Path) -> None:
    from shards.manifest import shard_urls

    good = max(shard_urls(corpus["manifests"][0]), key=lambda u: Path(u).stat().st_size)
    data = Path(good).read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) // 2 + 7])  # cut inside a member, as a crashed copy would
    stream = EntryStream(MixtureEntry("t", [str(bad), good], 1.0), seed=0, index=0, stream=0, streams=1)
    ids, reasons = [], []
    for _ in range(12):
        try:
            ids.append(stream.next_sample()["id"])
        except SkipSample as e:
            reasons.append(str(e))
    assert reasons and all(r.startswith(("unreadable shard", "undecodable sample")) for r in reasons)
    assert {s["id"] for s in iter_samples(good)} <= set(ids)


def _take(loader, n: int, position: DataPosition) -> list:
    out = []
    for batch in loader:
        position.consumed(batch["meta"])
        out.append((batch["meta"]["sample_ids"], copy.deepcopy(position.as_dict())))
        if len(out) == n:
            return out
    raise AssertionError("loader ended")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_at_exactly_the_next_samples(corpus, workers: int) -> None:
    specs = [
        {"name": "text", "manifests": corpus["manifests"], "kinds": ["text"], "weight": 1},
        {"name": "caption", "manifests": corpus["manifests"], "kinds": ["image_caption"], "weight": 1},
        {"name": "speech", "manifests": corpus["manifests"], "kinds": ["tts", "speech_text_interleaved"], "weight": 1},
    ]
    entries = [resolve_entry(s) for s in specs]

    def loader(state=None):
        return make_loader(entries, corpus["cfg"], corpus["tokenizer"], 160, 2, 9, 1, 2, workers, state)

    full = _take(loader(), 7, DataPosition(2, workers))
    for resume_at in (2, 3):  # after an even and an odd number of micro-batches (worker rotation)
        state = full[resume_at - 1][1]
        rest = _take(loader(state), 7 - resume_at, DataPosition.from_dict(state))
        assert [ids for ids, _ in rest] == [ids for ids, _ in full[resume_at:]]
    with pytest.raises(ValueError, match="same"):
        make_loader(entries, corpus["cfg"], corpus["tokenizer"], 160, 2, 9, 0, 4, workers, full[0][1])


def test_tiny_model_learns_from_a_real_batch_through_every_part(corpus) -> None:
    tok = load_tokenizer(corpus["tokenizer"])
    specs = [
        {"name": k, "manifests": corpus["manifests"], "kinds": [k], "weight": 1}
        for k in ("image_caption", "tts", "video_audio_text")
    ]
    entries = [resolve_entry(s) for s in specs]
    batch = next(iter(make_loader(entries, corpus["cfg"], corpus["tokenizer"], 400, 2, 3, 0, 1, 0)))
    assert {"pixel_values", "audio_mels", "audio_generate"} <= batch.keys()
    torch.manual_seed(0)
    model = build_model(corpus["cfg"], tok)
    set_trainable(model, ["projector", "llm", "lm_head", "audio_embed", "audio_head"])
    out = model(**to_device(batch, "cpu"))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["tag_count"][TAGS.index("audio_gen")] > 0
    for name in ("model.visual_bridge_model", "model.layers", "lm_head", "model.audio_embed_layers", "audio_head"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in model.audio_tokenizer.parameters())
    assert all(p.grad is None for p in model.model.visual_model.parameters())

    text_only = collate([{**_text_pack(tok), "state": {"worker": 0}}])
    model.zero_grad()
    out = model(**to_device(text_only, "cpu"))
    out["loss"].backward()  # the zero-weighted dummy inputs keep every trainable part in the graph
    head = [p.grad for p in model.audio_head.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in head)


def _text_pack(tok) -> dict:
    import numpy as np

    ids = tok.encode("A cup of coffee on a saucer.", add_special_tokens=False)
    n = len(ids)
    return {
        "input_ids": np.array(ids),
        "labels": np.array([IGNORE] + ids[1:]),
        "position_ids": np.arange(n),
        "loss_tags": np.zeros(n, dtype=np.int64),
        "images": [],
        "audios": [],
        "sample_ids": ["x"],
        "tokens": n,
    }


def test_audio_tokenizer_batches_like_one_by_one_and_counts_frames_like_the_loader(corpus) -> None:
    torch.manual_seed(0)
    tokenizer = AudioTokenizer(corpus["cfg"]["audio"]).eval()
    wave = torch.randn(16000 * 33).numpy()  # two chunks: 30 s + 3 s
    clip = corpus["media"].waveform_clip(wave)
    short = corpus["media"].waveform_clip(wave[:5000])
    mels = [torch.from_numpy(m) for m in clip.mels + short.mels]
    together = tokenizer(mels)
    alone = [tokenizer([m])[0] for m in mels]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
    assert sum(c.shape[0] for c in together[:2]) == clip.frames == audio_frame_count(len(wave), corpus["media"].audio)
    assert together[0].shape[1] == 8
    mel = tokenizer.decode_mel(together[2])
    assert mel.shape == (80, 8 * together[2].shape[0])


def test_stage_configs_freeze_by_name_and_reject_mistakes(corpus, tmp_path: Path) -> None:
    stage = load_stage(REPO / "conf" / "stages" / "1.2-image-text.yaml", ["model=tiny", "budget.steps=3"])
    assert stage.budget == {"tokens": 280e9, "steps": 3.0} and stage.init_from == "1.2".replace("2", "1")
    model = build_model(corpus["cfg"], load_tokenizer(corpus["tokenizer"]))
    counts = set_trainable(model, stage.trainable)
    assert set(counts) == set(stage.trainable)
    assert not any(p.requires_grad for p in model.audio_head.parameters())
    groups = {g["name"]: g for g in param_groups(model, stage.lr, 0.1)}
    assert groups["model.visual_model"]["lr"] == 1e-6 and groups["default"]["lr"] == 1e-5
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(StageError, match="match no parameters"):
        set_trainable(model, ["model.vision_tower"])
    with pytest.raises(StageError, match="always frozen"):
        set_trainable(model, ["audio_tokenizer"])
    doc: dict = {}
    apply_override(doc, "init_from=null")
    apply_override(doc, "lr.default=3.0e-4")
    apply_override(doc, "trainable=[audio_head, audio_embed]")
    assert doc == {"init_from": None, "lr": {"default": 3e-4}, "trainable": ["audio_head", "audio_embed"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: '9'\nmodel: tiny\n")
    with pytest.raises(StageError, match="missing"):
        load_stage(bad)


def test_cli_reports_bad_arguments_in_one_line(tmp_path: Path) -> None:
    def omni(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, capture_output=True, text=True)

    missing = omni("train", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("omni: error: no such file")
    assert len(missing.stderr.strip().splitlines()) == 1
    stage = str(REPO / "conf" / "stages" / "1.1-image-projector.yaml")
    assert "--nproc must be at least 1" in omni("train", stage, "--nproc", "0").stderr
    assert "not KEY=VALUE" in omni("train", stage, "--set", "budget").stderr
    assert "no stage directory" in omni("train-all", "--stages", str(tmp_path / "none")).stderr
    no_shards = omni("train", stage, "--set", f"mixture=[{{manifest: {tmp_path}, kinds: [image_caption]}}]")
    assert no_shards.returncode == 2 and "no shard-set manifest" in no_shards.stderr
