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
already running), a local process pool otherwise; the task functions are the same. Only graphs
larger than ``local_graph_max`` pairs take the Ray Data shuffles of the distributed verify,
components and kept-id phases. Which copy stays: the smallest node, i.e. the first copy in shard
order.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
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
from filters.dedup.grouping import shuffle_groups
from filters.dedup.inputs import Inputs, resolve
from filters.dedup.runner import LOCAL, RAY, Runner, peak_rss
from filters.dedup.verify import JOIN_SCHEMA, blob_column, compare_pairs, verify
from filters.dedup.workdir import WorkDir, arrow_filesystem
from shards import storage

log = logging.getLogger(__name__)

DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("node", pa.int64()),
        pa.field("root", pa.int64()),
        pa.field("method", pa.int8()),
        pa.field("score", pa.float32()),
    ]
)
KEPT_SCHEMA = pa.schema([*DUPLICATE_SCHEMA, pa.field("root_id", pa.string())])
MAX_ROUNDS = 100
NODE_IDS = "edges-node-ids"  # (node, id) of every candidate node, kept by the local verification
BANDS = "bands"  # the features phase's band rows, one folder per shuffle partition
WANTED = "edges-wanted.npy"  # the candidate nodes whose features the local verification fetches
MIN_TASK_ROWS = 1000


@contextlib.contextmanager
def data_context(progress: bool) -> Iterator[None]:
    """Sort-based shuffles (cheap task shuffles, no actors) and blocks large enough that a shuffle
    partition is never split, for the duration of the job only."""
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.shuffle_strategy, ctx.target_max_block_size, ctx.enable_progress_bars)
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1 << 30)
    ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.target_max_block_size, ctx.enable_progress_bars = saved


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class Phases:
    """The phases: tasks through a ``Runner``, phase outputs under the work directory.

    Verification, components and the kept-id lookup each have two forms: when the duplicate graph
    is small (at most ``local_graph_max`` pairs) the driver holds the graph, and only the features
    of its nodes, fetched by one task per feature file; otherwise they run as Ray Data shuffles
    (Ray is started then, if it is not running). Neither form ever holds all signatures in one
    process.
    """

    def __init__(
        self,
        work: WorkDir,
        cfg: DedupConfig,
        inputs: Inputs,
        runner: Runner,
        ray_settings: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.work, self.cfg, self.inputs, self.runner = work, cfg, inputs, runner
        self.ray_settings, self.progress = ray_settings, progress
        self.stack = contextlib.ExitStack()
        self._ray_ready = False

    def ensure_ray(self) -> None:
        """Ray Data for the distributed forms: started on first use, with the job's data context."""
        if self._ray_ready:
            return
        if not ray_running():
            from pipelines.ray_executor import init_ray

            init_ray(self.ray_settings or {"num_cpus": self.runner.workers, "log_to_driver": False})
        self.stack.enter_context(data_context(self.progress))
        self._ray_ready = True

    # ------------------------------------------------------------ I/O

    def read(self, phase: str, schema: pa.Schema):
        self.ensure_ray()
        return read_dir(self.work.path(phase), schema)

    def write(self, ds, out: str, schema: pa.Schema) -> int:
        """Write ``ds`` as Parquet under ``out``; returns the number of rows."""
        path, fs = arrow_filesystem(out)
        storage.makedirs(out)
        ds = ds.map_batches(lambda t: t.select(schema.names).cast(schema), batch_format="pyarrow")
        ds.write_parquet(path, filesystem=fs)
        return parquet_rows(out)

    def partitions(self) -> int:
        """Shuffle partitions: about ``rows_per_partition`` rows each (about 16 band rows per sample)."""
        if self.cfg.partitions:
            return int(self.cfg.partitions)
        rows = (self.work.done("features") or {}).get("rows") or sum(s.samples for s in self.inputs.shards)
        return max(self.runner.workers, min(4096, math.ceil(rows * 16 / self.cfg.rows_per_partition)))

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
        results, stats = self.runner.map(features_task, self.feature_tasks(out, partitions))
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
        features = self.read("features", FEATURES_SCHEMA)
        candidates = self.read("candidates", EDGE_SCHEMA)
        later = pa.array(VERIFIED_LATER, pa.int8())
        parts = [
            candidates.map_batches(lambda t: t.filter(pc.invert(pc.is_in(t["method"], later))), batch_format="pyarrow")
        ]
        parts += [verify(features, candidates, m, self.cfg, self.partitions()) for m in methods]
        rows = self.write(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], out, EDGE_SCHEMA)
        return {"rows": rows, "by_method": self.method_counts("edges") if rows else {}, "verify": "distributed"}

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
        if rows <= self.cfg.local_graph_max:
            table = duplicates_local(self.work.read_table("edges") if rows else EDGE_SCHEMA.empty_table())
            write_table(table, storage.join(out, "part-0.parquet"))
            return {"rows": len(table), "mode": "local"}
        return self._components_distributed(out)

    def _components_distributed(self, out: str) -> dict[str, Any]:
        parts = self.partitions()
        stars = self.read("edges", EDGE_SCHEMA).map_batches(_edges_as_stars, batch_format="pyarrow")
        previous = "stars/round-000-input"
        self.work.run(previous, lambda o: {"rows": self.write(stars, o, cc.STAR_SCHEMA)})
        for round_ in range(1, MAX_ROUNDS + 1):
            changed = 0
            for step_name, step in (("large", cc.large_star), ("small", cc.small_star)):
                name = f"stars/round-{round_:03d}-{step_name}"
                source = self.read(previous, cc.STAR_SCHEMA).map_batches(cc.both_ways, batch_format="pyarrow")

                def phase(o: str, source=source, step=step) -> dict[str, Any]:
                    rows = self.write(shuffle_groups(source, _u_column, step, parts), o, cc.STAR_SCHEMA)
                    flips = tally(
                        read_dir(o, cc.STAR_SCHEMA, ["changed"]), lambda t: {"changed": pc.sum(t["changed"]).as_py()}
                    )
                    return {"rows": rows, "changed": flips.get("changed", 0)}

                changed += self.work.run(name, phase)["changed"]
                previous = name
            log.info("star contraction round %d: %d edges rewired", round_, changed)
            if changed == 0:
                break
        else:
            raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
        labels = self.read(previous, cc.STAR_SCHEMA).map_batches(cc.star_labels, batch_format="pyarrow")
        endpoints = self.read("edges", EDGE_SCHEMA).map_batches(_endpoint_scores, batch_format="pyarrow")
        joined = labels.map_batches(_label_rows, batch_format="pyarrow").union(endpoints)
        ds = shuffle_groups(joined, _node_column, _best_link, parts)
        return {"rows": self.write(ds, out, DUPLICATE_SCHEMA), "mode": "distributed", "rounds": round_}

    def duplicates(self, out: str) -> dict[str, Any]:
        """Attach the kept sample's id to every dropped node: a join with the features by root node."""
        rows = (self.work.done("components") or {}).get("rows", 0)
        node_ids = self.work.path(NODE_IDS)
        if rows <= self.cfg.local_graph_max and storage.listdir(node_ids, ".parquet"):
            # the verify phase kept the ids of every node with an edge; roots have edges
            drops = self.work.read_table("components") if rows else DUPLICATE_SCHEMA.empty_table()
            table = attach_root_ids(drops, self.work.read_table(NODE_IDS))
            write_table(table, storage.join(out, "part-0.parquet"))
            return {"rows": rows, "mode": "local", "by_method": method_counts(table)}
        self.ensure_ray()
        ids = read_dir(self.work.path("features"), FEATURES_SCHEMA, ["node", "id"]).map_batches(
            _id_rows, batch_format="pyarrow"
        )
        drops = self.read("components", DUPLICATE_SCHEMA).map_batches(_drop_rows, batch_format="pyarrow")
        ds = shuffle_groups(ids.union(drops), _root_column, _attach_root_id, self.partitions())
        self.write(ds, out, KEPT_SCHEMA)
        return {"rows": rows, "mode": "distributed", "by_method": self.method_counts("duplicates") if rows else {}}


