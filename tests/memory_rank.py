"""One rank of tests/test_memory.py's ZeRO-3 run (started by torchrun): builds the stage's model the way
``StageRun`` does, reports what this rank holds, then trains and exports the stage.

Usage: memory_rank.py STAGE.yaml TOKENIZER_DIR REPORT_DIR"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    stage_yaml, tokenizer_dir, report_dir = sys.argv[1:4]
    import deepspeed
    import torch.distributed as dist

    from trainer import memory
    from trainer.model import build_model
    from trainer.stages import load_stage
    from trainer.tokenizer import load_tokenizer
    from trainer.train import StageRun, deepspeed_config, no_cpu_op_builds

    no_cpu_op_builds()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    stage = load_stage(stage_yaml)
    cfg, tokenizer = stage.model_config(), load_tokenizer(tokenizer_dir)

    # a random model built partitioned equals the plain build with the same seed, on every rank
    torch.manual_seed(5)
    plain = build_model(cfg, tokenizer, pretrained="none").state_dict()
    torch.manual_seed(5)
    with memory.partitioned_build(deepspeed_config(stage, "cpu")):
        built = build_model(cfg, tokenizer, pretrained="none")
    mismatches = []
    for name, p in built.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.data, plain[name]):
                mismatches.append(name)
    del built, plain

    run = StageRun(stage, tokenizer_dir)
    status = sorted({p.ds_status.name for p in run.engine.module.parameters()})
    report = {
        **run.built,
        "build_mismatches": mismatches,
        "ds_status_before_forward": status,
        "checkpointed": run.checkpointed,
    }
    run.run()
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
