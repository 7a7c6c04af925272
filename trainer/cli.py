"""``omni train STAGE.yaml`` and ``omni train-all``: registered into the ``omni`` command by pipelines/cli.py.

Also runnable alone: ``python -m trainer.cli train conf/stages/1.1-image-projector.yaml --nproc 2``.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.stages import CONF_DIR, StageError


def _user_error(msg: str) -> Exception:
    from pipelines.cli import UserError

    return UserError(msg)


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a stage field, e.g. --set budget.steps=10 --set output=runs/x",
    )
    p.add_argument("--nproc", type=int, help="ranks on this machine (default: GPUs, or 2 on CPU)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (uses the deepspeed launcher)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address (multi-node: a reachable IP)")
    p.add_argument("--master-port", type=int, help="rendezvous port (default: a free one)")


def _check(args: argparse.Namespace) -> None:
    if args.nproc is not None and args.nproc < 1:
        raise _user_error(f"--nproc must be at least 1, not {args.nproc}")
    if args.hostfile and not os.path.isfile(args.hostfile):
        raise FileNotFoundError(f"no hostfile {args.hostfile}")
    for o in args.overrides:
        if "=" not in o:
            raise _user_error(f"--set {o!r} is not KEY=VALUE")


def _run(stages: list, args: argparse.Namespace) -> int:
    from trainer.data import resolve_entry
    from trainer.launch import launch

    for stage in stages:  # a missing manifest or an empty kind filter fails here, before any rank starts
        for entry in stage.mixture:
            try:
                resolve_entry(entry, stage.allow_uris, stage.verify_shards)
            except (ValueError, KeyError) as e:
                raise _user_error(f"stage {stage.stage}: {e}") from e
    return launch(stages, args.overrides, args.nproc, args.hostfile, args.master_addr, args.master_port)


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.stages import load_stage

    _check(args)
    try:
        stage = load_stage(args.stage, args.overrides)
    except StageError as e:
        raise _user_error(str(e)) from e
    return _run([stage], args)


def _cmd_train_all(args: argparse.Namespace) -> int:
    from trainer.stages import discover_stages, stage_key

    _check(args)
    try:
        stages = discover_stages(args.stages, args.overrides)
        if args.until:
            stages = [s for s in stages if stage_key(s.stage) <= stage_key(args.until)]
    except StageError as e:
        raise _user_error(str(e)) from e
    if not stages:
        raise _user_error(f"no stage up to {args.until} in {args.stages}")
    return _run(stages, args)


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train", help="train one stage (conf/stages/*.yaml) with DeepSpeed")
    t.add_argument("stage", help="stage config YAML")
    _launch_args(t)
    t.set_defaults(fn=_cmd_train)

    a = subparsers.add_parser("train-all", help="train every stage in paper order, each from the previous one")
    a.add_argument("--stages", default=str(CONF_DIR / "stages"), help="directory of stage YAMLs")
    a.add_argument("--until", help="stop after this stage id (e.g. 2.2)")
    _launch_args(a)
    a.set_defaults(fn=_cmd_train_all)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import UserError

    parser = argparse.ArgumentParser(prog="omni", description="omni-modal staged training with DeepSpeed")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (UserError, FileNotFoundError) as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
