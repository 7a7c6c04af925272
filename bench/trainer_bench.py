"""The trainer's data loader and training step against the bare libraries, same data, same run.

- trainer.read: our shard stream (webdataset tar iterators + ``decode_sample`` + slot/offset
  bookkeeping) vs raw ``webdataset.WebDataset`` iteration (raw member dicts) over the same shards.
- trainer.loader: the whole loader (mixture draw, sequence building with image patches, packing,
  resume state) vs ``webdataset.WebDataset`` + ``decode_sample`` + the same sequence builder, no
  mixture, packing or state: the ratio is the cost of our machinery.
- trainer.train: tokens/s of the tiny omni model through a DeepSpeed ZeRO-2 engine (1 CPU rank, gloo)
  vs a plain torch forward/backward/AdamW loop on the same batches; both warmed up, then alternated
  and repeated, best of each.

Throughput is per CPU-second of this process (``time.process_time``, all threads), measured
alternately, because the benchmark machine is shared: wall time would mostly measure the neighbours.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import Row, image_caption_rows, main, result
from shards.manifest import write_shardset_manifest
from shards.writer import ShardWriter

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cpu_seconds(fn) -> float:
    """CPU time of this process (all its threads): unlike wall time, other jobs on the machine don't inflate it."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def best_cpu(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-N CPU seconds of each, run in turns so all see the same machine."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            best[name] = min(best[name], cpu_seconds(fn))
    return best


def paired_best(ours, bare, repeats: int) -> tuple[float, float]:
    """Best-of-N CPU seconds of each, run alternately so both see the same machine."""
    t = best_cpu({"ours": ours, "bare": bare}, repeats)
    return t["ours"], t["bare"]


def paired_best_timed(ours, bare, repeats: int) -> tuple[float, float]:
    """``paired_best`` for functions that time themselves (return their own seconds)."""
    t_ours = t_bare = float("inf")
    for _ in range(max(1, repeats)):
        t_ours = min(t_ours, ours())
        t_bare = min(t_bare, bare())
    return t_ours, t_bare


def _corpus(root: Path, n: int) -> str:
    rows = image_caption_rows(n)
    written = ShardWriter(str(root / "shards"), "bench", max_samples=100).write_all(rows)
    return write_shardset_manifest(str(root / "shards"), written)


def _read_rows(manifest: str, n: int, repeats: int) -> list[Row]:
    import webdataset as wds

    from shards.codec import decode_sample
    from shards.manifest import shard_urls
    from trainer.data import EntryStream, resolve_entry

    entry = resolve_entry({"name": "bench", "manifest": manifest})
    urls = shard_urls(manifest)

    def ours() -> None:
        stream = EntryStream(entry, seed=0, index=0, stream=0, streams=1)
        for _ in range(n):
            stream.next_sample()
        stream.close()

    def bare() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False)) == n

    def bare_decoded() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in wds.WebDataset(urls, shardshuffle=False):
                decode_sample(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})

    t = best_cpu({"ours": ours, "bare": bare, "decoded": bare_decoded}, repeats)
    t_ours, t_bare, t_decoded = t["ours"], t["bare"], t["decoded"]
    return [
        result("trainer.read", "samples/s", n / t_ours, n / t_bare, "bare=webdataset raw dicts; per CPU-second"),
        result("trainer.read", "samples/s", n / t_ours, n / t_decoded, "bare=webdataset+decode_sample; per CPU-second"),
    ]


