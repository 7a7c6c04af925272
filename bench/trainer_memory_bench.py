"""Measured training memory of the ``mid`` model (conf/models/mid.yaml, ~2B parameters) on this machine's
CPU: one forward + backward with and without activation checkpointing, and the LM head's cross-entropy
chunked vs unchunked (trainer/memory.py).

Each configuration runs in its own process (bf16 weights built directly in bf16, the audio tokenizer
frozen as in every LLM stage, everything else trainable) so the process's RSS peak is its own:

- peak live: the most bytes of tensors the step held at once on top of the weights and their
  gradients (allocated before the step, so backward accumulates into them): activations and
  temporaries (``LiveBytes`` counts the storages ops create and notices frees);
- kept after forward: what the forward left alive for backward (activations, saved tensors);
- saved for backward: bytes autograd saved outside checkpointed layers (``saved_tensors_hooks``);
- RSS peak: the process's resident peak during the step (``VmHWM`` reset before it), and the extra
  above its RSS before the step.

Usage: ``python -m bench.trainer_memory_bench [--seq 1024] [--quick]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

GiB = 2**30
SPECIAL = SimpleNamespace(img_pad=31990, audio_pad=31991)


def mid_batch(seq: int, seed: int = 0) -> dict:
    """One packed row of ``seq`` tokens: text, a 224x224 image (256 patches -> 64 tokens), text, an 8 s
    generated speech clip (100 frames at 12.5 Hz), text; every text position learned."""
    g = torch.Generator().manual_seed(seed)
    n_img, n_audio, head, mid = 64, 100, 100, 200
    tail = seq - head - n_img - mid - n_audio
    text = torch.randint(3, 31000, (seq,), generator=g)
    ids = torch.cat(
        [
            text[:head],
            torch.full((n_img,), SPECIAL.img_pad),
            text[head : head + mid],
            torch.full((n_audio,), SPECIAL.audio_pad),
            text[head + mid : head + mid + tail],
        ]
    )
    labels = torch.where((ids == SPECIAL.img_pad) | (ids == SPECIAL.audio_pad), -100, ids)
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "position_ids": torch.arange(seq)[None],
        "loss_tags": torch.full((1, seq), 4),
        "pixel_values": torch.randn(256, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 16, 16]]),
        "audio_mels": [torch.randn(128, 800, generator=g)],  # 8 s: 400 encoder frames -> 100 codes
        "audio_chunk_clip": torch.tensor([0]),
        "audio_frames": torch.tensor([n_audio]),
        "audio_generate": torch.tensor([True]),
    }


def run_model(seq: int, checkpointing: bool, ce_chunk: int) -> dict:
    from trainer.memory import measure, rss_bytes, set_activation_checkpointing
    from trainer.model import build_model
    from trainer.stages import load_model_config

    cfg = copy.deepcopy(load_model_config("mid"))
    cfg["llm"]["config"]["vocab_size"] = 32000
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the fp32 model never exists
    model = build_model(cfg, pretrained="none")
    torch.set_default_dtype(torch.float32)
    model.special = SPECIAL
    model.audio_tokenizer.requires_grad_(False)
    model.train()
    model.ce_chunk_tokens = ce_chunk
    set_activation_checkpointing(model, checkpointing)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p in model.parameters():  # gradients allocated up front: the step's peak is activations and temporaries
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    batch = mid_batch(seq)
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    m = measure(lambda: model(**batch)["loss"])
    seconds = time.perf_counter() - t0
    return {
        **m,
        "params": params,
        "trainable": trainable,
        "rss_before": before,
        "rss_peak": before + m["rss_peak_extra"],
        "seconds": seconds,
    }


def run_ce(rows: int, chunk: int) -> dict:
    """The LM head's cross-entropy alone at the mid model's width and vocabulary (bf16), ``rows`` labelled rows."""
    import torch.nn.functional as F
    from torch import nn

    from trainer.memory import chunked_cross_entropy, measure, rss_bytes

    torch.manual_seed(0)
    head = nn.Linear(1536, 32000, bias=False, dtype=torch.bfloat16)
    hidden = torch.randn(rows, 1536, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 32000, (rows,))

    def step() -> torch.Tensor:
        if chunk == 0:
            return F.cross_entropy(head(hidden).float(), targets)
        return chunked_cross_entropy(hidden, head, targets, chunk).mean()

    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    m = measure(step)
    return {**m, "rss_before": before, "rss_peak": before + m["rss_peak_extra"], "seconds": time.perf_counter() - t0}


def child(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.trainer_memory_bench", "--one", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1024, help="tokens in the packed row (mid model)")
    p.add_argument("--ce-rows", type=int, default=16384, help="labelled rows of the cross-entropy alone")
    p.add_argument("--quick", action="store_true", help="skip the unchunked-CE run of the whole model")
    p.add_argument("--skip-ce", action="store_true", help="skip the cross-entropy-alone table")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        spec = json.loads(args.one)
        torch.set_num_threads(os.cpu_count() or 1)
        res = (
            run_model(spec["seq"], spec["ckpt"], spec["chunk"])
            if spec["kind"] == "model"
            else run_ce(spec["rows"], spec["chunk"])
        )
        print(json.dumps(res))
        return

    models = [
        ("mid, no checkpointing, CE chunks of 4096", {"ckpt": False, "chunk": 4096}),
        ("mid, activation checkpointing, CE chunks of 4096", {"ckpt": True, "chunk": 4096}),
    ]
    if not args.quick:
        models.append(("mid, no checkpointing, CE unchunked", {"ckpt": False, "chunk": 0}))
    print(
        f"mid model, one forward+backward of a {args.seq}-token packed row "
        "(text + image + generated speech), bf16, CPU\n"
    )
    print(
        "| configuration | peak live GiB | kept after forward GiB | saved for backward GiB | RSS peak GiB "
        "| RSS peak extra GiB | s |"
    )
    print("|---|---|---|---|---|---|---|")
    first = None
    for name, spec in models:
        r = child({"kind": "model", "seq": args.seq, **spec})
        first = first or r
        print(
            f"| {name} | {gib(r['peak_live'])} | {gib(r['after_forward'])} | {gib(r['saved'])} | "
            f"{gib(r['rss_peak'])} | {gib(r['rss_peak_extra'])} | {r['seconds']:.0f} |",
            flush=True,
        )
    print(
        f"\nparameters {first['params'] / 1e9:.2f}B (trainable {first['trainable'] / 1e9:.2f}B), bf16 weights "
        f"{gib(first['params'] * 2)} GiB + gradients {gib(first['trainable'] * 2)} GiB; RSS before the step "
        f"{gib(first['rss_before'])} GiB (weights, gradients, batch)\n"
    )
    if args.skip_ce:
        return
    print(
        f"LM head + cross-entropy alone: {args.ce_rows} labelled rows, width 1536, vocabulary 32000, bf16 "
        f"(fp32 logits of all rows: {gib(args.ce_rows * 32000 * 4)} GiB)\n"
    )
    print("| cross-entropy | peak live GiB | kept after forward GiB | RSS peak extra GiB | s |")
    print("|---|---|---|---|---|")
    for name, chunk in (("unchunked", 0), ("chunks of 4096", 4096), ("chunks of 1024", 1024)):
        r = child({"kind": "ce", "rows": args.ce_rows, "chunk": chunk})
        print(
            f"| {name} | {gib(r['peak_live'])} | {gib(r['after_forward'])} | {gib(r['rss_peak_extra'])} | "
            f"{r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
