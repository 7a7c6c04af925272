"""``run_dedup``: exact and near-duplicate detection over a finished run (or any shard set).

    features+bands ──► candidates ──► edges ──► components ──► duplicates ──► apply
    (row ranges of     (one task per  (verify    (connected     (kept id of    (rewrite shards, ledger
     shards, in         band          pairs)     components)    each drop)     the drops, manifests)
     parallel)          partition)

Each phase is materialised as Parquet under the work directory with a done marker (see
``filters.dedup.workdir``), so a crashed job resumes at the first unfinished phase. No phase holds
all signatures in one process. The features phase cuts every shard into row ranges (a one-shard
input still fills every core) and writes, besides the features, each range's band rows split by
shuffle partition: that is the shuffle, done as files, so the candidates phase is one task per
partition and a worker holds ``rows / partitions`` band rows whatever the corpus size.

Tasks run through ``filters.dedup.runner``: plain Ray tasks when a cluster is given (or Ray is
already running), a local process pool otherwise; the task functions are the same. A duplicate
graph of at most ``local_graph_max`` pairs is verified, labelled and given kept ids in the driver;
a larger one by the partitioned steps of ``filters.dedup.partitioned`` (tasks over partition
files, no Ray Data shuffle), so no worker's memory depends on the corpus size. Which copy stays:
the smallest node, i.e. the first copy in shard order.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.dedup import components as cc
from filters.dedup.apply import apply_to_run, apply_to_shardset
from filters.dedup.buckets import (
    CHROMAPRINT,
    EDGE_SCHEMA,
    METHODS,
    MINHASH,
    VERIFIED_LATER,
    bucket_candidates,
)
from filters.dedup.config import DedupConfig
from filters.dedup.features import FEATURES_SCHEMA, FeatureTask, features_task
from filters.dedup.inputs import Inputs, node_of, resolve
from filters.dedup.partitioned import (
    DROPS_BY_SHARD,
    DUPLICATE_SCHEMA,
    AttachBlobs,
    ComparePairs,
    KeptIds,
    Labels,
    Layout,
    RouteCandidates,
    ScatterEdges,
    StarStep,
    attach_blobs_task,
    attach_root_ids,
    best_links,
    compare_task,
    file_of,
    kept_ids_task,
    labels_task,
    parts_present,
    route_candidates_task,
    save_feature_index,
    scatter_edges_task,
    split_by_shard,
    split_write,
    star_step_task,
)
from filters.dedup.runner import LOCAL, RAY, Runner, peak_rss
from filters.dedup.verify import JOIN_SCHEMA, blob_column, compare_pairs
from filters.dedup.workdir import WorkDir
from shards import storage

log = logging.getLogger(__name__)

MAX_ROUNDS = 100
NODE_IDS = "edges-node-ids"  # (node, id) of every candidate node, kept by the local verification
BY_FILE = "components-by-file"  # drops routed to the feature file of their root
BANDS = "bands"  # the features phase's band rows, one folder per shuffle partition
WANTED = "edges-wanted.npy"  # the candidate nodes whose features the local verification fetches
MIN_TASK_ROWS = 1000


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class Phases:
    """The phases: tasks through a ``Runner``, phase outputs under the work directory.

    Verification, components and the kept-id lookup each have two forms: when the duplicate graph
    is small (at most ``local_graph_max`` pairs) the driver holds the graph, and only the features
    of its nodes, fetched by one task per feature file; otherwise they run as tasks over partition
    files (``filters.dedup.partitioned``). Neither form ever holds all signatures in one process.
    """

    def __init__(self, work: WorkDir, cfg: DedupConfig, inputs: Inputs, runner: Runner) -> None:
        self.work, self.cfg, self.inputs, self.runner = work, cfg, inputs, runner

    def layout(self) -> Layout:
        return Layout(self.work.path("features"), self.partitions())

    def partitions(self) -> int:
        """Shuffle partitions: about ``rows_per_partition`` rows each (about 16 band rows per sample)."""
        if self.cfg.partitions:
            return int(self.cfg.partitions)
        rows = (self.work.done("features") or {}).get("rows") or sum(s.samples for s in self.inputs.shards)
        return max(self.runner.workers, min(4096, math.ceil(rows * 16 / self.cfg.rows_per_partition)))

    def pair_partitions(self) -> int:
        """Verify partitions: about ``rows_per_partition / 8`` candidate pairs each (a pair to verify
        carries two signatures; candidate pairs grow faster than the corpus, so sizing these from the
        band rows let a partition's pairs grow with it), never fewer than the band partitions."""
        pairs = int((self.work.done("candidates") or {}).get("rows", 0))
        return max(self.partitions(), min(4096, math.ceil(pairs * 8 / self.cfg.rows_per_partition)))

    # ------------------------------------------------------------ phases

    def feature_tasks(self, out: str, partitions: int) -> list[FeatureTask]:
        """Row ranges of every shard: at least two per worker when the input allows, at most
        ``task_rows`` rows each (a task's memory is bounded by that, not by the shard)."""
        shards = self.inputs.shards
        total = sum(s.samples for s in shards)
        size = max(MIN_TASK_ROWS, min(self.cfg.task_rows, math.ceil(total / (2 * self.runner.workers))))
        tasks: list[FeatureTask] = []
        bands = self.work.path(BANDS)
        for shard in shards:
            pieces = max(1, math.ceil(shard.samples / size))
            bounds = [round(i * shard.samples / pieces) for i in range(pieces + 1)]
            for i in range(pieces):
                stop = bounds[i + 1] if i + 1 < pieces else None  # the last range reads to the end
                tasks.append(FeatureTask(len(tasks), shard, bounds[i], stop, self.cfg, out, bands, partitions))
        return tasks

    def features(self, out: str) -> dict[str, Any]:
        """Features and band rows in one pass over the shards (the bands are the shuffle's input)."""
        self.work.remove(BANDS)
        partitions = self.partitions()
        self.cfg.minhash.lsh(), self.cfg.chromaprint.lsh()  # cached: forked workers inherit the parameters
        tasks = self.feature_tasks(out, partitions)
        save_feature_index(out, [node_of(t.shard.index, t.start) for t in tasks])
        results, stats = self.runner.map(features_task, tasks)
        return {
            "rows": sum(r["rows"] for r in results),
            "feature_errors": sum(r["errors"] for r in results),
            "partitions": partitions,
            **stats,
        }

    def candidates(self, out: str) -> dict[str, Any]:
        """One task per band partition: bucket the rows, emit candidate (and confirmed) pairs."""
        partitions = int(self.work.done("features")["partitions"])
        tasks = [CandidateTask(p, self.cfg, self.work.path(BANDS), out) for p in range(partitions)]
        tasks = [t for t in tasks if storage.listdir(t.folder(), ".parquet")]
        results, stats = self.runner.map(candidates_task, tasks)
        by_method: dict[str, int] = {}
        for r in results:
            for k, v in r["by_method"].items():
                by_method[k] = by_method.get(k, 0) + v
        return {"rows": sum(r["rows"] for r in results), "by_method": by_method, **stats}

    def method_counts(self, phase: str) -> dict[str, int]:
        """Pairs per method of a graph-sized phase output (one int8 column read here)."""
        return method_counts(self.work.read_table(phase, ["method"]))

    def edges(self, out: str) -> dict[str, Any]:
        """Verified edges: exact and pHash pairs as they are, MinHash/chromaprint pairs checked."""
        enabled = {MINHASH: self.cfg.minhash.enabled, CHROMAPRINT: self.cfg.chromaprint.enabled}
        methods = [m for m in VERIFIED_LATER if enabled[m]]
        if (self.work.done("candidates") or {}).get("rows", 0) <= self.cfg.local_graph_max:
            candidates = self.work.read_table("candidates") if parquet_rows(self.work.path("candidates")) else None
            candidates = candidates if candidates is not None else EDGE_SCHEMA.empty_table()
            columns = ["node", "id", *sorted({blob_column(m, self.cfg) for m in methods})]
            fetched, stats = self.fetch_nodes(candidates, columns)
            table = verify_local(fetched, candidates, methods, self.cfg, self.work.path(NODE_IDS))
            write_table(table, storage.join(out, "part-0.parquet"))
            return {"rows": len(table), "by_method": method_counts(table), "verify": "local", **stats}
        return self._edges_partitioned(out)

    def _edges_partitioned(self, out: str) -> dict[str, Any]:
        """Candidates routed to their pair partition (confirmed) or their nodes' feature files (to
        verify); blobs attached in one task per feature file; pairs compared per partition."""
        layout = Layout(self.work.path("features"), self.pair_partitions())
        self.work.remove(NODE_IDS)
        files = storage.listdir(self.work.path("candidates"), ".parquet")

        def route(o: str) -> dict[str, Any]:
            tasks = [
                RouteCandidates(f, f"c-{i:06d}", layout, storage.join(o, "confirmed"), storage.join(o, "endpoints"))
                for i, f in enumerate(files)
            ]
            return self.runner.map(route_candidates_task, tasks)[1]

        routed = self.work.path("verify/routed")
        steps = [self.work.run("verify/routed", route)]

        def attach(o: str) -> dict[str, Any]:
            ends = storage.join(routed, "endpoints")
            tasks = [AttachBlobs(f, self.cfg, layout, ends, o) for f in parts_present(ends)]
            return self.runner.map(attach_blobs_task, tasks)[1]

        steps.append(self.work.run("verify/attached", attach))
        attached, confirmed = self.work.path("verify/attached"), storage.join(routed, "confirmed")
        partitions = sorted(set(parts_present(attached)) | set(parts_present(confirmed)))
        tasks = [ComparePairs(q, self.cfg, attached, confirmed, out) for q in partitions]
        results, stats = self.runner.map(compare_task, tasks)
        return {
            "rows": sum(r["rows"] for r in results),
            "by_method": add_counts(r["by_method"] for r in results),
            "verify": "distributed",
            **merge_stats(*steps, stats),
        }

    def fetch_nodes(self, candidates: pa.Table, columns: list[str]) -> tuple[pa.Table, dict]:
        """The feature rows of the candidates' nodes: the node set goes to a file, one task per
        feature file picks its rows (a map-only semi-join)."""
        wanted = np.unique(np.concatenate([candidates["a"].to_numpy(), candidates["b"].to_numpy()]))
        path = self.work.path(WANTED)
        with storage.atomic_write(path) as f:
            np.save(f, wanted.astype(np.int64))
        files = storage.listdir(self.work.path("features"), ".parquet") if len(wanted) else []
        results, stats = self.runner.map(fetch_task, [FetchTask(f, path, tuple(columns)) for f in files])
        tables = [r["table"] for r in results if len(r["table"])]
        schema = pa.schema([FEATURES_SCHEMA.field(c) for c in columns])
        return (pa.concat_tables(tables) if tables else schema.empty_table()), stats

    def components(self, out: str) -> dict[str, Any]:
        rows = (self.work.done("edges") or {}).get("rows", 0)
        self.work.remove(BY_FILE)
        if rows <= self.cfg.local_graph_max:
            table = duplicates_local(self.work.read_table("edges") if rows else EDGE_SCHEMA.empty_table())
            write_table(table, storage.join(out, "part-0.parquet"))
            return {"rows": len(table), "mode": "local"}
        return self._components_partitioned(out)

    def _components_partitioned(self, out: str) -> dict[str, Any]:
        """Star contraction over node partitions, every step materialised (a crash resumes at a
        step); then each partition's labels, written as the output and routed to the feature file
        of their root."""
        layout = self.layout()
        edges = storage.listdir(self.work.path("edges"), ".parquet")

        def scatter(o: str) -> dict[str, Any]:
            tasks = [
                ScatterEdges(f, f"e-{i:06d}", layout.partitions, storage.join(o, "stars"), storage.join(o, "links"))
                for i, f in enumerate(edges)
            ]
            return {"partitions": layout.partitions, **self.runner.map(scatter_edges_task, tasks)[1]}

        steps = [self.work.run("cc/round-000", scatter)]
        # the links stay partitioned as round 0 made them, whatever a resumed job's setting is now
        layout = Layout(layout.features, int(steps[0]["partitions"]))
        source, links = self.work.path("cc/round-000", "stars"), self.work.path("cc/round-000", "links")
        for round_ in range(1, MAX_ROUNDS + 1):
            changed = 0
            for step in ("large", "small"):

                def run_step(o: str, source: str = source, step: str = step) -> dict[str, Any]:
                    tasks = [StarStep(p, step, layout.partitions, source, o) for p in parts_present(source)]
                    results, stats = self.runner.map(star_step_task, tasks)
                    return {
                        "rows": sum(r["rows"] for r in results),
                        "changed": sum(r["changed"] for r in results),
                        **stats,
                    }

                name = f"cc/round-{round_:03d}-{step}"
                steps.append(self.work.run(name, run_step))
                changed += steps[-1]["changed"]
                source = self.work.path(name)
            log.info("star contraction round %d: %d edges rewired", round_, changed)
            if changed == 0:
                break
        else:
            raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
        by_file = self.work.path(BY_FILE)
        tasks = [Labels(p, layout, source, links, out, by_file) for p in parts_present(source)]
        results, stats = self.runner.map(labels_task, tasks)
        return {
            "rows": sum(r["rows"] for r in results),
            "mode": "distributed",
            "rounds": round_,
            **merge_stats(*steps, stats),
        }

    def duplicates(self, out: str) -> dict[str, Any]:
        """Attach the kept sample's id to every dropped node: a join with the features by root node."""
        rows = (self.work.done("components") or {}).get("rows", 0)
        self.work.remove(DROPS_BY_SHARD)
        node_ids = self.work.path(NODE_IDS)
        if rows <= self.cfg.local_graph_max and storage.listdir(node_ids, ".parquet"):
            # the verify phase kept the ids of every node with an edge; roots have edges
            drops = self.work.read_table("components") if rows else DUPLICATE_SCHEMA.empty_table()
            table = attach_root_ids(drops, self.work.read_table(NODE_IDS))
            write_table(table, storage.join(out, "part-0.parquet"))
            split_by_shard(table, self.work.path(DROPS_BY_SHARD), "driver")
            return {"rows": rows, "mode": "local", "by_method": method_counts(table)}
        layout = self.layout()
        by_file = self.work.path(BY_FILE)
        if rows and not parts_present(by_file):  # components ran in the driver: route its drops here
            drops = self.work.read_table("components")
            split_write(drops, file_of(drops["root"].to_numpy(), layout.lows()), by_file, "driver")
        tasks = [KeptIds(f, layout, by_file, out, self.work.path(DROPS_BY_SHARD)) for f in parts_present(by_file)]
        results, stats = self.runner.map(kept_ids_task, tasks)
        return {
            "rows": sum(r["rows"] for r in results),
            "mode": "distributed",
            "by_method": add_counts(r["by_method"] for r in results),
            **stats,
        }


def parquet_rows(path: str) -> int:
    """Rows of a Parquet folder, from the file footers only."""
    import pyarrow.parquet as pq

    total = 0
    for f in storage.listdir(path, ".parquet"):
        with storage.open_read(f) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def add_counts(parts) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def merge_stats(*infos: dict[str, Any]) -> dict[str, Any]:
    """Worker stats of several steps as one phase's: tasks and CPU seconds added, the largest peak."""
    return {
        "tasks": sum(i.get("tasks", 0) for i in infos),
        "worker_cpu_s": round(sum(i.get("worker_cpu_s", 0) for i in infos), 3),
        "worker_peak_rss": max((i.get("worker_peak_rss", 0) for i in infos), default=0),
    }


def method_counts(t: pa.Table) -> dict[str, int]:
    values, counts = np.unique(t["method"].to_numpy(), return_counts=True)
    return {METHODS[v]: int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


@dataclass(frozen=True)
class CandidateTask:
    partition: int
    cfg: DedupConfig
    bands_dir: str
    out_dir: str

    def folder(self) -> str:
        return storage.join(self.bands_dir, f"p-{self.partition:05d}")


def candidates_task(t: CandidateTask) -> dict[str, Any]:
    """All band rows of one partition (every row of a key lands in the same partition): pairs."""
    import pyarrow.parquet as pq

    parts = []
    for f in storage.listdir(t.folder(), ".parquet"):
        with storage.open_read(f) as fh:
            parts.append(pq.read_table(fh))
    edges = bucket_candidates(pa.concat_tables(parts), t.cfg) if parts else EDGE_SCHEMA.empty_table()
    if len(edges):
        write_table(edges, storage.join(t.out_dir, f"part-{t.partition:05d}.parquet"))
    return {"rows": len(edges), "by_method": method_counts(edges)}


@dataclass(frozen=True)
class FetchTask:
    file: str  # a feature file
    wanted: str  # .npy of the nodes wanted, sorted
    columns: tuple[str, ...]


def fetch_task(t: FetchTask) -> dict[str, Any]:
    """The ``columns`` of the wanted nodes' rows in one feature file (blobs read only if any match)."""
    import pyarrow.parquet as pq

    wanted = np.load(io.BytesIO(storage.read_bytes(t.wanted)))
    with storage.open_read(t.file) as fh:
        pf = pq.ParquetFile(fh)
        keep = np.isin(pf.read(columns=["node"])["node"].to_numpy(), wanted)
        if not keep.any():
            table = FEATURES_SCHEMA.empty_table().select(list(t.columns))
        else:
            table = pf.read(columns=list(t.columns)).filter(pa.array(keep))
    return {"table": table}


def verify_local(
    fetched: pa.Table, candidates: pa.Table, methods: list[int], cfg: DedupConfig, ids_dir: str
) -> pa.Table:
    """Verification when the candidate graph fits the driver: ``fetched`` holds the ids and blobs
    of the candidates' nodes (the ids are saved to ``ids_dir`` for the kept-id lookup), pairs are
    compared here. Exact and pHash pairs pass as they are."""
    a, b, method = candidates["a"].to_numpy(), candidates["b"].to_numpy(), candidates["method"].to_numpy()
    write_table(fetched.select(["node", "id"]), storage.join(ids_dir, "part-0.parquet"))
    order = np.argsort(fetched["node"].to_numpy())
    nodes = fetched["node"].to_numpy()[order]
    parts = [candidates.filter(pa.array(~np.isin(method, VERIFIED_LATER)))]
    for m in methods:
        sel = method == m
        ma, mb = a[sel], b[sel]
        column = fetched[blob_column(m, cfg)].combine_chunks().take(pa.array(order))
        ia, ib = np.searchsorted(nodes, ma), np.searchsorted(nodes, mb)
        ok = (ia < len(nodes)) & (ib < len(nodes))
        ok[ok] = (nodes[ia[ok]] == ma[ok]) & (nodes[ib[ok]] == mb[ok])
        blobs = pa.concat_arrays([column.take(pa.array(ia[ok])), column.take(pa.array(ib[ok]))])
        valid = np.asarray(pc.is_valid(blobs).to_numpy(zero_copy_only=False), bool)
        both = valid[: ok.sum()] & valid[ok.sum() :]
        n = int(both.sum())
        rows = pa.Table.from_arrays(
            [
                pa.array(np.concatenate([ma[ok][both], mb[ok][both]])),
                pa.array(np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])),
                pa.array(np.concatenate([mb[ok][both], ma[ok][both]])),
                blobs.filter(pa.array(np.concatenate([both, both]))).cast(pa.binary()),
            ],
            schema=JOIN_SCHEMA,
        )
        parts.append(compare_pairs(rows, m, cfg))
    return pa.concat_tables([p.cast(EDGE_SCHEMA) for p in parts])