def _loader_rows(manifest: str, tokenizer_dir: str, cfg: dict, n: int, repeats: int) -> list[Row]:
    import webdataset as wds

    from shards.codec import decode_sample
    from shards.manifest import shard_urls
    from trainer.data import make_loader, resolve_entry
    from trainer.media import MediaProcessor
    from trainer.sequence import build_example
    from trainer.tokenizer import load_tokenizer, special_ids

    entries = [resolve_entry({"name": "bench", "manifest": manifest})]
    urls = shard_urls(manifest)
    tok = load_tokenizer(tokenizer_dir)
    sp = special_ids(tok)
    media = MediaProcessor.from_model_config(cfg)
    tokens = {"ours": 0, "bare": 0}

    def ours() -> None:
        seen = 0
        for batch in make_loader(entries, cfg, tokenizer_dir, 1024, 1, 0, 0, 1, 0):
            seen += batch["meta"]["samples"]
            tokens["ours"] = batch["meta"]["tokens"]
            if seen >= n:
                return

    def bare() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for s in wds.WebDataset(urls, shardshuffle=False):
                members = {k: v for k, v in s.items() if not k.startswith("__")}
                ex = build_example(decode_sample(s["__key__"], members), None, tok, sp, media)
                tokens["bare"] = len(ex)

    t_ours, t_bare = paired_best(ours, bare, repeats)
    note = "bare=webdataset+decode_sample+same sequence builder; ours adds mixture, packing, state; per CPU-second"
    return [result("trainer.loader", "samples/s", n / t_ours, n / t_bare, note)]


def _batches(manifest: str, tokenizer_dir: str, cfg: dict, steps: int) -> list[dict]:
    from trainer.data import make_loader, resolve_entry

    loader = make_loader([resolve_entry({"name": "b", "manifest": manifest})], cfg, tokenizer_dir, 512, 2, 0, 0, 1, 0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == steps:
            return out
    raise RuntimeError("not enough batches")


def _train_rows(manifest: str, tokenizer_dir: str, cfg: dict, steps: int, repeats: int) -> list[Row]:
    import deepspeed
    import torch.distributed as dist

    from trainer.data import to_device
    from trainer.model import build_model
    from trainer.stages import param_groups, set_trainable
    from trainer.tokenizer import load_tokenizer

    batches = _batches(manifest, tokenizer_dir, cfg, steps)
    tokens = sum(b["meta"]["tokens"] for b in batches)
    tok = load_tokenizer(tokenizer_dir)
    trainable = ["projector", "llm", "lm_head", "audio_embed", "audio_head"]

    def model_and_optimizer():
        torch.manual_seed(0)
        model = build_model(cfg, tok)
        set_trainable(model, trainable)
        return model, torch.optim.AdamW(param_groups(model, {"default": 1e-3}, 0.0), lr=1e-3)

    def loop(step_fn) -> float:
        return cpu_seconds(lambda: [step_fn(b) for b in batches])

    model, opt = model_and_optimizer()

    def bare_step(b: dict) -> None:
        loss = model(**to_device(b, "cpu"))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="gloo" if deepspeed.get_accelerator().device_name() == "cpu" else None)
    ds_model, ds_opt = model_and_optimizer()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, config=config)

    def ours_step(b: dict) -> None:
        loss = engine(**to_device(b, engine.device))["loss"]
        engine.backward(loss)
        engine.step()

    bare_step(batches[0])  # warm-up, both sides
    ours_step(batches[0])
    t_ours, t_bare = paired_best_timed(lambda: loop(ours_step), lambda: loop(bare_step), repeats)
    dist.destroy_process_group()
    note = f"tiny model, {steps} micro-batches of 2x512 packed tokens, alternated, best of {repeats}"
    note += f"; bare=plain torch AdamW loop; torch threads {torch.get_num_threads()} both; per CPU-second"
    return [result("trainer.train", "tokens/s", tokens / t_ours, tokens / t_bare, note)]


def run(quick: bool = False) -> list[Row]:
    from trainer.data import corpus_texts
    from trainer.stages import load_model_config
    from trainer.tokenizer import train_tiny_tokenizer

    n, repeats, steps, train_repeats = (200, 3, 4, 2) if quick else (400, 5, 12, 3)
    cfg = load_model_config("tiny")
    with tempfile.TemporaryDirectory(prefix="omni-bench-trainer-") as tmp:
        root = Path(tmp)
        manifest = _corpus(root, n)
        train_tiny_tokenizer(corpus_texts([manifest]), root / "tokenizer", 600)
        tok = str(root / "tokenizer")
        rows = _read_rows(manifest, n, repeats)
        rows += _loader_rows(manifest, tok, cfg, n, repeats)
        rows += _train_rows(manifest, tok, cfg, steps, train_repeats)
    return rows


if __name__ == "__main__":
    main(run)
