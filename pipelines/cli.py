"""The ``omni`` command: run recipes, audit runs, inspect shards, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipelines.errors import describe_error, first_line  # noqa: E402  (after the environment is set)


class UserError(Exception):
    """Anything the user can fix; printed as one line, exit status 2."""


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.executor import run_recipe
    from pipelines.recipe import load_recipe

    recipe = load_recipe(args.recipe, output=args.output)
    args.writes_to = recipe.output  # what a "disk full" names when the OS names no file
    if args.ray_address:
        recipe.executor["address"] = args.ray_address
    t0 = time.perf_counter()
    manifest = run_recipe(
        recipe,
        executor=args.executor,
        progress=not args.quiet,
        repair=args.repair,
        verbose=args.verbose,
        dashboard=args.dashboard,
    )
    print(
        f"{recipe.name}: ingested {manifest['ingested']}, written {manifest['written']}, "
        f"rejected {manifest['rejected']} in {time.perf_counter() - t0:.1f}s -> {recipe.output}"
    )
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
    from pipelines.plan import format_plan, load_corpus, make_plan, write_mixtures

    corpus = load_corpus(args.corpus)
    plan = make_plan(corpus, args.have, bench_path=args.bench)
    if args.mixtures:
        write_mixtures(plan, corpus, args.have, args.mixtures)
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
    r.set_defaults(fn=_cmd_run)

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
    pl.add_argument("--mixtures", help="write one mixture YAML per training stage into this folder")
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
    from pipelines.recipe import RecipeError
    from pipelines.rundir import ResumeRefused

    try:
        return args.fn(args)
    except (UserError, RecipeError, ResumeRefused, UnknownOperator) as e:
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
