"""Ray Data executor: the recipe as a streaming DAG, units committed by the driver as they finish.

    units ─► read (tasks) ─► step 1 ─► ... ─► step N (tasks, or actor pools for stateful ops)
          ─► write shards + ledger part (tasks) ─► driver: commit unit when all inputs are counted

One unit is one block and ops take whole blocks, so units stay together; the writer still copes
with a unit split across blocks (each part gets its own files, the driver adds parts up). Nothing
here is needed to test operators: they are plain Python over Arrow tables.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, ClassVar

import pyarrow as pa
import ray
from tqdm import tqdm

from pipelines.errors import UserFixable, describe_error
from pipelines.operator import Operator, Resources, get_operator
from pipelines.recipe import Recipe, StepSpec, parse_size
from pipelines.units import CommitTracker, apply_step, build_operator, read_unit_table, stage_name, write_units
from shards import storage

log = logging.getLogger(__name__)
GPU_BLOCK_ROWS = 256  # rows Ray hands a GPU actor per call when the step sets no batch_size


Chain = list[tuple[dict[str, Any], str, int | None]]  # (step, stage name, batch size) run one after another


class _ChainActor:
    """Holds the operators of one Ray stage (and their models) for the lifetime of a Ray actor; they
    load when the actor starts, so a pool's models load side by side before the first batch arrives.

    Each stage gets its own subclass (``_actor_class``) that carries its steps in class attributes, not
    constructor arguments: Ray keeps those in the object store and warns on every actor it starts."""

    chain: ClassVar[Chain]
    storage_opts: ClassVar[dict[str, Any]]
    imports: ClassVar[list[str]]

    def __init__(self) -> None:
        self.run = _ChainRunner(self.chain, self.storage_opts, self.imports)
        self.run.load()

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.run(table)


def _actor_class(chain: Chain, storage_opts: dict[str, Any], imports: list[str]) -> type[_ChainActor]:
    attrs = {"chain": chain, "storage_opts": storage_opts, "imports": imports}
    return type("Stage_" + "_".join(stage.replace("-", "_") for _, stage, _ in chain), (_ChainActor,), attrs)


class _ChainRunner:
    """Applies a stage's steps in order. As a task function its operators are built (and set up) on
    the first call, once per worker process, not per batch."""

    def __init__(self, chain: Chain, storage_opts: dict[str, Any], imports: list[str]) -> None:
        self.chain, self.storage_opts, self.imports = chain, storage_opts, imports
        self.ops: list[tuple[Operator, str, int | None]] = []

    def load(self) -> None:
        storage.configure(**self.storage_opts)
        for step, stage, batch_size in self.chain:
            op = build_operator(StepSpec(**step), self.imports)
            op.setup()
            self.ops.append((op, stage, batch_size))

    def __call__(self, table: pa.Table) -> pa.Table:
        if not self.ops:
            self.load()
        for op, stage, batch_size in self.ops:
            table = apply_step(op, stage, table, batch_size)
        return table


def stage_groups(steps: list[StepSpec], resources: list[Resources]) -> list[list[int]]:
    """Steps that run as one Ray stage: consecutive CPU steps that keep their operators' declared
    resources share a stage (one actor pool, or one task, that applies them in turn), so a unit's
    table crosses the object store once instead of once per step. A step with GPUs or with recipe
    ``resources`` is a stage of its own, sized as the recipe says."""
    groups: list[list[int]] = []
    fusable_tail = False
    for i, (step, res) in enumerate(zip(steps, resources, strict=True)):
        fusable = res.gpus == 0 and not step.resources
        if fusable and fusable_tail:
            groups[-1].append(i)
        else:
            groups.append([i])
        fusable_tail = fusable
    return groups


def group_resources(members: list[Resources]) -> Resources:
    """One stage's needs: its largest CPU and GPU ask, its members' memory together."""
    if len(members) == 1:
        return members[0]
    return Resources(
        cpus=max(r.cpus for r in members),
        gpus=max(r.gpus for r in members),
        memory_mb=sum(r.memory_mb for r in members),
    )


def init_ray(settings: dict[str, Any], verbose: bool = False, dashboard: bool = False) -> None:
    """Join ``address`` (a cluster; ``auto`` or RAY_ADDRESS, which ``ray job submit`` sets) or start a
    private local Ray on loopback, never silently joining some other cluster on this machine.

    Ray's own start-up lines, its workers' log lines and Ray Data's plans stay quiet unless ``verbose``;
    ``dashboard`` serves Ray's dashboard on 127.0.0.1 (a local Ray; a cluster has its own)."""
    if ray.is_initialized():
        return
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    log_to_driver = bool(settings.get("log_to_driver", verbose))
    address = settings.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **quiet)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not verbose:  # Ray >= 2.60 turns token authentication on for a local Ray (its token in ~/.ray/auth_token,
        # generated once) and warns that it did on every start; it stays on, the warning goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    dashboard = dashboard or bool(settings.get("dashboard", False))
    context = ray.init(
        address="local",
        num_cpus=int(settings.get("num_cpus", os.cpu_count() or 1)),
        num_gpus=settings.get("num_gpus"),  # None: Ray counts the machine's GPUs
        object_store_memory=parse_size(settings.get("object_store_memory", "1GB")),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=int(settings.get("dashboard_port", 8265)),
        _node_ip_address="127.0.0.1",
        log_to_driver=log_to_driver,
        **quiet,
    )
    if dashboard:
        url = context.dashboard_url or "127.0.0.1:8265"
        token = " (sign in with the token `ray get-auth-token` prints)" if _token_auth() else ""
        print(f"omni: Ray dashboard at http://{url.removeprefix('http://')}{token}", flush=True)


