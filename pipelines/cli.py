"""The ``omni`` command: run recipes, audit runs, inspect shards, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipelines.errors import describe_error, first_line  # noqa: E402  (after the environment is set)

if TYPE_CHECKING:
    from pipelines.recipe import Recipe


class UserError(Exception):
    """Anything the user can fix; printed as one line, exit status 2."""


def _same_path(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _limit_output(args: argparse.Namespace, recipe: Recipe) -> str:
    """Where a ``--limit N`` run writes: ``--output``, else the recipe's output with ``-limit-N``;
    never the recipe's own output (the corpus run)."""
    from pipelines.recipe import RecipeError, load_recipe

    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    if not args.output:
        return f"{recipe.output.rstrip('/')}-limit-{args.limit}"
    try:
        own = load_recipe(args.recipe, overrides=args.overrides).output
    except RecipeError:  # the recipe names no output of its own: nothing to protect
        return recipe.output
    if _same_path(recipe.output, own):
        raise UserError(f"--limit writes a scratch run; --output must not be the recipe's output {own}")
    return recipe.output


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.recipe import load_recipe

    recipe = load_recipe(args.recipe, output=args.output, overrides=args.overrides)
    if args.limit is not None:
        recipe.output = _limit_output(args, recipe)
        recipe.sample_limit = args.limit
        print(
            f"omni run --limit {args.limit}: a scratch run of the first {args.limit} inputs of each source "
            f"-> {recipe.output}"
        )
    if args.ray_address:
        recipe.executor["address"] = args.ray_address
    if args.dry_run:
        from pipelines.dryrun import dry_run, format_dry_run

        print(format_dry_run(dry_run(recipe, executor=args.executor)))
        return 0
    from pipelines.executor import run_recipe

    args.writes_to = recipe.output  # what a "disk full" names when the OS names no file
    t0 = time.perf_counter()
    manifest = run_recipe(
        recipe,
        executor=args.executor,
        progress=not args.quiet,
        repair=args.repair,
        verbose=args.verbose,
        dashboard=args.dashboard,
    )
    limited = f" (limited to {args.limit} inputs per source)" if args.limit is not None else ""
    print(
        f"{recipe.name}: ingested {manifest['ingested']}, written {manifest['written']}, "
        f"rejected {manifest['rejected']} in {time.perf_counter() - t0:.1f}s -> {recipe.output}{limited}"
    )
    return 0


