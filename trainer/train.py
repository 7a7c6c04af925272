"""The DeepSpeed loop, one process per rank (started by ``trainer.launch`` via torchrun or ``deepspeed``).

Per stage: build the model, load the previous stage's weights, freeze by name, AdamW groups with the
stage's learning rates, ``deepspeed.initialize`` with the stage's ZeRO config, then stream packs
until the step or token budget. A checkpoint is the DeepSpeed state plus each rank's data position;
``checkpoints/committed`` names the last complete one (written after every rank finished), so a kill
at any moment resumes from a whole checkpoint and replays exactly the same samples. A finished stage
exports ``final/model.pt`` (ZeRO-3 weights gathered) and ``final/done.json``; re-running skips it.

Logged to the console, TensorBoard (``<stage>/tb``) and ``<stage>/steps.jsonl``: loss per modality
tag, tokens/s and samples/s (all ranks), learning rates, and the sample ids each rank consumed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from trainer import hf_compat  # noqa: F401  (before transformers)

log = logging.getLogger("trainer")
AUDIO_BUILDERS = {
    "audio_tokenizer": ("trainer.audio_tokenizer_train", "build_audio_tokenizer"),
    "flow_decoder": ("trainer.flow_decoder", "build_flow_decoder"),
    "vocoder": ("trainer.vocoder", "build_vocoder"),
}
KEEP_CHECKPOINTS = 2
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def _rank_print(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def lr_factor(stage: Any, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the budget."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * cos


def peak_flops() -> float | None:
    """Dense bf16 peak of one accelerator (``OMNI_PEAK_TFLOPS`` overrides); None on CPU or unknown cards."""
    if os.environ.get("OMNI_PEAK_TFLOPS"):
        return float(os.environ["OMNI_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def deepspeed_config(stage: Any, device_type: str) -> dict[str, Any]:
    cfg = stage.deepspeed_config()
    cfg["train_micro_batch_size_per_gpu"] = stage.micro_batch
    cfg["gradient_accumulation_steps"] = stage.grad_accum
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = stage.grad_clip
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    precision = stage.precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": False}
    if getattr(stage, "sequence_parallel", 1) > 1:  # data parallel = world / sequence_parallel
        cfg["sequence_parallel_size"] = stage.sequence_parallel
        zero = cfg.setdefault("zero_optimization", {})
        if zero.get("stage") == 3:  # one gradient-averaging path only (attention.zero3_grad_scale)
            zero["reduce_scatter"] = True
    return cfg


def unset_to_none(value: Any) -> Any:
    """``${VAR:-}`` left empty means "not given": "" becomes None, and a mapping of nothing but unset values
    (``semantic_llm: {path: ""}``) becomes None, so a builder sees one spelling of "absent"."""
    if isinstance(value, str):
        return None if value.strip() in ("", "null", "~") else value
    if isinstance(value, dict):
        out = {k: unset_to_none(v) for k, v in value.items()}
        return out if any(v is not None for v in out.values()) or not value else None
    return value


def load_audio_tokenizer(tokenizer: torch.nn.Module, stage: Any) -> None:
    """Stage 0.1's trained tokenizer (keys ``tokenizer.*`` of its export) into an LLM stage's model."""
    path = stage.audio_tokenizer_weights()
    if path is None:
        return
    if not path.is_file():
        raise FileNotFoundError(f"stage {stage.stage}: audio_tokenizer_from {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    own = {k[len("tokenizer.") :]: v for k, v in state.items() if k.startswith("tokenizer.")}
    if not own:
        raise ValueError(f"stage {stage.stage}: {path} holds no audio tokenizer (no tokenizer.* keys)")
    from trainer.weights import load_into

    load_into(tokenizer, own, strict=True, what=f"stage {stage.stage}: audio_tokenizer_from {path}")


class StageRun:
    """One stage on one rank."""

    def __init__(self, stage: Any, tokenizer_path: str) -> None:
        import deepspeed
        import torch.distributed as dist

        from trainer import memory
        from trainer.attention import check_heads, stage_sequence_parallel, zero3_grad_scale
        from trainer.data import DataPosition, make_loader, resolve_entry
        from trainer.model import build_model
        from trainer.pretrained import detached_config
        from trainer.stages import param_groups, set_trainable
        from trainer.tokenizer import load_tokenizer
        from trainer.weights import load_into

        self.stage = stage
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # Ulysses: groups of sequence_parallel consecutive ranks share each sequence and read the same batches
        self.mpu, self.sp = stage_sequence_parallel(stage, self.world)
        sp_size = self.sp.size if self.sp is not None else 1
        self.dp_rank, self.dp_world = self.rank // sp_size, self.world // sp_size
        self.out = stage.out_dir
        self.ckpt_dir = self.out / "checkpoints"
        self.tokenizer_path = tokenizer_path
        model_cfg = stage.model_config()
        self.model_cfg = model_cfg
        torch.manual_seed(stage.seed)  # every rank builds the same initial weights (ZeRO-3 partitions them as is)
        if stage.is_audio:
            model = self._audio_module(model_cfg)
            self.trainable = {
                name: sum(p.numel() for p in child.parameters() if p.requires_grad)
                for name, child in model.named_children()
                if any(p.requires_grad for p in child.parameters())
            }
            self.flops_per_token = 0
        else:
            tokenizer = load_tokenizer(tokenizer_path)
            ds_config = deepspeed_config(stage, deepspeed.get_accelerator().device_name())
            # a first stage starts from the pretrained towers (required where the model config says so);
            # a stage with init_from reads none of them: its weights follow (trainer/pretrained.py)
            with memory.model_build(ds_config):  # ZeRO-3: partitioned from the start (deepspeed.zero.Init)
                model = build_model(model_cfg, tokenizer, pretrained="none" if stage.init_from else "require")
            self.model_cfg = detached_config(model_cfg, model)  # done.json: rebuilt without the towers' dirs
            init = stage.init_weights()
            if init is not None:
                if not init.is_file():
                    raise FileNotFoundError(f"stage {stage.stage} starts from {init}, which does not exist")
                # memory-mapped: only the pages rank 0 copies from are read (weights.load_into)
                state = torch.load(init, map_location="cpu", weights_only=True, mmap=True)
                load_into(model, state, strict=True, what=f"stage {stage.stage}: init_from {init}")
                del state
            load_audio_tokenizer(model.audio_tokenizer, stage)
            self.trainable = set_trainable(model, stage.trainable)
            self.checkpointed = memory.configure(model, stage)  # CE chunks, activation checkpointing
            memory.register_zero3_externals(model)
            self.built = memory.partition_report(model)  # before deepspeed.initialize: zero.Init's doing
            if self.built["partitioned"]:
                _rank_print(
                    f"stage {stage.stage}: built partitioned (deepspeed.zero.Init): rank 0 holds "
                    f"{self.built['local'] / 1e6:,.1f}M of {self.built['full'] / 1e6:,.1f}M parameters"
                )
            # 6·N per token for the LLM's non-embedding weights (the towers only see their own tokens)
            llm = [p for n, p in model.named_parameters() if n.startswith(("model.layers.", "lm_head."))]
            self.flops_per_token = 6 * sum(memory.full_numel(p) for p in llm)
        if self.sp is not None:
            check_heads(model.llm_config.num_attention_heads, model.llm_config.num_key_value_heads, self.sp.size)
            self.sp.grad_scale = zero3_grad_scale(deepspeed_config(stage, "cpu"), self.sp.size)
            model.sequence_parallel = self.sp
        self.peak = peak_flops()
        groups = param_groups(model, stage.lr, stage.weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=stage.lr["default"], betas=stage.betas, weight_decay=stage.weight_decay
        )
        device_type = deepspeed.get_accelerator().device_name()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(stage, device_type), mpu=self.mpu
        )
        self.device = self.engine.device
        self.step, self.tokens, self.samples = 0, 0, 0
        data_state = None
        tag = self._committed_tag()
        if tag is not None:
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag, load_module_strict=True)
            self.step, self.tokens, self.samples = client["step"], client["tokens"], client["samples"]
            data_state = json.loads((self.ckpt_dir / tag / f"data_rank{self.rank:05d}.json").read_text())
            _rank_print(f"stage {stage.stage}: resumed at step {self.step} from {self.ckpt_dir / tag}")
        entries = [resolve_entry(e, stage.allow_uris, stage.verify_shards) for e in stage.mixture]
        self.position = (
            DataPosition.from_dict(data_state) if data_state else DataPosition(self.dp_world, stage.num_workers)
        )
        if stage.is_audio:
            from trainer.audio_data import make_clip_loader

            max_seconds = float(stage.task_args.get("max_seconds", 30.0))
            self.loader = make_clip_loader(
                entries,
                model_cfg,
                max_seconds,
                stage.micro_batch,
                stage.seed,
                self.dp_rank,
                self.dp_world,
                stage.num_workers,
                data_state,
            )
        else:
            self.loader = make_loader(
                entries,
                model_cfg,
                tokenizer_path,
                stage.seq_len,
                stage.micro_batch,
                stage.seed,
                self.dp_rank,
                self.dp_world,
                stage.num_workers,
                data_state,
            )
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))

    def _audio_module(self, model_cfg: dict[str, Any]) -> torch.nn.Module:
        """The audio task's module; stage 0.2 gets stage 0.1's export as its frozen tokenizer."""
        import importlib

        module_name, fn = AUDIO_BUILDERS[self.stage.task]
        args = unset_to_none(self.stage.task_args)
        weights = self.stage.audio_tokenizer_weights()
        if weights is not None:
            if not weights.is_file():
                raise FileNotFoundError(f"stage {self.stage.stage}: audio tokenizer {weights} does not exist")
            args["audio_tokenizer_from"] = str(weights)
        args.setdefault("tokenizer", self.tokenizer_path)
        module = getattr(importlib.import_module(module_name), fn)(model_cfg, args, self.out)
        init = self.stage.init_weights()
        if init is not None:  # continue an audio stage from an earlier export of the same task
            if not init.is_file():
                raise FileNotFoundError(f"stage {self.stage.stage} starts from {init}, which does not exist")
            module.load_state_dict(torch.load(init, map_location="cpu", weights_only=True), strict=True)
        return module

    # ---- checkpoints

    def _committed_tag(self) -> str | None:
        marker = self.ckpt_dir / "committed"
        return marker.read_text().strip() if marker.is_file() else None

    def save(self) -> None:
        import torch.distributed as dist

        tag = f"step{self.step:08d}"
        _write_json(self.ckpt_dir / tag / f"data_rank{self.rank:05d}.json", self.position.as_dict())
        client = {"step": self.step, "tokens": self.tokens, "samples": self.samples}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            tmp = self.ckpt_dir / f".tmp-committed-{os.getpid()}"
            tmp.write_text(tag)
            os.replace(tmp, self.ckpt_dir / "committed")
            old = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir() and p.name != tag)
            for p in old[: -(KEEP_CHECKPOINTS - 1)] if KEEP_CHECKPOINTS > 1 else old:
                shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def export(self, seconds: float) -> None:
        import torch.distributed as dist

        final = self.out / "final"
        final.mkdir(parents=True, exist_ok=True)
        self.engine.save_16bit_model(str(final), "model.pt")
        dist.barrier()
        if self.rank == 0:
            _write_json(
                final / "done.json",
                {
                    "stage": self.stage.stage,
                    "steps": self.step,
                    "tokens": self.tokens,
                    "samples": self.samples,
                    "seconds": round(seconds, 1),
                    "trainable": self.trainable,
                    "task": self.stage.task,
                    "model_config": self.model_cfg,
                    "tokenizer": str(Path(self.tokenizer_path).resolve()),
                },
            )
        dist.barrier()

    # ---- the loop

    def done(self) -> bool:
        b = self.stage.budget
        return ("steps" in b and self.step >= b["steps"]) or ("tokens" in b and self.tokens >= b["tokens"])

    def progress(self) -> float:
        b = self.stage.budget
        return max(self.step / b["steps"] if "steps" in b else 0.0, self.tokens / b["tokens"] if "tokens" in b else 0.0)

    def run(self) -> None:
        import torch.distributed as dist

        from trainer.data import to_device
        from trainer.model import TAGS

        stage = self.stage
        it = iter(self.loader)
        t_start = time.perf_counter()
        window_t, window_tokens, window_samples = time.perf_counter(), 0, 0
        while not self.done():
            factor = lr_factor(stage, self.step, self.progress())
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * factor
            losses, tag_loss, tag_count, ids = [], 0, 0, []
            metrics: dict[str, float] = {}
            local = torch.zeros(2, dtype=torch.float64)
            for _ in range(stage.grad_accum):
                batch = next(it)
                out = self.engine(**to_device(batch, self.device))
                self.engine.backward(out["loss"])
                self.engine.step()
                self.position.consumed(batch["meta"])
                losses.append(out["loss"].detach().float())
                if stage.is_audio:  # an audio task reports named metrics instead of per-tag losses
                    for k, v in out["metrics"].items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / stage.grad_accum
                else:
                    tag_loss = tag_loss + out["tag_loss"].detach().double().cpu()
                    tag_count = tag_count + out["tag_count"].detach().double().cpu()
                if self.sp is None or self.sp.rank == 0:  # a sequence-parallel group counts its batch once
                    local += torch.tensor([batch["meta"]["tokens"], batch["meta"]["samples"]], dtype=torch.float64)
                ids.extend(batch["meta"]["sample_ids"])
            names = sorted(metrics)
            extra = (
                torch.tensor([metrics[k] for k in names], dtype=torch.float64)
                if stage.is_audio
                else torch.cat([tag_loss, tag_count])
            )
            stats = torch.cat([torch.stack(losses).mean().double().cpu().view(1), local, extra])
            stats = stats.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(stats)
            stats = stats.cpu()
            all_ids: list[Any] = [None] * self.world
            dist.all_gather_object(all_ids, ids)
            loss = float(stats[0]) / self.world
            step_tokens, step_samples = int(stats[1]), int(stats[2])
            if stage.is_audio:
                by_tag = {k: float(stats[3 + i]) / self.world for i, k in enumerate(names)}
            else:
                n = len(TAGS)
                by_tag = {t: float(stats[3 + i] / stats[3 + n + i]) for i, t in enumerate(TAGS) if stats[3 + n + i] > 0}
            self.step += 1
            self.tokens += step_tokens
            self.samples += step_samples
            window_tokens += step_tokens
            window_samples += step_samples
            if self.rank == 0:
                record = {
                    "step": self.step,
                    "loss": loss,
                    ("metrics" if stage.is_audio else "by_tag"): by_tag,
                    "tokens": self.tokens,
                    "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                    "sample_ids": all_ids,
                    "skipped_rank0": sum(
                        (Counter(w.get("skipped", {})) for w in self.position.workers.values()), Counter()
                    ),
                }
                with open(self.out / "steps.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                self.writer.add_scalar("loss/total", loss, self.step)
                for t, v in by_tag.items():
                    self.writer.add_scalar(f"{'audio' if stage.is_audio else 'loss'}/{t}", v, self.step)
                for g in self.optimizer.param_groups:
                    self.writer.add_scalar(f"lr/{g['name']}", g["lr"], self.step)
            if self.step % stage.log_every == 0 or self.done():
                dt = max(time.perf_counter() - window_t, 1e-9)
                tps, sps = window_tokens / dt, window_samples / dt
                mfu = self.flops_per_token * tps / (self.peak * self.world) if self.peak else None
                if self.writer is not None:
                    self.writer.add_scalar("throughput/tokens_per_s", tps, self.step)
                    self.writer.add_scalar("throughput/samples_per_s", sps, self.step)
                    if mfu is not None:
                        self.writer.add_scalar("throughput/mfu", mfu, self.step)
                    self.writer.flush()
                tags = " ".join(f"{t} {v:.3f}" for t, v in by_tag.items())
                budget = int(stage.budget.get("steps", 0)) or f"{self.tokens}/{int(stage.budget['tokens'])} tok"
                _rank_print(
                    f"stage {stage.stage} step {self.step}/{budget} loss {loss:.4f} [{tags}] "
                    f"{tps:,.0f} tokens/s {sps:.2f} samples/s" + (f" MFU {mfu:.1%}" if mfu is not None else "")
                )
                window_t, window_tokens, window_samples = time.perf_counter(), 0, 0
            if self.step % stage.save_every == 0 and not self.done():
                self.save()
        del it  # shuts the loader's workers down before the process leaves with os._exit
        self.save()
        self.export(time.perf_counter() - t_start)
        if self.writer is not None:
            self.writer.close()


def no_cpu_op_builds() -> None:
    """On CPU, skip DeepSpeed's JIT build of ``deepspeed_shm_comm`` (a shared-memory all-reduce that only
    ``inference_all_reduce`` uses; training all-reduces over gloo). The build took ~30 s per fresh
    machine, and a rank killed during it left a lock that made every later run wait forever.

    DeepSpeed builds the op at ``init_distributed`` only when its cached compatibility table says it
    can; the table is a module attribute that keeps edits, so marking the op incompatible skips it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    try:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except AttributeError:  # another DeepSpeed: the launcher's lock sweep and the bounded wait still apply
        log.warning("cannot skip DeepSpeed's %s build on this version; it may JIT-compile", builder.NAME)