# ---------------------------------------------------------------- per-partition functions


def _key_column(t: pa.Table) -> np.ndarray:
    return t["key"].to_numpy()


def _u_column(t: pa.Table) -> np.ndarray:
    return t["u"].to_numpy()


def _node_column(t: pa.Table) -> np.ndarray:
    return t["node"].to_numpy()


def _root_column(t: pa.Table) -> np.ndarray:
    return t["root"].to_numpy()


def _edges_as_stars(t: pa.Table) -> pa.Table:
    return pa.Table.from_arrays([t["a"], t["b"], pa.array(np.zeros(len(t), np.int8))], schema=cc.STAR_SCHEMA)


def parquet_rows(path: str) -> int:
    """Rows of a Parquet folder, from the file footers only."""
    import pyarrow.parquet as pq

    total = 0
    for f in storage.listdir(path, ".parquet"):
        with storage.open_read(f) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def tally(ds, fn) -> dict[str, int]:
    """Add up ``fn(block) -> {name: count}`` over all blocks: a map-only aggregate, no shuffle."""
    parts = ds.map_batches(lambda t: pa.table({"counts": [json.dumps(fn(t))]}), batch_format="pyarrow").take_all()
    total: dict[str, int] = {}
    for row in parts:
        for k, v in json.loads(row["counts"]).items():
            total[k] = total.get(k, 0) + int(v or 0)
    return total


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


def attach_root_ids(drops: pa.Table, ids: pa.Table) -> pa.Table:
    order = np.argsort(ids["node"].to_numpy())
    nodes = ids["node"].to_numpy()[order]
    pos = np.searchsorted(nodes, drops["root"].to_numpy())
    if len(drops) and (
        np.any(pos >= len(nodes)) or np.any(nodes[np.minimum(pos, len(nodes) - 1)] != drops["root"].to_numpy())
    ):
        raise RuntimeError("a kept node has no feature row; the features phase is incomplete")
    root_ids = ids["id"].combine_chunks().take(pa.array(order[pos])) if len(drops) else pa.nulls(0, pa.string())
    return drops.append_column("root_id", root_ids).cast(KEPT_SCHEMA)