def _token_auth() -> bool:
    """Whether this Ray wants its token (Ray >= 2.52; its module is private, so an older Ray says no)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return False
    return is_token_auth_enabled()


def pool_sizes(res: Resources, share: float, cluster_gpus: float) -> tuple[int, int]:
    """(min, max) actors of a stateful step: the recipe's ``concurrency``, else as many as the cluster
    holds: a fixed pool of one actor per ``gpus`` of its GPUs (Ray's autoscaler adds actors one by one,
    too slowly to fill a GPU cluster), or up to ``share`` of its CPUs over ``cpus`` per actor."""
    if isinstance(res.concurrency, tuple):
        return res.concurrency
    if res.concurrency:
        return res.concurrency, res.concurrency
    if res.gpus > 0:
        fill = max(1, int(cluster_gpus / res.gpus + 1e-9))
        return fill, fill
    return 1, max(1, int(share / max(res.cpus, 1e-9) + 1e-9))


def cpu_reservations(
    resources: list[Resources], stateful: list[bool], pools: list[tuple[int, int]], cluster_cpus: float
) -> list[float]:
    """Logical CPUs to reserve per actor or task of each step, so the DAG can always make progress.

    Actor pools hold their CPUs for the whole run; when their largest size would hold every CPU, the
    read, stateless and write tasks could never be scheduled and the run would hang (two model steps
    on a 2-CPU laptop do exactly that). Then the actors' reservations shrink in proportion until one
    CPU is left for tasks. Reservations are scheduling tokens: an actor still uses a whole core when
    it runs. No step asks for more than the cluster has.
    """
    wanted = [min(r.cpus, cluster_cpus) for r in resources]
    held = sum(c * pool[1] for c, keeps, pool in zip(wanted, stateful, pools, strict=True) if keeps)
    budget = max(cluster_cpus - 1, cluster_cpus / 2)
    if held <= budget:
        return wanted
    scale = budget / held
    log.info(
        "actor steps would hold %.2g of %.2g CPUs and starve the other tasks; reserving %.0f%% of what they ask",
        held,
        cluster_cpus,
        100 * scale,
    )
    return [c * scale if keeps else c for c, keeps in zip(wanted, stateful, strict=True)]


def check_fits(recipe: Recipe, resources: list[Resources], cluster: dict[str, float]) -> None:
    """A step asking for GPUs (or more of them than a node can give) would wait forever: say so now."""
    gpus = float(cluster.get("GPU", 0))
    for i, (step, res) in enumerate(zip(recipe.steps, resources, strict=True)):
        if res.gpus > gpus:
            have = f"{gpus:g} GPUs" if gpus else "no GPUs"
            raise UserFixable(
                f"pipeline[{i}] ({step.op}) asks for {res.gpus:g} GPUs per actor but the Ray cluster has {have}"
                " (set resources: {gpus: ...}, executor.num_gpus for a local Ray, or use the CPU operator)"
            )


def run_ray(
    recipe: Recipe,
    pending: list[dict[str, Any]],
    tracker: CommitTracker,
    progress: bool,
    verbose: bool = False,
    dashboard: bool = False,
) -> None:
    settings = recipe.executor
    init_ray(settings, verbose=verbose, dashboard=dashboard)
    with warnings.catch_warnings():  # Ray's own defaults set its deprecated fields when it builds the context
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(settings.get("ray_progress_bars", False))
    ctx.print_on_execution_start = verbose
    if not verbose:  # its plans, "progress bars disabled" and "execution finished" lines
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx.target_max_block_size = parse_size(settings.get("max_block_bytes", "1GB"))
    opts = storage.storage_options()

    def read(batch: pa.Table) -> pa.Table:
        storage.configure(**opts)
        tables = [read_unit_table(json.loads(u), recipe) for u in batch["unit"].to_pylist()]
        return pa.concat_tables(tables)

    def write(table: pa.Table) -> pa.Table:
        try:
            return pa.Table.from_pylist(write_units(table, recipe))
        except Exception as e:
            # Ray hands the driver a UserCodeException without its cause, so a full disk or a refused
            # bucket would end in a traceback: describe it here and send the one line as a row.
            message = describe_error(e, recipe.output)
            if message is None:
                raise
            return pa.Table.from_pylist([{"unit": "", "error": message}])

    cluster = ray.cluster_resources()
    op_classes = [get_operator(step.op, tuple(recipe.imports)) for step in recipe.steps]
    step_res = [cls.resources.with_overrides(s.resources) for cls, s in zip(op_classes, recipe.steps, strict=True)]
    check_fits(recipe, step_res, cluster)
    groups = stage_groups(recipe.steps, step_res)
    resources = [group_resources([step_res[i] for i in g]) for g in groups]
    stateful = [any(op_classes[i].stateful for i in g) for g in groups]
    cluster_cpus = float(cluster.get("CPU", 1))
    # CPUs for each actor stage by default: three quarters of the cluster, leaving the reads and the
    # shard writes (tasks) the rest; a recipe's concurrency overrides it
    share = min(max(cluster_cpus - 1, cluster_cpus / 2), max(1.0, 0.75 * cluster_cpus)) / max(1, sum(stateful))
    pools = [pool_sizes(res, share, float(cluster.get("GPU", 0))) for res in resources]
    cpus = cpu_reservations(resources, stateful, pools, cluster_cpus)

    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(read, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True)
    for g, members in enumerate(groups):
        res = resources[g]
        remote: dict[str, Any] = {"num_cpus": cpus[g], "num_gpus": res.gpus or None}
        if res.memory_mb:
            remote["memory"] = res.memory_mb * (1 << 20)
        chain = [(vars(recipe.steps[i]), stage_name(i, recipe.steps[i]), step_res[i].batch_size) for i in members]
        if stateful[g]:
            low, high = pools[g]
            ds = ds.map_batches(
                _actor_class(chain, opts, recipe.imports),
                # a whole block (one unit) per call; Ray insists on a number for GPU steps
                batch_size=res.batch_size or (GPU_BLOCK_ROWS if res.gpus else None),
                batch_format="pyarrow",
                # a batch run's queue is full at the start: begin at max, give actors back as work runs out
                compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=high),
                **remote,
            )
        else:
            runner = _ChainRunner(chain, opts, recipe.imports)
            ds = ds.map_batches(runner, batch_size=None, batch_format="pyarrow", **remote)
    ds = ds.map_batches(write, batch_size=None, batch_format="pyarrow", udf_modifying_row_count=True)

    seen: set[str] = set()
    with tqdm(total=len(pending), desc=f"{recipe.name} units", unit="unit", disable=not progress) as bar:
        for summary in ds.iter_rows():
            if summary.get("error"):
                raise UserFixable(summary["error"])
            seen.add(summary["unit"])
            if tracker.add(dict(summary)):
                bar.update(1)
    tracker.commit_empty(u["id"] for u in pending if u["id"] not in seen)
