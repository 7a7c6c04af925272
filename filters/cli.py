"""``omni dedup``: exact and near-duplicate removal over a finished run or a shard set.

The lead wires it into ``pipelines.cli`` with ``filters.cli.register(subparsers)``.

    omni dedup RUN_DIR [--config dedup.yaml | recipe.yaml] [--work DIR] [--dry-run]
    omni dedup SHARD_DIR --out DIR [...]

A config file is either a recipe (its ``dedup:`` block is used) or a file holding only that block.
Re-running the same command resumes at the first unfinished phase.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import yaml


def load_config(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dedup settings, executor settings) from a dedup YAML or a recipe's ``dedup:`` block."""
    if not path:
        return {}, {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such dedup config: {path}")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a dedup config must be a YAML mapping")
    if "sources" in doc or "dedup" in doc:  # a recipe
        return dict(doc.get("dedup") or {}), dict(doc.get("executor") or {})
    return doc, {}


def _cmd_dedup(args: argparse.Namespace) -> int:
    import sys

    from filters.dedup import run_dedup
    from filters.dedup.inputs import NotReady
    from filters.dedup.workdir import DedupRefused

    if args.workers is not None and args.workers < 1:
        print(f"omni: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        settings, executor = load_config(args.config)
        if args.ray_address:
            executor["address"] = args.ray_address
        report = run_dedup(
            args.target,
            work_dir=args.work,
            config=settings,
            apply=not args.dry_run,
            out=args.out,
            ray_settings=executor or None,
            progress=not args.quiet,
            executor=args.executor,
            workers=args.workers,
        )
    except (NotReady, DedupRefused, ValueError, FileNotFoundError) as e:  # mistakes a user can fix
        print(f"omni: error: {e}", file=sys.stderr)
        return 2
    methods = report["phases"]["duplicates"].get("by_method", {})
    print(
        f"dedup: {report['duplicates']} of {report['samples']} samples are duplicates "
        f"({', '.join(f'{k} {v}' for k, v in sorted(methods.items())) or 'none'})"
        + ("" if args.dry_run else f"; applied to {args.out or args.target}")
    )
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``dedup`` to the ``omni`` command's subparsers."""
    p = subparsers.add_parser("dedup", help="remove exact and near-duplicates from a finished run or shard set")
    p.add_argument("target", help="a finished run directory, or a shard directory with manifest.json")
    p.add_argument("--config", help="dedup settings: a YAML file, or a recipe with a 'dedup:' block")
    p.add_argument("--work", help="phase directory (default: TARGET/dedup/<config hash>)")
    p.add_argument("--out", help="for a shard set: where the filtered copy goes")
    p.add_argument("--dry-run", action="store_true", help="find duplicates, change nothing")
    p.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one")
    p.add_argument(
        "--executor",
        choices=("auto", "local", "ray"),
        default="auto",
        help="where the tasks run: Ray tasks (a cluster, or a local Ray), a local process pool, or"
        " auto: Ray when a cluster is named or Ray is running, else the local pool",
    )
    p.add_argument("--workers", type=int, help="local pool size, or a local Ray's CPUs (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the full report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_dedup)
    return p