def _cmd_ops(args: argparse.Namespace) -> int:
    from pipelines.catalogue import COMMANDS, catalogue, format_detail, format_list, lookup, markdown

    if args.name in COMMANDS and args.name not in {info.name for info in catalogue()}:
        print(f"{args.name} is a command, not an operator: {COMMANDS[args.name]}")
        return 0
    if args.markdown:
        infos = [lookup(args.name)] if args.name else catalogue()
        parent = os.path.dirname(args.markdown)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(infos))
        print(f"wrote {args.markdown}: {len(infos)} operator{'s' if len(infos) != 1 else ''}")
    elif args.name:
        print(format_detail(lookup(args.name)))
    else:
        print(format_list(catalogue()))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from pipelines.audit import audit

    report = audit(args.run_dir, progress=sys.stderr.isatty())
    print(report.summary())
    for reason, n in report.rejects_by_reason.most_common():
        print(f"  rejected {n:>5} × {reason}")
    return 0 if report.balanced else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.inspect_shards import examine

    result = examine(args.target, limit=args.n)
    print(result.text)
    return 1 if result.damaged else 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from pipelines.stats import collect, format_stats, stats_report

    report = stats_report(collect(args.targets))
    print(json.dumps(report, indent=1) if args.json else format_stats(report))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pipelines.plan import (
        PlanError,
        format_plan,
        load_corpus,
        make_plan,
        missing_message,
        missing_shard_sets,
        plan_mixtures,
        write_mixtures,
    )

    def warn(message: str) -> None:
        print(f"omni plan: warning: {message}", file=sys.stderr)

    try:
        corpus = load_corpus(args.corpus)
        plan = make_plan(corpus, args.have, bench_path=args.bench)
        if args.mixtures:
            write_mixtures(plan, corpus, args.have, args.mixtures, strict=args.strict, warn=warn)
        elif args.strict:  # the same check without writing: which shard sets the stages' mixtures lack
            missing = missing_shard_sets(plan_mixtures(corpus, args.have))
            if missing:
                raise PlanError(missing_message(missing))
    except PlanError as e:
        raise UserError(str(e)) from e
    print(format_plan(plan))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipelines.report import write_report

    print(write_report(args.run_dir, args.out, max_samples=args.max_samples))
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from pipelines.viewer import serve

    print(f"omni view: http://127.0.0.1:{args.port}/  (Ctrl-C to stop)")
    serve(args.target, port=args.port)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.out, executor=args.executor)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omni", description="omnicorpus: omni-modal corpora on Ray, trained with DeepSpeed"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run or resume a pipeline recipe")
    r.add_argument("recipe", help="pipeline recipe (YAML)")
    r.add_argument("--output", help="run directory (overrides the recipe's 'output')")
    r.add_argument("--executor", choices=("ray", "local"), help="override the recipe's executor")
    r.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dashboard", action="store_true", help="serve Ray's dashboard on 127.0.0.1 (a local Ray)")
    r.add_argument(
        "--repair", action="store_true", help="also re-hash every committed shard (sha256) and redo damaged units"
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a recipe value (YAML), checked by the schema, e.g. --set pipeline.0.params.max_pixels=1000000",
    )
    r.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="a scratch run of the first N inputs (samples or rejects) of each source, into OUTPUT-limit-N "
        "(or --output, never the recipe's output)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="check and plan the recipe, print its sources, units and steps; write nothing",
    )
    r.set_defaults(fn=_cmd_run)

    o = sub.add_parser("ops", help="the registered operators: purpose, parameters (type, default, meaning), resources")
    o.add_argument("name", nargs="?", help="one operator, in detail")
    o.add_argument(
        "--markdown",
        nargs="?",
        const="docs/operators.md",
        metavar="PATH",
        help="write the catalogue as Markdown (default docs/operators.md)",
    )
    o.set_defaults(fn=_cmd_ops)

    a = sub.add_parser("audit", help="prove ingested = written + rejected for a run")
    a.add_argument("run_dir")
    a.set_defaults(fn=_cmd_audit)

    i = sub.add_parser("inspect", help="print counts and sample previews of a shard, shard dir or run")
    i.add_argument("target")
    i.add_argument("-n", type=int, default=5, help="samples to preview (default 5)")
    i.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("stats", help="token totals by data type, modality, language and source")
    s.add_argument("targets", nargs="+", help="run dirs, shard dirs or shard-set manifest files")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_stats)

    pl = sub.add_parser("plan", help="gap between a target corpus and the manifests, and its compute cost")
    pl.add_argument("corpus", help="target corpus YAML, e.g. conf/corpus/omni500b.yaml")
    pl.add_argument("--have", nargs="*", default=[], help="run dirs / shard dirs / manifests already produced")
    pl.add_argument("--bench", help="bench results JSON (python -m bench.run_all --out FILE) for measured rates")
    pl.add_argument(
        "--mixtures",
        metavar="DIR",
        help="write DIR/mixture-<stage>.yaml for every training stage (for omni train-all --mixtures DIR); "
        "entries no --have shard set holds are dropped with a warning, the other weights renormalised",
    )
    pl.add_argument(
        "--strict",
        action="store_true",
        help="stop (exit 2) naming the shard sets a stage's mixture needs and no --have run holds, "
        "instead of dropping them",
    )
    pl.set_defaults(fn=_cmd_plan)

    rp = sub.add_parser("report", help="write an HTML report with plots for a finished run")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="folder for report.html and its plots (default RUN_DIR/report)")
    rp.add_argument("--max-samples", type=int, default=50_000, help="samples read for histograms")
    rp.set_defaults(fn=_cmd_report)

    v = sub.add_parser("view", help="browse samples of a run or shard set in a local web page")
    v.add_argument("target", help="run dir, shard dir or a .tar")
    v.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    v.set_defaults(fn=_cmd_view)

    d = sub.add_parser("demo", help="build a small multimodal source set and run the pipeline on it")
    d.add_argument("--out", default="demo_out", help="where sources and the run go (default demo_out)")
    d.add_argument("--executor", choices=("ray", "local"), default="ray")
    d.set_defaults(fn=_cmd_demo)

    from filters.cli import register as register_dedup
    from trainer.cli import register as register_train

    register_dedup(sub)  # omni dedup
    register_train(sub)  # omni train, omni train-all
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from pipelines.operator import UnknownOperator
    from pipelines.overrides import OverrideError
    from pipelines.recipe import RecipeError
    from pipelines.rundir import ResumeRefused

    try:
        return args.fn(args)
    except (UserError, RecipeError, ResumeRefused, UnknownOperator, OverrideError) as e:
        message = first_line(e)
    except Exception as e:  # a full disk, refused credentials, an unreachable endpoint: one line too
        message = describe_error(e, getattr(args, "writes_to", None))
        if message is None:
            raise
        logging.getLogger("omni").info("the error in full:", exc_info=True)  # shown with -v
    print(f"omni: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
