"""Stage 0.1: the audio tokenizer trains on real speech (the packaged asterisk prompts) with the tiny config.

One module-scoped run trains it for a few dozen AdamW steps on CPU; the tests read its history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipelines.demo_data import asterisk_prompts
from synth.media import decode_audio
from trainer.audio_mel import LogMel
from trainer.audio_tokenizer_train import build_audio_tokenizer
from trainer.media import MediaProcessor, frames_after_encoder
from trainer.model import AudioTokenizer, ResidualVQ, build_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
K = 8  # steps averaged at the start and at the end
TASK_ARGS = {
    "ema_decay": 0.8,  # a short EMA window: the test trains for 60 steps, not 60k
    "replace_steps": 10,
    "semantic_weight": 1.0,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg() -> dict[str, Any]:
    return yaml.safe_load((REPO / "conf" / "models" / "tiny.yaml").read_text())


def speech_clips(n: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``n`` short prompts (1.2-3 s) as (16 kHz wave, 24 kHz wave, transcript), cut to whole 10 ms frames."""
    out = []
    for wav, text in asterisk_prompts():
        data = wav.read_bytes()
        w16 = decode_audio(data, 16_000)
        if not 1.2 * 16_000 <= len(w16) <= 3.0 * 16_000:
            continue
        w24 = decode_audio(data, 24_000)
        frames = min(len(w16) // 160, len(w24) // 240)
        out.append((w16[: frames * 160], w24[: frames * 240], text))
        if len(out) == n:
            return out
    raise AssertionError(f"only {len(out)} short prompts")


def make_batch(clips: list, media: MediaProcessor, logmel: LogMel) -> dict[str, Any]:
    """The batch of trainer/audio_data.py's contract, built by hand."""
    whisper = [torch.from_numpy(media.waveform_clip(w16).mels[0]) for w16, _, _ in clips]
    target = [logmel(torch.from_numpy(w24)) for _, w24, _ in clips]
    lengths = torch.tensor([min(a.shape[-1], b.shape[-1]) for a, b in zip(whisper, target, strict=True)])
    t = int(lengths.max())
    b = len(clips)
    wm = torch.zeros(b, whisper[0].shape[0], t)
    tm = torch.full((b, 80, t), float(np.log(1e-5)))
    waves = torch.zeros(b, max(len(w) for _, w, _ in clips))
    for i, (a, m) in enumerate(zip(whisper, target, strict=True)):
        wm[i, :, : lengths[i]] = a[:, : lengths[i]]
        tm[i, :, : lengths[i]] = m[:, : lengths[i]]
        waves[i, : len(clips[i][1])] = torch.from_numpy(clips[i][1])
    return {
        "whisper_mel": wm,
        "target_mel": tm,
        "mel_len": lengths,
        "wave": waves,
        "wave_len": torch.tensor([len(w) for _, w, _ in clips]),
        "text": [c[2] for c in clips],
        "meta": {},
    }


def codebook_usage(tokenizer: AudioTokenizer, batch: dict[str, Any]) -> list[tuple[float, float]]:
    """Per layer: (share of codes used, perplexity / codebook size) of the inference codes of ``batch``."""
    codes, frames = tokenizer.tokenize(batch["whisper_mel"], batch["mel_len"])
    valid = torch.arange(codes.shape[1])[None, :] < frames[:, None]
    out = []
    for i, layer in enumerate(tokenizer.quantizer.layers):
        c = codes[..., i][valid]
        prob = torch.bincount(c, minlength=layer.size).float() / c.numel()
        ppl = float(torch.exp(-(prob * prob.clamp(min=1e-10).log()).sum()))
        out.append((c.unique().numel() / layer.size, ppl / layer.size))
    return out


def tiny_language_model(texts: list[str], tokenizer_dir: str, out: Path) -> Path:
    """A tiny Qwen2 that has learned the transcripts (so it is a language model, not noise), saved with its
    tokenizer: the frozen LLM of the semantic objective."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=-(-len(tok) // 64) * 64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    )
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.eos_token_id)
    mask = torch.zeros(len(enc), width, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(60):
        loss = lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lm.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    cfg = tiny_cfg()
    media, logmel = MediaProcessor.from_model_config(cfg), LogMel()
    clips = speech_clips(16)
    return {
        "cfg": cfg,
        "train": make_batch(clips[:8], media, logmel),
        "held": make_batch(clips[8:], media, logmel),
        "texts": [c[2] for c in clips],
    }


@pytest.fixture(scope="module")
def trained(data: dict[str, Any], text_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny tokenizer trained for STEPS AdamW steps on 8 prompts; per-step metrics and usage before/after."""
    lm_dir = tiny_language_model(data["texts"], text_tokenizer_dir, tmp_path_factory.mktemp("semantic_lm"))
    torch.manual_seed(0)
    module = build_audio_tokenizer(data["cfg"], {**TASK_ARGS, "semantic_llm": {"path": str(lm_dir)}}, None)
    before = codebook_usage(module.tokenizer, data["held"])
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    history: list[dict[str, float]] = []
    for _ in range(STEPS):
        out = module(**data["train"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in out["metrics"].items()} | {"loss": float(out["loss"].detach())})
    module.eval()
    return {
        "module": module,
        "history": history,
        "before": before,
        "after": codebook_usage(module.tokenizer, data["held"]),
    }


def first_last(history: list[dict[str, float]], key: str) -> tuple[float, float]:
    return float(np.mean([h[key] for h in history[:K]])), float(np.mean([h[key] for h in history[-K:]]))


def test_reconstruction_and_commitment_fall_and_every_codebook_fills(trained: dict) -> None:
    h = trained["history"]
    recon0, recon1 = first_last(h, "recon")
    commit0, commit1 = first_last(h, "commit")
    loss0, loss1 = first_last(h, "loss")
    assert recon1 < 0.5 * recon0, (recon0, recon1)
    assert commit1 < 0.9 * commit0, (commit0, commit1)
    assert loss1 < 0.3 * loss0, (loss0, loss1)
    # every RVQ layer's share of codes hit by a training batch grows (EMA + dead-code restart), and dead
    # codes did restart
    for i in range(8):
        used0, used1 = first_last(h, f"usage_l{i}")
        assert used1 > used0 and used1 > 0.8, (i, used0, used1)
    assert sum(s["restarted_l0"] for s in h) > 0
    # held-out clips: no layer uses fewer codes than at random init; the big first codebooks use far more
    before, after = trained["before"], trained["after"]
    assert all(a[0] >= b[0] for a, b in zip(after, before, strict=True)), (before, after)
    assert after[0][0] > 2 * before[0][0] and after[1][0] > before[1][0], (before, after)
    assert after[0][1] > 2 * before[0][1], (before, after)  # and more evenly (perplexity / size)
    # progressive replacement: the VQ share ramps from 10% to 100% over replace_steps
    assert h[0]["replace_p"] == pytest.approx(0.1) and h[-1]["replace_p"] == pytest.approx(1.0)
    assert int(trained["module"].step) == STEPS


def test_semantic_objective_falls_through_the_quantiser(trained: dict) -> None:
    sem0, sem1 = first_last(trained["history"], "semantic")
    assert sem1 < 0.5 * sem0, (sem0, sem1)
    module = trained["module"]
    assert not any(p.requires_grad for p in module.semantic_llm.parameters())
    assert module.semantic_adapter.weight.requires_grad


def test_tokenize_decoder_states_and_export_into_the_omni_model(
    trained: dict, data: dict[str, Any], text_tokenizer_dir: str
) -> None:
    from trainer.tokenizer import load_tokenizer

    tok: AudioTokenizer = trained["module"].tokenizer
    batch = data["held"]
    ema = [layer.cluster_size.clone() for layer in tok.quantizer.layers]
    codes, frames = tok.tokenize(batch["whisper_mel"], batch["mel_len"])
    tok.train()
    again, _ = tok.tokenize(batch["whisper_mel"], batch["mel_len"])  # train mode: same codes, no EMA step
    tok.eval()
    assert torch.equal(codes, again)
    assert all(torch.equal(a, layer.cluster_size) for a, layer in zip(ema, tok.quantizer.layers, strict=True))
    assert codes.shape == (8, int(frames.max()), 8) and codes.dtype == torch.long
    assert frames.tolist() == [frames_after_encoder(int(n), 4) for n in batch["mel_len"]]
    hidden, refined = tok.decoder_states(codes)
    assert hidden.shape == (8, 8 * codes.shape[1], 32) and refined.shape == (8, 80, 8 * codes.shape[1])
    # the batched path gives each clip the codes of the inference path (what OmniModel calls)
    mels = [batch["whisper_mel"][i, :, : int(n)] for i, n in enumerate(batch["mel_len"])]
    alone = tok(mels)
    for i, c in enumerate(alone):
        assert torch.equal(codes[i, : int(frames[i])], c)
    longest = int(frames.argmax())
    assert torch.allclose(tok.decode_mel(alone[longest]), refined[longest], atol=1e-4)

    # the export (keys tokenizer.*) loads strictly into the omni model's frozen tokenizer
    state = trained["module"].state_dict()
    own = {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    model = build_model(data["cfg"], load_tokenizer(text_tokenizer_dir))
    model.audio_tokenizer.load_state_dict(own, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.audio_tokenizer(mels), alone, strict=True))


def test_release_decoder_layout_trains_in_stage_0_1(data: dict[str, Any]) -> None:
    """``audio.decoder.layout: release`` (the released reconstruction decoder, trainer/model.py): stage 0.1
    drives it as it drives ours, and a few steps lower its reconstruction loss; padded clips decode as alone."""
    cfg = tiny_cfg()
    cfg["audio"]["decoder"]["layout"] = "release"
    torch.manual_seed(0)
    module = build_audio_tokenizer(cfg, {**TASK_ARGS, "semantic_llm": None}, None)
    assert hasattr(module.tokenizer.decoder, "dconv1") and hasattr(module.tokenizer.decoder, "post_net")
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-2)
    module.train()
    recon = []
    for _ in range(20):
        out = module(**data["train"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        recon.append(float(out["metrics"]["recon"]))
    assert np.mean(recon[-3:]) < 0.7 * np.mean(recon[:3]), recon
    tok = module.eval().tokenizer
    codes, frames = tok.tokenize(data["held"]["whisper_mel"], data["held"]["mel_len"])
    hidden, refined = tok.decoder_states(codes, frames)
    i = int(frames.argmin())
    n = int(frames[i])
    alone_h, alone = tok.decoder_states(codes[i : i + 1, :n])
    assert torch.allclose(hidden[i, : 8 * n], alone_h[0], atol=1e-4)
    assert torch.allclose(refined[i, :, : 8 * n], alone[0], atol=1e-4)


def test_ema_restart_revives_a_collapsed_codebook() -> None:
    """A codebook whose codes all sit on one far point: EMA + dead-code restart spread it over the data."""
    torch.manual_seed(0)
    centres = torch.randn(32, 16) * 3
    rvq = ResidualVQ([32, 8], 16)
    rvq.configure(decay=0.8, dead_threshold=1.0)
    for layer in rvq.layers:  # "trained" state (no k-means init), collapsed onto one point
        layer.embed.data.fill_(10.0)
        layer.cluster_size.data.fill_(5.0)
        layer.embed_avg.data.copy_(layer.embed.data * 5.0)
    rvq.train()
    usage = []
    for _ in range(12):
        x = centres[torch.randint(0, 32, (512,))] + 0.1 * torch.randn(512, 16)
        usage.append(rvq.quantize(x).usage)
    assert usage[0][0] == 1 / 32
    assert usage[-1][0] > 0.9 and usage[-1][1] >= 0.75, usage
    rvq.eval()
    frozen = [layer.embed.clone() for layer in rvq.layers]
    rvq.quantize(x)
    assert all(torch.equal(a, layer.embed) for a, layer in zip(frozen, rvq.layers, strict=True))


def test_straight_through_layer_dropout_and_kmeans_init() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ([16, 8, 8], 4).train()
    x = torch.randn(64, 4, requires_grad=True)
    active = torch.tensor([1, 3]).repeat_interleave(32)
    out = rvq.quantize(x, active=active)
    assert all(layer.initialised for layer in rvq.layers)  # k-means from the first batch
    assert out.usage[0] > 0.8
    # EMA updated the codebooks after assignment: compare against the codes' vectors before the update
    out2 = ResidualVQ([16, 8, 8], 4).eval()
    out2.load_state_dict(rvq.state_dict())
    eval_out = out2.quantize(x.detach(), active=active)
    q = [torch.nn.functional.embedding(eval_out.codes[:, i], layer.embed) for i, layer in enumerate(out2.layers)]
    assert torch.allclose(eval_out.quantized[:32], q[0][:32], atol=1e-6)  # one layer kept
    assert torch.allclose(eval_out.quantized[32:], (q[0] + q[1] + q[2])[32:], atol=1e-6)  # all three
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    keep = rvq.sample_active(1000, 0.5)
    assert keep.min() == 1 and keep.max() == 3 and 0.55 < float((keep == 3).float().mean()) < 0.8


def test_encoder_from_a_saved_whisper_and_semantic_llm_from_config(
    data: dict[str, Any], text_tokenizer_dir: str, tmp_path: Path
) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    enc = data["cfg"]["audio"]["encoder"]
    torch.manual_seed(1)
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            vocab_size=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            decoder_start_token_id=3,
            begin_suppress_tokens=None,
            suppress_tokens=None,
            d_model=enc["d_model"],
            encoder_layers=enc["encoder_layers"],
            encoder_attention_heads=enc["encoder_attention_heads"],
            encoder_ffn_dim=enc["encoder_ffn_dim"],
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            num_mel_bins=128,
            max_source_positions=1500,
            max_target_positions=32,
        )
    )
    whisper.save_pretrained(str(tmp_path / "whisper"))
    args = {
        "encoder_from": str(tmp_path / "whisper"),
        "semantic_llm": {
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
            },
            "tokenizer": text_tokenizer_dir,
        },
    }
    module = build_audio_tokenizer(data["cfg"], args, tmp_path)
    src = whisper.model.encoder.state_dict()
    got = module.tokenizer.encoder.state_dict()
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    out = module.eval()(**data["held"])
    assert set(out["metrics"]) >= {"recon", "commit", "semantic", "replace_p", "usage_l0", "usage_l7"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # the semantic loss alone reaches the encoder through the straight-through quantiser; the LLM stays frozen
    module.args.update(recon_weight=0.0, commit_weight=0.0)
    module.train()(**data["held"])["loss"].backward()
    assert float(module.tokenizer.encoder.conv1.weight.grad.abs().sum()) > 0
    assert float(module.semantic_adapter.weight.grad.abs().sum()) > 0
    assert module.tokenizer.decoder.to_mel.weight.grad is None or not module.tokenizer.decoder.to_mel.weight.grad.any()
    assert all(p.grad is None for p in module.semantic_llm.parameters())

    wide = tiny_cfg()
    wide["audio"]["encoder"]["d_model"] = 48
    with pytest.raises(ValueError, match="does not fit the model config"):
        build_audio_tokenizer(wide, {"encoder_from": str(tmp_path / "whisper")}, tmp_path)


def _two_rank_ema(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial codebooks on both ranks, as the training loop seeds them
    rvq = ResidualVQ([32, 8], 16).train()
    rvq.configure(decay=0.8)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(4):
        rvq.quantize(torch.randn(96, 16, generator=gen) * (1 + rank))
    torch.save(rvq.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ema_codebooks_stay_identical_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks with different batches: summed EMA statistics and rank 0's k-means seeds and restart
    vectors keep every rank's codebooks bit-identical (nothing else synchronises them). Forked ranks reuse
    this process's imports (spawned ones would spend ~20 s importing)."""
    import torch.multiprocessing as mp

    mp.start_processes(_two_rank_ema, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["layers.0.cluster_size"].sum()) > 96 * 1.5  # counts summed over both ranks' rows
