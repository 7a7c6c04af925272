"""The audio stack learns: stage 0.1 (tokenizer), 0.2 (flow decoder), 0.3 (vocoder) for a fixed number of
steps on real recorded speech, then measured on held-out clips against the same stack at random init.

Rows (held-out clips the stages never trained on):
- mel L1 through tokenizer → reconstruction decoder (refined mel vs the 24 kHz target mel);
- mel L1 through tokenizer → decoder → flow matching (10 Euler steps, guidance 0.7);
- mel L1 of the vocoder's waveform (its mel) given the true mel;
- codebook usage per RVQ layer: distinct codes the held-out clips hit / codebook size;
- round trip: speech → codes → flow → vocoder → 24 kHz wave → whisper tiny.en, WER against the
  transcript, next to whisper's WER on the original recordings (the ceiling).

This is a quality benchmark, not a speed one: the time per stage is reported as its own column. The
tiny config trains in minutes on CPU and is not expected to be intelligible; ``--config mid --steps
N --device cuda`` runs the same on a GPU. Every figure comes from the run; nothing is assumed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def clips(n_train: int, n_test: int, max_seconds: float, cfg: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    from pipelines.demo_data import asterisk_prompts
    from trainer.audio_data import clip_from_audio
    from trainer.audio_mel import LogMel
    from trainer.media import MediaProcessor

    media, to_mel = MediaProcessor.from_model_config(cfg), LogMel()
    prompts = asterisk_prompts(limit=n_train + n_test)
    train = [clip_from_audio(w.stem, w.read_bytes(), t, media, to_mel, max_seconds) for w, t in prompts[:n_train]]
    test = [clip_from_audio(w.stem, w.read_bytes(), t, media, to_mel, 30.0) for w, t in prompts[n_train:]]
    return train, [c for c in test if c["text"]]  # held out and whole (<= 30 s): transcripts are the WER references


def batches(train: list[dict], batch: int, steps: int, seed: int, device: str):
    from trainer.audio_data import collate_clips

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        picked = [train[i] for i in rng.choice(len(train), size=batch, replace=False)]
        b = collate_clips([(c, {}) for c in picked])
        yield {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items() if k != "meta"}


def train(module: torch.nn.Module, train_clips: list[dict], args: argparse.Namespace, lr: float) -> dict[str, Any]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.8, 0.99), weight_decay=0.0)
    module.train()
    losses, start = [], time.perf_counter()
    for b in batches(train_clips, args.batch, args.steps, args.seed, args.device):
        out = module(**b)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(out["loss"].detach()))
    module.eval()
    k = max(1, len(losses) // 10)
    return {
        "first": float(np.mean(losses[:k])),
        "last": float(np.mean(losses[-k:])),
        "seconds": time.perf_counter() - start,
    }


def _masked_l1(pred: torch.Tensor, target: torch.Tensor) -> float:
    t = min(pred.shape[-1], target.shape[-1])
    return float((pred[..., :t] - target[..., :t]).abs().mean())


@torch.no_grad()
def evaluate(tok_mod, flow_mod, voc_mod, test: list[dict], device: str, whisper: Any) -> dict[str, Any]:
    from scipy.signal import resample_poly

    from synth.text import word_error_rate
    from trainer.audio_mel import LogMel

    tokenizer = tok_mod.tokenizer
    to_mel = LogMel().to(device)
    rec, flow_l1, voc_l1, used = [], [], [], None
    waves: dict[str, list[np.ndarray]] = {"vocoder(true mel)": [], "vocoder(decoder mel)": [], "vocoder(flow mel)": []}
    g = torch.Generator(device=device).manual_seed(0)
    for c in test:
        mel = torch.from_numpy(c["whisper_mel"])[None].to(device)
        target = torch.from_numpy(c["target_mel"])[None].to(device)
        codes, n = tokenizer.tokenize(mel, torch.tensor([mel.shape[-1]], device=device))
        codes = codes[:, : int(n[0])]
        hits = [set(codes[0, :, i].tolist()) for i in range(codes.shape[-1])]
        used = hits if used is None else [u | h for u, h in zip(used, hits, strict=True)]
        hidden, refined = tokenizer.decoder_states(codes)
        rec.append(_masked_l1(refined, target))
        cond = hidden.transpose(1, 2)
        mask = torch.ones(1, 1, cond.shape[-1], device=device)
        mel_flow = flow_mod.flow.sample(cond, mask, steps=10, guidance=0.7, generator=g)
        flow_l1.append(_masked_l1(mel_flow, target))
        voc_wave = voc_mod.generator(target)
        voc_l1.append(_masked_l1(to_mel(voc_wave), target))
        for name, wave in (
            ("vocoder(true mel)", voc_wave),
            ("vocoder(decoder mel)", voc_mod.generator(refined)),
            ("vocoder(flow mel)", voc_mod.generator(mel_flow)),
        ):
            waves[name].append(wave[0].float().cpu().numpy())
    sizes = list(tokenizer.quantizer.layers)
    usage = [len(u) / layer.embed.shape[0] for u, layer in zip(used, sizes, strict=True)]
    wer = {}
    for name, clips_out in waves.items():  # where intelligibility is lost: vocoder alone, then + codes
        heard = whisper.transcribe_many([resample_poly(w, 2, 3).astype(np.float32) for w in clips_out])
        wer[name] = float(np.mean([word_error_rate(c["text"], h.text) for c, h in zip(test, heard, strict=True)]))
    return {
        "recon_mel_l1": float(np.mean(rec)),
        "flow_mel_l1": float(np.mean(flow_l1)),
        "vocoder_mel_l1": float(np.mean(voc_l1)),
        "codebook_usage": [round(u, 3) for u in usage],
        "wer": wer,
        "round_trip_wer": wer["vocoder(flow mel)"],
    }


def build(cfg: dict[str, Any], run: Path, tokenizer_pt: Path | None, seed: int, device: str):
    from trainer.audio_tokenizer_train import build_audio_tokenizer
    from trainer.flow_decoder import build_flow_decoder
    from trainer.vocoder import build_vocoder

    torch.manual_seed(seed)
    tok = build_audio_tokenizer(cfg, {"semantic_llm": None, "max_seconds": 4.0}, run).to(device)
    flow_args = {"audio_tokenizer_from": str(tokenizer_pt) if tokenizer_pt else None}
    flow = build_flow_decoder(cfg, flow_args, run).to(device)
    voc = build_vocoder(cfg, {}, run).to(device)
    return tok, flow, voc


def run(args: argparse.Namespace) -> dict[str, Any]:
    from synth.asr import Transcriber
    from synth.text import word_error_rate
    from trainer.stages import load_model_config

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_model_config(args.config)
    train_clips, test = clips(args.train_clips, args.test_clips, args.max_seconds, cfg)
    whisper = Transcriber(cpu_threads=args.threads)
    ceiling = whisper.transcribe_many([resample_poly_16k(c["wave"]) for c in test])
    report: dict[str, Any] = {
        "config": args.config,
        "steps": args.steps,
        "batch": args.batch,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "train_clips": len(train_clips),
        "test_clips": len(test),
        "whisper_wer_on_originals": float(
            np.mean([word_error_rate(c["text"], h.text) for c, h in zip(test, ceiling, strict=True)])
        ),
    }
    with tempfile.TemporaryDirectory(prefix="omni-audio-bench-") as tmp:
        run_dir = Path(tmp)
        tok, flow, voc = build(cfg, run_dir, None, args.seed, args.device)
        report["random_init"] = evaluate(tok, flow, voc, test, args.device, whisper)
        report["train_tokenizer"] = train(tok, train_clips, args, args.lr)
        pt = run_dir / "tokenizer.pt"
        torch.save(tok.state_dict(), pt)
        torch.manual_seed(args.seed)
        from trainer.flow_decoder import build_flow_decoder

        flow = build_flow_decoder(cfg, {"audio_tokenizer_from": str(pt)}, run_dir).to(args.device)
        report["train_flow"] = train(flow, train_clips, args, args.lr)
        report["train_vocoder"] = train(voc, train_clips, args, args.lr)
        report["trained"] = evaluate(tok, flow, voc, test, args.device, whisper)
    return report


def resample_poly_16k(wave24: np.ndarray) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(wave24, 2, 3).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="model config (conf/models): tiny, mid, ...")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per stage")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-clips", type=int, default=96)
    p.add_argument("--test-clips", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the report as JSON")
    args = p.parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
