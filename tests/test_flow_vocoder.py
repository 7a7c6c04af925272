"""Stages 0.2 (flow-matching decoder) and 0.3 (HiFi-GAN vocoder) on real recorded speech, tiny configs, CPU.

The batch is built here as the audio loader builds it (whisper_mel, target_mel, mel_len, wave, wave_len)
from the packaged Asterisk prompts, decoded to 16 kHz (Whisper features) and 24 kHz (target mel, wave).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.demo_data import asterisk_prompts
from synth.media import decode_audio
from trainer.audio_mel import HOP, LogMel
from trainer.flow_decoder import FlowDecoder, build_flow_decoder, flow_config, length_mask, tokenizer_condition
from trainer.media import MediaProcessor
from trainer.vocoder import HifiGanGenerator, build_vocoder, load_generator_state

ROOT = Path(__file__).resolve().parents[1]
CLIPS = 3
SECONDS = (2.0, 1.6, 1.2)  # first seconds of each prompt: a padded batch
PAD_MEL = float(np.log(1e-5))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one intra-op thread is many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_cfg() -> dict:
    return yaml.safe_load((ROOT / "conf/models/tiny.yaml").read_text())


@pytest.fixture(scope="module")
def speech_batch(model_cfg: dict) -> dict:
    """Three real prompts (their first 2.0, 1.6 and 1.2 s), padded like the loader's batch."""
    prompts = asterisk_prompts(CLIPS)
    assert len(prompts) == CLIPS
    media = MediaProcessor.from_model_config(model_cfg)
    logmel = LogMel()
    whisper, target, waves, texts = [], [], [], []
    for (wav, text), seconds in zip(prompts, SECONDS, strict=True):
        data = wav.read_bytes()
        w16 = decode_audio(data, 16_000)[: int(16_000 * seconds)]
        w24 = decode_audio(data, 24_000)[: int(24_000 * seconds)]
        wm = torch.from_numpy(media.waveform_clip(w16).mels[0])
        tm = logmel(torch.from_numpy(w24))
        n = min(wm.shape[-1], tm.shape[-1])
        whisper.append(wm[:, :n])
        target.append(tm[:, :n])
        waves.append(torch.from_numpy(w24[: n * HOP].copy()))
        texts.append(text)
    lens = torch.tensor([m.shape[-1] for m in whisper])
    t = int(lens.max())
    wlen = torch.tensor([len(w) for w in waves])
    batch = {
        "whisper_mel": torch.zeros(CLIPS, 128, t),
        "target_mel": torch.full((CLIPS, 80, t), PAD_MEL),
        "mel_len": lens,
        "wave": torch.zeros(CLIPS, int(wlen.max())),
        "wave_len": wlen,
        "text": texts,
        "meta": {},
    }
    for i in range(CLIPS):
        n = int(lens[i])
        batch["whisper_mel"][i, :, :n] = whisper[i]
        batch["target_mel"][i, :, :n] = target[i]
        batch["wave"][i, : len(waves[i])] = waves[i]
    assert lens.tolist() == [int(s * 100) for s in SECONDS]  # all three prompts are longer than 2 s
    return batch


