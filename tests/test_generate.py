"""Generation end to end on a tiny run directory built here (no launcher): KV-cached LLM decoding, the
audio head's depth-autoregressive frames, end-of-audio, interleaved text/speech, chunked decoding with
cross-fade, and ``omni speak`` / ``omni generate`` writing 24 kHz WAVs.

The LLM is the tiny config's real architecture after 50 AdamW steps on one real ``tts`` sample (a recorded
prompt's transcript and its first second of speech): a tiny model overfit on one sample, so greedy decoding
of that text must give back exactly the sample's 13 frames of codes and then end-of-audio. The flow decoder
and vocoder are the tiny configs' real modules with their initial weights (the sound is noise; the
lengths, determinism and plumbing are what is checked).
"""

from __future__ import annotations

import copy
import json
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipelines.demo_data import asterisk_prompts
from synth.media import decode_audio
from trainer.generate import (
    SAMPLES_PER_FRAME,
    GenerationError,
    LLMState,
    OmniGenerator,
    head_logits_incremental,
    prompt_embeddings,
)

ROOT = Path(__file__).resolve().parents[1]
LLM_STAGE = "2.1"
TRAIN_STEPS = 50


def _done(final: Path, doc: dict) -> None:
    final.mkdir(parents=True, exist_ok=True)
    (final / "done.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, text_tokenizer_dir: str) -> Path:
    from trainer.data import Pack, collate, pack_arrays
    from trainer.flow_decoder import build_flow_decoder
    from trainer.media import MediaProcessor
    from trainer.model import build_model
    from trainer.sequence import build_example
    from trainer.tokenizer import load_tokenizer, special_ids
    from trainer.vocoder import build_vocoder

    run = tmp_path_factory.mktemp("gen") / "run"
    shutil.copytree(text_tokenizer_dir, run / "tokenizer")
    tok = load_tokenizer(run / "tokenizer")
    cfg = yaml.safe_load((ROOT / "conf/models/tiny.yaml").read_text())

    torch.manual_seed(0)
    model = build_model(cfg, tok)
    # one real tts sample: a recorded prompt's transcript and its first second of speech (13 frames)
    src, text = asterisk_prompts(limit=1)[0]
    clip = run / "clip.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(decode_audio(src.read_bytes(), 16_000)[:16_000], -1, 1) * 32767).astype("<i2").tobytes())
    sample = {
        "id": "tts-0",
        "kind": "tts",
        "segments": [{"modality": "text", "text": text}, {"modality": "audio", "bytes": clip.read_bytes()}],
    }
    ex = build_example(sample, None, tok, special_ids(tok), MediaProcessor.from_model_config(cfg))
    batch = collate([pack_arrays(Pack([ex]), len(ex), special_ids(tok).eos, {})])
    batch.pop("meta")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]  # the tiny model has learnt its one sample
    codes = model.audio_tokenizer([torch.from_numpy(m) for m in ex.audios[0].mels])[0]
    final = run / LLM_STAGE / "final"
    _done(final, {"stage": LLM_STAGE, "task": "omni", "model_config": cfg, "tokenizer": str(run / "tokenizer")})
    torch.save(model.state_dict(), final / "model.pt")

    # stages 0.2 / 0.3 as their stage modules export them (flow.* + the frozen tokenizer.*; generator.*, mpd.*,
    # msd.*), initial weights; the flow's tokenizer is the one the LLM stage holds, as in a real run
    flow_task = build_flow_decoder(cfg, {"audio_tokenizer_from": None}, run)
    flow_task.tokenizer.load_state_dict(model.audio_tokenizer.state_dict())
    _done(run / "0.2/final", {"stage": "0.2", "task": "flow_decoder", "model_config": cfg})
    torch.save(flow_task.state_dict(), run / "0.2/final/model.pt")
    _done(run / "0.3/final", {"stage": "0.3", "task": "vocoder", "model_config": cfg})
    torch.save(build_vocoder(cfg, {}, run).state_dict(), run / "0.3/final/model.pt")
    doc = {"text": text, "ids": ex.ids, "wav": str(clip), "codes": codes.tolist()}
    (run / "tts_ids.json").write_text(json.dumps(doc))
    return run