def read_dir(path: str, schema: pa.Schema, columns: list[str] | None = None):
    """A Parquet folder as a Ray dataset, one task and one block per file (an empty dataset when the
    folder holds none). Reading files in plain map tasks skips Ray's read planning, which costs
    seconds per read and splits small phases into hundreds of tasks."""
    import ray

    files = storage.listdir(path, ".parquet")
    if not files:
        empty = schema.empty_table()
        return ray.data.from_arrow(empty.select(columns) if columns else empty)
    opts = storage.storage_options()

    def read(batch: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq

        storage.configure(**opts)
        parts = []
        for f in batch["file"].to_pylist():
            with storage.open_read(f) as fh:
                table = pq.read_table(fh, columns=columns)
            parts.append(table.cast(pa.schema([schema.field(c) for c in table.column_names])))
        return pa.concat_tables(parts)

    items = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return items.map_batches(read, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True)


def write_table(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    with storage.atomic_write(path) as f:
        pq.write_table(table, f)


def best_links(nodes: np.ndarray, methods: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node, its strongest edge: highest score, then the lowest method (exact before near)."""
    order = np.lexsort((methods, -scores, nodes))
    first = order[np.concatenate([[True], nodes[order][1:] != nodes[order][:-1]])] if len(order) else order
    return nodes[first], methods[first], scores[first]


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


_JOIN = pa.schema(
    [
        pa.field("node", pa.int64()),
        pa.field("root", pa.int64()),
        pa.field("method", pa.int8()),
        pa.field("score", pa.float32()),
    ]
)


def _endpoint_scores(t: pa.Table) -> pa.Table:
    n = len(t)
    return pa.Table.from_arrays(
        [
            pa.concat_arrays([t["a"].combine_chunks(), t["b"].combine_chunks()]),
            pa.array(np.full(2 * n, -1, np.int64)),
            pa.concat_arrays([t["method"].combine_chunks()] * 2),
            pa.concat_arrays([t["score"].combine_chunks()] * 2),
        ],
        schema=_JOIN,
    )


def _label_rows(t: pa.Table) -> pa.Table:
    n = len(t)
    return pa.Table.from_arrays(
        [t["node"], t["root"], pa.array(np.full(n, -1, np.int8)), pa.array(np.full(n, np.nan, np.float32))],
        schema=_JOIN,
    )


def _best_link(t: pa.Table) -> pa.Table:
    node, root = t["node"].to_numpy(), t["root"].to_numpy()
    method, score = t["method"].to_numpy(), t["score"].to_numpy()
    is_label = root >= 0
    label_nodes, label_roots = node[is_label], root[is_label]
    keep = np.unique(label_nodes, return_index=True)[1]
    label_nodes, label_roots = label_nodes[keep], label_roots[keep]
    link_nodes, link_methods, link_scores = best_links(node[~is_label], method[~is_label], score[~is_label])
    drop = label_nodes != label_roots
    pos = np.searchsorted(link_nodes, label_nodes[drop])
    return pa.Table.from_arrays(
        [
            pa.array(label_nodes[drop]),
            pa.array(label_roots[drop]),
            pa.array(link_methods[pos]),
            pa.array(link_scores[pos]),
        ],
        schema=DUPLICATE_SCHEMA,
    )


_ROOT_JOIN = pa.schema([*DUPLICATE_SCHEMA, pa.field("root_id", pa.string())])


def _id_rows(t: pa.Table) -> pa.Table:
    """A feature row as a join row keyed by its own node: node -1 marks "this carries an id"."""
    n = len(t)
    return pa.Table.from_arrays(
        [
            pa.array(np.full(n, -1, np.int64)),
            t["node"],
            pa.array(np.full(n, -1, np.int8)),
            pa.array(np.full(n, np.nan, np.float32)),
            t["id"],
        ],
        schema=_ROOT_JOIN,
    )


def _drop_rows(t: pa.Table) -> pa.Table:
    return t.append_column("root_id", pa.nulls(len(t), pa.string())).cast(_ROOT_JOIN)


def _attach_root_id(t: pa.Table) -> pa.Table:
    node, root = t["node"].to_numpy(), t["root"].to_numpy()
    carriers = np.flatnonzero(node < 0)
    carriers = carriers[np.argsort(root[carriers], kind="stable")]
    drops = np.flatnonzero(node >= 0)
    pos = np.searchsorted(root[carriers], root[drops])
    pos = np.minimum(pos, max(len(carriers) - 1, 0))
    if len(drops) and (not len(carriers) or np.any(root[carriers][pos] != root[drops])):
        raise RuntimeError("a kept node has no feature row; the features phase is incomplete")
    out = t.take(pa.array(drops))
    ids = t["root_id"].take(pa.array(carriers[pos])) if len(drops) else pa.nulls(0, pa.string())
    return out.set_column(out.schema.get_field_index("root_id"), "root_id", ids).cast(KEPT_SCHEMA)


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
    tasks at a time (default: the cores, or the cluster's CPUs)."""
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
    phases = Phases(work, cfg, inputs, runner, ray_settings, progress)
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
    with phases.stack:
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