def _train(module: torch.nn.Module, batch: dict, steps: int, lr: float, key: str) -> list[float]:
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    seen = []
    for _ in range(steps):
        out = module(**batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        seen.append(float(out["metrics"][key]))
    return seen


# ---------------------------------------------------------------- stage 0.2


def test_flow_decoder_loss_falls(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    from trainer.model import AudioTokenizer

    # a 0.1-style export (keys tokenizer.*) is what the stage loads its frozen tokenizer from
    tok = AudioTokenizer(model_cfg["audio"])
    torch.save({f"tokenizer.{k}": v for k, v in tok.state_dict().items()}, tmp_path / "model.pt")
    module = build_flow_decoder(model_cfg, {"audio_tokenizer_from": str(tmp_path / "model.pt")}, tmp_path)
    for k, v in tok.state_dict().items():
        assert torch.equal(module.tokenizer.state_dict()[k], v)
    assert not any(p.requires_grad for p in module.tokenizer.parameters())

    frozen = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    losses = _train(module, speech_batch, steps=40, lr=5e-3, key="cfm")
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    print(f"cfm loss: first 8 steps {first:.3f}, last 8 steps {last:.3f}")
    assert np.isfinite(losses).all()
    assert last < 0.6 * first
    assert not module.tokenizer.training
    for k, v in module.tokenizer.state_dict().items():  # the tokenizer stays exactly as loaded
        assert torch.equal(v, frozen[k]), k


def test_flow_sample_deterministic_and_guided(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = build_flow_decoder(model_cfg, {"audio_tokenizer_from": None}, tmp_path)
    _train(module, speech_batch, steps=5, lr=2e-3, key="cfm")  # guidance needs cond and uncond to differ
    module.eval()
    lens = speech_batch["mel_len"]
    cond = tokenizer_condition(module.tokenizer, speech_batch["whisper_mel"], lens)
    t = speech_batch["target_mel"].shape[-1]
    assert cond.shape == (CLIPS, model_cfg["audio"]["encoder"]["d_model"], -(-((t + 1) // 2) // 4) * 8)
    cond, mask = cond[..., :t], length_mask(lens, t)

    def run(seed: int, **kw: float) -> torch.Tensor:
        return module.flow.sample(cond, mask, steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    a = run(0)
    assert a.shape == (CLIPS, 80, t) and torch.isfinite(a).all()
    assert torch.equal(a, run(0))
    assert not torch.allclose(a, run(1))
    assert not torch.allclose(a, run(0, guidance=0.0))
    assert not torch.allclose(a, run(0, temperature=0.5))
    short = int(lens.argmin())
    assert a[short, :, int(lens[short]) :].abs().sum() == 0  # padding stays zero


def test_flow_velocity_same_padded_or_alone(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    """Masked convs, attention and GroupNorm: a clip's velocity does not depend on the batch's padding."""
    torch.manual_seed(2)
    module = build_flow_decoder(model_cfg, {}, tmp_path).eval()
    lens, t = speech_batch["mel_len"], speech_batch["target_mel"].shape[-1]
    cond = tokenizer_condition(module.tokenizer, speech_batch["whisper_mel"], lens)[..., :t]
    mask = length_mask(lens, t).float()
    mu = module.flow.cond_proj(cond)
    x = torch.randn(CLIPS, 80, t) * mask
    tt = torch.full((CLIPS,), 0.4)
    with torch.no_grad():
        batched = module.flow.velocity(x, mask, mu * mask, tt, None)
        for i in range(CLIPS):
            n = int(lens[i])
            alone = module.flow.velocity(
                x[i : i + 1, :, :n], mask[i : i + 1, :, :n], mu[i : i + 1, :, :n], tt[:1], None
            )
            assert torch.allclose(batched[i, :, :n], alone[0], atol=1e-4, rtol=1e-4)
            assert batched[i, :, n:].abs().sum() == 0


def test_flow_decoder_from_config_alone(model_cfg: dict) -> None:
    flow = FlowDecoder(flow_config(model_cfg))
    assert flow.cond_proj.in_channels == model_cfg["audio"]["encoder"]["d_model"]
    with pytest.raises(ValueError, match="cond_dim"):
        FlowDecoder(model_cfg["flow"])


def test_flow_prompt_prefix(model_cfg: dict, speech_batch: dict) -> None:
    """CosyVoice's prompt recipe: a prefix of the target is given as prompt and left out of the loss."""
    torch.manual_seed(4)
    flow = FlowDecoder(flow_config(model_cfg, {"prompt_prob": 1.0, "cfg_dropout": 0.0})).train()
    mel, lens = speech_batch["target_mel"], speech_batch["mel_len"]
    cond, mask = torch.randn(CLIPS, flow.cond_proj.in_channels, mel.shape[-1]), length_mask(lens, mel.shape[-1])
    loss = flow.loss(mel, cond, mask)
    loss.backward()
    assert torch.isfinite(loss) and flow.cond_proj.weight.grad.abs().sum() > 0
    prompt = torch.zeros_like(mel)
    prompt[..., :20] = mel[..., :20]
    g = torch.Generator().manual_seed(0)
    with_prompt = flow.sample(cond, mask, steps=2, generator=g, prompt=prompt)
    without = flow.sample(cond, mask, steps=2, generator=torch.Generator().manual_seed(0))
    assert with_prompt.shape == without.shape and not torch.allclose(with_prompt, without)


# ---------------------------------------------------------------- stage 0.3


@torch.no_grad()
def _full_clip_mel_l1(module: torch.nn.Module, batch: dict) -> float:
    """Mel L1 of the generator's wave for the whole clips, over their valid frames."""
    module.eval()
    mel, lens = batch["target_mel"], batch["mel_len"]
    err = (module.mel(module.generator(mel)) - mel).abs() * length_mask(lens, mel.shape[-1])
    return float(err.sum() / (lens.sum() * mel.shape[1]))


def test_vocoder_mel_loss_falls(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = build_vocoder(model_cfg, {"segment_frames": 8}, tmp_path)
    mel = speech_batch["target_mel"]
    assert module.generator(mel).shape == (CLIPS, mel.shape[-1] * HOP)
    before = _full_clip_mel_l1(module, speech_batch)
    losses = _train(module, speech_batch, steps=40, lr=2e-3, key="mel_l1")
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    after = _full_clip_mel_l1(module, speech_batch)
    print(f"vocoder mel L1: training first 8 {first:.3f} last 8 {last:.3f}; whole clips {before:.3f} -> {after:.3f}")
    assert np.isfinite(losses).all()
    assert last < 0.85 * first
    assert after < 0.8 * before
    out = module(**speech_batch)
    assert set(out["metrics"]) == {"mel_l1", "gen_adv", "disc", "fm"}


def test_vocoder_gradients_are_separated(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    """The discriminators learn from the disc term only; the generator from the other terms only."""
    torch.manual_seed(0)
    module = build_vocoder(model_cfg, {"segment_frames": 8}, tmp_path).train()
    disc_params = [*module.mpd.parameters(), *module.msd.parameters()]
    mel, wave = module.crop(speech_batch["target_mel"], speech_batch["mel_len"], speech_batch["wave"])
    assert wave.shape == (CLIPS, 8 * HOP)

    parts = module.losses(mel, wave)
    w = module.weights
    (w["mel"] * parts["mel_l1"] + w["adv"] * parts["gen_adv"] + w["fm"] * parts["fm"]).backward()
    assert all(p.grad is None for p in disc_params)
    assert all(p.grad is not None for p in module.generator.parameters())

    module.zero_grad(set_to_none=True)
    module.losses(mel, wave)["disc"].backward()
    assert all(p.grad is None for p in module.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc_params)


def test_vocoder_crop_aligns_mel_and_wave(model_cfg: dict, speech_batch: dict, tmp_path: Path) -> None:
    torch.manual_seed(3)
    module = build_vocoder(model_cfg, {"segment_frames": 16}, tmp_path)
    mel, wave = module.crop(speech_batch["target_mel"], speech_batch["mel_len"], speech_batch["wave"])
    # the real segment's own mel matches the cropped target mel away from the window edges
    own = module.mel(wave)
    assert own.shape == mel.shape
    assert torch.allclose(own[..., 3:-3], mel[..., 3:-3], atol=1e-3)


def test_vocoder_loads_local_generator(model_cfg: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = HifiGanGenerator(model_cfg["vocoder"])
    mel = torch.randn(1, 80, 5)
    ours = tmp_path / "ours.pt"
    torch.save({f"generator.{k}": v for k, v in gen.state_dict().items()}, ours)
    module = build_vocoder(model_cfg, {"vocoder_from": str(ours)}, tmp_path)
    assert torch.equal(module.generator(mel), gen(mel))

    # hifi-gan's own checkpoint layout: {"generator": state} with weight_g / weight_v
    def old(k: str) -> str:
        return k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )

    theirs = tmp_path / "g_00100000"
    torch.save({"generator": {old(k): v for k, v in gen.state_dict().items()}}, theirs)
    fresh = HifiGanGenerator(model_cfg["vocoder"])
    load_generator_state(fresh, theirs)
    assert torch.equal(fresh(mel), gen(mel))