@pytest.fixture(scope="module")
def gen(tiny_run: Path) -> OmniGenerator:
    return OmniGenerator.from_run(tiny_run)


def _omni(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from pipelines.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _read_wav(path: Path) -> tuple[Any, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        data = np.frombuffer(w.readframes(params.nframes), dtype="<i2")
    return params, data


# ---------------------------------------------------------------- decoding internals


def test_loads_latest_llm_stage_and_speak_prompt_is_a_tts_sample(gen: OmniGenerator, tiny_run: Path) -> None:
    assert gen.stage == LLM_STAGE
    tts = json.loads((tiny_run / "tts_ids.json").read_text())
    ids = tts["ids"]
    start = ids.index(gen.sp.audiogen_start)
    assert gen.tts_prompt_ids(tts["text"]) == ids[: start + 1]  # text, then <audiogen_start>, as trained


def test_kv_cache_decoding_matches_full_forward(gen: OmniGenerator) -> None:
    model, sp = gen.model, gen.sp
    n_q = len(model.codebook_sizes)
    codes = torch.tensor([[i % s for s in model.codebook_sizes] for i in range(3, 7)])
    text = gen.tokenizer.encode("the weather today", add_special_tokens=False)
    ids = text + [sp.audio_start] + [sp.audio_pad] * 4 + [sp.audio_end] + [sp.audiogen_start]
    frames = torch.tensor([[1] * n_q, [5] * n_q, [2] * n_q])  # generated frames fed as summed code embeddings
    with torch.no_grad():
        prompt = prompt_embeddings(model, torch.tensor([ids]), audio_codes=codes)
        tail = model.embed_codes(frames).sum(1).unsqueeze(0)
        full_in = torch.cat([prompt, tail], 1)
        pos = torch.arange(full_in.shape[1]).unsqueeze(0)
        full = model.lm_head(model.model(inputs_embeds=full_in, position_ids=pos, use_cache=False).last_hidden_state)[0]
        state = LLMState(model)
        steps = [model.lm_head(state.feed(prompt[:, :5]))]
        for i in range(5, full_in.shape[1]):
            steps.append(model.lm_head(state.feed(full_in[:, i : i + 1])))
    cached = torch.stack(steps)
    torch.testing.assert_close(cached, full[4:], atol=1e-4, rtol=1e-4)
    assert state.length == full_in.shape[1]


def test_prompt_embeddings_are_the_training_forwards(gen: OmniGenerator, tiny_run: Path, tmp_path: Path) -> None:
    """Image features and audio codes land where OmniModel.forward puts them in training."""
    from PIL import Image

    from trainer.data import Pack, collate, pack_arrays
    from trainer.sequence import build_example

    model, sp = gen.model, gen.sp
    buf = tmp_path / "im.png"
    Image.new("RGB", (112, 112), (20, 120, 220)).save(buf)
    sample = {
        "id": "iat",
        "kind": "image_audio_text",
        "segments": [
            {"modality": "image", "bytes": buf.read_bytes()},
            {"modality": "audio", "bytes": (tiny_run / "clip.wav").read_bytes()},
            {"modality": "text", "text": "a blue square"},
        ],
    }
    ex = build_example(sample, None, gen.tokenizer, sp, gen.media)
    batch = collate([pack_arrays(Pack([ex]), len(ex), sp.eos, {})])
    batch.pop("meta")
    seen = {}

    def capture(_module, _args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
            codes = torch.cat(model.audio_tokenizer(batch["audio_mels"]))
            mine = prompt_embeddings(
                model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], audio_codes=codes
            )
    finally:
        hook.remove()
    assert ex.ids.count(sp.img_pad) == 16 and ex.ids.count(sp.audio_pad) == codes.shape[0] == 13
    torch.testing.assert_close(mine, seen["embeds"], atol=0, rtol=0)


def test_depth_head_incremental_matches_teacher_forcing(gen: OmniGenerator) -> None:
    model = gen.model
    torch.manual_seed(1)
    hidden = torch.randn(3, model.llm_config.hidden_size)
    codes = torch.stack([torch.randint(0, s, (3,)) for s in model.codebook_sizes], 1)
    with torch.no_grad():
        ref = model.audio_head(hidden, model.embed_codes(codes))
        inc = head_logits_incremental(model, hidden, codes)
    for a, b in zip(ref, inc, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_seed_fixes_codes(gen: OmniGenerator) -> None:
    kw = {"min_frames": 4, "max_frames": 4, "temperature": 2.0, "top_k": 0}
    a = gen.speak_codes("hello there", seed=0, **kw)
    b = gen.speak_codes("hello there", seed=0, **kw)
    c = gen.speak_codes("hello there", seed=1, **kw)
    assert a.shape == (4, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for i, s in enumerate(gen.model.codebook_sizes):  # never the end-of-audio index inside a frame
        assert int(a[:, i].max()) < s


def test_trained_model_speaks_its_sample_and_stops(gen: OmniGenerator, tiny_run: Path) -> None:
    tts = json.loads((tiny_run / "tts_ids.json").read_text())
    codes = gen.speak_codes(tts["text"], temperature=0, max_frames=60)  # greedy
    assert codes.tolist() == tts["codes"]  # the trained frames, then end-of-audio (not the 60-frame limit)
    wave_, sr = gen.speak(tts["text"], temperature=0, max_frames=60, flow_steps=2)
    assert sr == 24_000 and wave_.shape == (len(tts["codes"]) * SAMPLES_PER_FRAME,)


def _eoa_biased(gen: OmniGenerator) -> OmniGenerator:
    """A copy whose audio head always votes end-of-audio in the first codebook (the last norm outputs a
    constant; codebook 0's end-of-audio row points along it)."""
    model = copy.deepcopy(gen.model)
    head = model.audio_head
    with torch.no_grad():
        head.norm.weight.zero_()
        head.norm.bias.fill_(1.0)
        eoa = model.codebook_sizes[0]
        head.classifiers[0].weight[eoa].fill_(100.0)
    return OmniGenerator(model, gen.tokenizer, gen.flow, gen.vocoder, gen.config, gen.stage)


def test_end_of_audio_stops_generation(gen: OmniGenerator) -> None:
    eoa = _eoa_biased(gen)
    assert eoa.speak_codes("stop now", max_frames=50).shape[0] == 0
    assert eoa.speak_codes("stop now", min_frames=3, max_frames=50).shape[0] == 3
    wave_, sr = eoa.speak("stop now", min_frames=2, max_frames=50)
    assert sr == 24_000 and wave_.dtype == np.float32 and wave_.shape == (2 * SAMPLES_PER_FRAME,)


def _forcing(script: list[int]):
    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        out[script[len(generated)]] = 0.0
        return out

    return force


def test_interleaved_text_and_speech(gen: OmniGenerator) -> None:
    sp, tok = gen.sp, gen.tokenizer
    a = tok.encode("hello", add_special_tokens=False)
    b = tok.encode(" world", add_special_tokens=False)
    # text, then speech (the model switches at <audiogen_start>), <audiogen_end> fed after it, text again
    script = a + [sp.audiogen_start, sp.audiogen_end] + b + [sp.eos]
    parts = gen.generate("Say hello", seed=3, min_frames=2, max_frames=2, logits_processor=_forcing(script))
    assert [p["type"] for p in parts] == ["text", "audio", "text"]
    assert parts[0]["text"] == tok.decode(a) and parts[2]["text"] == tok.decode(b)
    audio = parts[1]
    assert audio["frames"] == 2 and audio["sample_rate"] == 24_000
    assert audio["wave"].shape == (2 * SAMPLES_PER_FRAME,)
    # end-of-audio from the head (not max_frames) also hands back to text
    eoa = _eoa_biased(gen)
    parts = eoa.generate("Say hello", seed=3, min_frames=1, max_frames=40, logits_processor=_forcing(script))
    assert [p["type"] for p in parts] == ["text", "audio", "text"] and parts[1]["frames"] == 1
    # unforced sampling runs to EOS or the token limit, text only where the model never starts speech
    free = gen.generate("Say hello", seed=0, max_new_tokens=6, max_frames=3)
    assert free and all(p["type"] in ("text", "audio") for p in free)


def test_chunked_decode_cross_fades(gen: OmniGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    n = 7
    codes = torch.stack([torch.randint(0, s, (n,)) for s in gen.model.codebook_sizes], 1)
    whole = gen.codes_to_wave(codes, seed=5, chunk_frames=None, flow_steps=2)
    assert whole.shape == (n * SAMPLES_PER_FRAME,)
    assert np.array_equal(whole, gen.codes_to_wave(codes, seed=5, chunk_frames=None, flow_steps=2))

    windows: list[np.ndarray] = []
    real = gen._mel_to_wave

    def record(cond, g, flow):
        w = real(cond, g, flow)
        windows.append(w.clone().numpy())
        return w

    monkeypatch.setattr(gen, "_mel_to_wave", record)
    chunk, lap = 3, 1
    out = gen.codes_to_wave(codes, seed=5, chunk_frames=chunk, overlap_frames=lap, flow_steps=2)
    assert out.shape == whole.shape and out.dtype == np.float32
    spans = [(max(0, s - lap), min(n, s + chunk)) for s in range(0, n, chunk)]  # [0,3) [2,6) [5,7)
    assert [len(w) for w in windows] == [(b - a) * SAMPLES_PER_FRAME for a, b in spans]
    f = SAMPLES_PER_FRAME
    for j in range(1, len(spans)):
        prev, cur = windows[j - 1], windows[j]
        a, start = spans[j][0] * f, (spans[j][0] + lap) * f
        p = prev[a - spans[j - 1][0] * f :]  # the previous window's tail over the overlap
        c = cur[: start - a]
        ramp = np.arange(1, start - a + 1, dtype=np.float32) / (start - a + 1)
        np.testing.assert_allclose(out[a:start], p * (1 - ramp) + c * ramp, atol=1e-6)
        # continuity: across the join no step exceeds the windows' own steps plus one ramp increment of
        # their difference (a hard splice would jump by |prev - cur| at once)
        own = max(
            np.abs(np.diff(prev[a - spans[j - 1][0] * f - 1 :])).max(),
            np.abs(np.diff(cur[: start - a + 1])).max(),
        )
        bound = own + np.abs(p - c).max() / (start - a + 1) + 1e-6
        assert np.abs(np.diff(out[a - 1 : start + 1])).max() <= bound
    # outside the overlaps every sample is its own window's
    np.testing.assert_array_equal(out[: 2 * f], windows[0][: 2 * f])
    np.testing.assert_array_equal(out[3 * f : 5 * f], windows[1][f : 3 * f])
    np.testing.assert_array_equal(out[6 * f :], windows[2][f:])


# ---------------------------------------------------------------- the commands


@pytest.mark.parametrize("frames", [3, 6])
def test_omni_speak_wav_length_follows_frames(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, frames: int
) -> None:
    out = tmp_path / "reply.wav"
    argv = ["speak", str(tiny_run), "--text", "Good morning", "--out", str(out)]
    argv += ["--min-frames", str(frames), "--max-frames", str(frames), "--flow-steps", "2"]
    rc, stdout, err = _omni(argv, capsys)
    assert rc == 0, err
    assert f"{frames} frames" in stdout
    params, data = _read_wav(out)
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 24_000)
    assert params.nframes == len(data) == frames * 8 * 240
    assert np.abs(data).max() > 0  # the vocoder made a signal, not silence

    again = tmp_path / "again.wav"
    assert _omni(argv[:-7] + [str(again)] + argv[-6:], capsys)[0] == 0
    assert again.read_bytes() == out.read_bytes()  # same seed: byte-identical WAV


def test_omni_speak_stops_at_end_of_audio_or_max_frames(tiny_run: Path, tmp_path: Path, capsys) -> None:
    tts = json.loads((tiny_run / "tts_ids.json").read_text())
    out = tmp_path / "r.wav"
    base = ["speak", str(tiny_run), "--text", tts["text"], "--out", str(out), "--temperature", "0"]
    for limit, frames in ((60, len(tts["codes"])), (5, 5)):  # end-of-audio after 13 frames; the limit first
        rc, stdout, err = _omni(base + ["--max-frames", str(limit), "--flow-steps", "2"], capsys)
        assert rc == 0, err
        assert f": {frames} frames, {frames * 0.08:.2f} s at 24000 Hz" in stdout
        assert _read_wav(out)[0].nframes == frames * SAMPLES_PER_FRAME


def test_omni_generate_with_image_and_audio(tiny_run: Path, tmp_path: Path, capsys, gen: OmniGenerator) -> None:
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (100, 80), (200, 30, 30)).save(img)
    wav = json.loads((tiny_run / "tts_ids.json").read_text())["wav"]
    ids, media = gen.build_prompt("Describe <image> and <audio>", img.read_bytes(), Path(wav).read_bytes())
    sp = gen.sp
    assert ids.count(sp.img_pad) == 12 == media["pixel_values"].shape[0] // 4  # 112x84 px: 8x6 patches, 2x2 merged
    assert ids.count(sp.audio_pad) == media["audio_codes"].shape[0] > 10
    assert ids.index(sp.img_start) < ids.index(sp.audio_start)

    argv = ["generate", str(tiny_run), "--prompt", "Describe", "--image", str(img), "--audio", wav]
    argv += ["--out-dir", str(tmp_path / "o"), "--max-new-tokens", "4", "--max-frames", "2", "--flow-steps", "2"]
    rc, stdout, err = _omni(argv, capsys)
    assert rc == 0, err
    for path in sorted((tmp_path / "o").glob("reply-*.wav")):
        params, _ = _read_wav(path)
        assert params.framerate == 24_000 and params.nframes % SAMPLES_PER_FRAME == 0
        assert str(path) in stdout


def test_omni_user_errors_exit_2(tiny_run: Path, tmp_path: Path, capsys) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for st in ("tokenizer", LLM_STAGE, "0.2"):  # no vocoder stage
        (partial / st).symlink_to(tiny_run / st)
    bad_img = tmp_path / "photo.png"
    bad_img.write_text("not an image")
    wav = str(tmp_path / "x.wav")
    cases = [
        (["speak", str(tmp_path / "nope"), "--text", "hi", "--out", wav], "no run directory"),
        (["speak", str(partial), "--text", "hi", "--out", wav], "0.3"),
        (["speak", str(tiny_run), "--stage", "3.1", "--text", "hi", "--out", wav], "stage 3.1"),
        (["speak", str(tiny_run), "--text", "hi", "--out", str(tmp_path / "no/dir/x.wav")], "no directory"),
        (["generate", str(tiny_run), "--prompt", "hi", "--image", str(bad_img)], "image"),
        (["generate", str(tiny_run), "--prompt", "hi", "--audio", str(tmp_path / "missing.wav")], "no file"),
    ]
    for argv, words in cases:
        rc, _, err = _omni(argv, capsys)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omni: error: ") and words in lines[0], (argv, err)
    assert not Path(wav).exists()


def test_from_run_names_missing_pieces(tiny_run: Path, tmp_path: Path) -> None:
    only_llm = tmp_path / "only_llm"
    only_llm.mkdir()
    (only_llm / LLM_STAGE).symlink_to(tiny_run / LLM_STAGE)
    with pytest.raises(GenerationError, match="0.2"):
        OmniGenerator.from_run(only_llm)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GenerationError, match="no finished LLM stage"):
        OmniGenerator.from_run(empty)