def run_stages(stage_paths: list[str], overrides: list[str], tokenizer_path: str, mixtures: str | None = None) -> None:
    import deepspeed

    from trainer.stages import load_stage

    backend = "gloo" if deepspeed.get_accelerator().device_name() == "cpu" else None
    no_cpu_op_builds()
    deepspeed.init_distributed(dist_backend=backend)
    for path in stage_paths:
        stage = load_stage(path, overrides, mixtures)
        if (stage.out_dir / "final" / "done.json").is_file():
            _rank_print(f"stage {stage.stage}: already finished ({stage.out_dir / 'final'}), skipped")
            continue
        what = f"the {stage.task.replace('_', ' ')}" if stage.is_audio else ", ".join(stage.trainable)
        _rank_print(f"stage {stage.stage} ({stage.name}): training {what}")
        StageRun(stage, tokenizer_path).run()


def die_with_launcher() -> None:
    """torchrun starts every rank in its own session: without this, SIGKILL to the launcher's process
    group would leave the ranks training (and writing checkpoints) as orphans."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one rank of an omni training run (use `omni train`)")
    p.add_argument("--stage", action="append", required=True, help="stage YAML (repeat to chain stages)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    p.add_argument("--mixtures", help="folder of omni plan --mixtures: DIR/mixture-<stage>.yaml replaces a mixture")
    args = p.parse_args(argv)
    die_with_launcher()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import torch.distributed as dist

    from trainer.launch import BuildLockTimeout, bound_build_waits

    bound_build_waits()
    code = 0
    try:
        run_stages(args.stage, args.overrides, args.tokenizer, args.mixtures)
    except BuildLockTimeout as e:
        print(f"omni: error: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    if code == 0 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)  # a gloo race at interpreter exit can abort a finished rank (docs/STACK.md)


if __name__ == "__main__":
    main()