def write_table(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    with storage.atomic_write(path) as f:
        pq.write_table(table, f)


def duplicates_local(edges: pa.Table) -> pa.Table:
    """Components in this process: (node, root, method, score) of every node that is not a root."""
    a, b = edges["a"].to_numpy(), edges["b"].to_numpy()
    if not len(a):
        return DUPLICATE_SCHEMA.empty_table()
    nodes, roots = cc.components_local(a, b)
    m, s = edges["method"].to_numpy(), edges["score"].to_numpy()
    link_nodes, link_methods, link_scores = best_links(np.concatenate([a, b]), np.tile(m, 2), np.tile(s, 2))
    pos = np.searchsorted(link_nodes, nodes)
    drop = nodes != roots
    return pa.Table.from_arrays(
        [
            pa.array(nodes[drop]),
            pa.array(roots[drop]),
            pa.array(link_methods[pos][drop]),
            pa.array(link_scores[pos][drop]),
        ],
        schema=DUPLICATE_SCHEMA,
    )


# ---------------------------------------------------------------- the job


def choose_runner(executor: str, ray_settings: dict[str, Any] | None, workers: int | None) -> Runner:
    """``auto``: Ray tasks when a cluster is named (``address``, RAY_ADDRESS) or Ray is already
    running in this process, else a local process pool: on one machine both run the same tasks on
    the same cores, and the pool does not pay Ray's start-up (seconds, ~700 MiB)."""
    settings = ray_settings or {}
    if executor == "auto":
        cluster = settings.get("address") or os.environ.get("RAY_ADDRESS") or ray_running()
        executor = RAY if cluster else LOCAL
    if executor == RAY:
        import ray

        if not ray.is_initialized():
            from pipelines.ray_executor import init_ray

            init_ray({"num_cpus": workers or os.cpu_count() or 1, "log_to_driver": False, **settings})
        return Runner(RAY, workers or int(ray.cluster_resources().get("CPU", 1)))
    return Runner(LOCAL, workers or len(os.sched_getaffinity(0)))


def run_dedup(
    target: str,
    work_dir: str | None = None,
    config: DedupConfig | dict[str, Any] | None = None,
    apply: bool = True,
    out: str | None = None,
    ray_settings: dict[str, Any] | None = None,
    progress: bool = False,
    executor: str = "auto",
    workers: int | None = None,
) -> dict[str, Any]:
    """Dedup a finished run (in place: duplicates move to its rejects ledger) or a shard set
    (written filtered to ``out`` with its own ledger). Returns the job report.

    ``executor``: ``auto`` (default, see ``choose_runner``), ``local`` or ``ray``; ``workers``:
    tasks at a time (default: the cores, or the cluster's CPUs). ``progress`` is accepted for the
    CLI's sake; no phase runs a Ray Data job any more, so there are no progress bars to show."""
    cfg = config if isinstance(config, DedupConfig) else DedupConfig.from_dict(config)
    inputs = resolve(target)
    work = WorkDir(
        work_dir or storage.join(inputs.root if inputs.kind == "shardset" else target, "dedup", cfg.config_hash())
    )
    if apply and work.done("apply") and storage.exists(work.path("report.json")):
        work.check_config(cfg)  # applied already: the report stands
        return {**json.loads(storage.read_bytes(work.path("report.json"))), "resumed": True}
    inputs = work.start(cfg, inputs)
    started = time.perf_counter()
    runner = choose_runner(executor, ray_settings, workers)
    phases = Phases(work, cfg, inputs, runner)
    report: dict[str, Any] = {
        "target": target,
        "work_dir": work.root,
        "config_hash": cfg.config_hash(),
        "executor": {
            "kind": runner.kind,
            "workers": runner.workers,
            "startup_s": round(time.perf_counter() - started, 3),
        },
        "phases": {},
    }
    for name in ("features", "candidates", "edges", "components", "duplicates"):
        report["phases"][name] = work.run(name, measured(getattr(phases, name)))
        log.info("dedup phase %s: %s", name, report["phases"][name])
    report["duplicates"] = report["phases"]["duplicates"]["rows"]
    report["samples"] = report["phases"]["features"]["rows"]
    if apply:
        job_id = f"dd{cfg.config_hash()[:8]}"
        if inputs.kind == "run":
            report["applied"] = work.run("apply", measured(lambda _: apply_to_run(inputs, work, job_id, runner)))
        else:
            if not out:
                raise ValueError("deduplicating a shard set writes a filtered copy: give out=DIR")
            report["applied"] = work.run("apply", measured(lambda _: apply_to_shardset(inputs, work, out, runner)))
    storage.write_bytes(work.path("report.json"), json.dumps(report, indent=1).encode())
    return report


def measured(fn):
    """A phase function whose info also gives the driver's CPU seconds and peak RSS so far."""

    def run(out: str) -> dict[str, Any]:
        cpu = time.process_time()
        info = dict(fn(out) or {})
        info["driver_cpu_s"] = round(time.process_time() - cpu, 3)
        info["driver_peak_rss"] = peak_rss()
        return info

    return run
