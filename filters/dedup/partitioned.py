"""Verification, connected components and the kept-id lookup of a large duplicate graph, as tasks
over partition files: no Ray Data shuffle, no step that holds the graph or the features in one
process.

Every step is a list of ``Runner`` tasks that read a few Parquet files and write their rows split
by destination (``<dir>/p-NNNNNN/<source>.parquet``), so the next step's task reads exactly one
partition folder. Two kinds of destination:

* a hash partition of a node or of a pair (``grouping.partition_of``): there are about
  ``rows / rows_per_partition`` of them, so a partition holds a bounded number of rows;
* the feature file that holds a node (nodes are ``shard << 32 | row`` and each feature file holds
  one row range of one shard, ``features/_index.npy`` has their first nodes): a join with the
  features is then map-side, the features are never moved, and a task holds one feature file
  (at most ``task_rows`` samples) plus the rows routed to it.

Verification: candidates -> endpoints by feature file -> blobs attached there -> pairs by pair
partition -> compared. Components: the edges mirrored by node partition, then large-star /
small-star steps (Kiveris et al., 2014) until a round changes nothing; each node's root is its
smallest neighbour in the converged stars. Kept ids: drops routed to their root's feature file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.dedup import components as cc
from filters.dedup.buckets import EDGE_SCHEMA, METHODS, VERIFIED_LATER
from filters.dedup.config import DedupConfig
from filters.dedup.grouping import pair_key, partition_of, runs, unique_rows
from filters.dedup.inputs import ROW_BITS
from filters.dedup.verify import JOIN_SCHEMA, blob_column, compare_pairs
from shards import storage

DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("node", pa.int64()),
        pa.field("root", pa.int64()),
        pa.field("method", pa.int8()),
        pa.field("score", pa.float32()),
    ]
)
KEPT_SCHEMA = pa.schema([*DUPLICATE_SCHEMA, pa.field("root_id", pa.string())])
ENDPOINT_SCHEMA = pa.schema(
    [
        pa.field("node", pa.int64()),
        pa.field("side", pa.int8()),
        pa.field("other", pa.int64()),
        pa.field("method", pa.int8()),
    ]
)
ATTACHED_SCHEMA = pa.schema([*JOIN_SCHEMA, pa.field("method", pa.int8())])
LINK_SCHEMA = pa.schema([pa.field("node", pa.int64()), pa.field("method", pa.int8()), pa.field("score", pa.float32())])
DROPS_BY_SHARD = "duplicates-by-shard"  # the duplicates phase's drops, by the shard they are dropped from
FEATURE_INDEX = "_index.npy"  # in the features folder (the underscore: not a data file to readers)


# ---------------------------------------------------------------- files


def write_table(table: pa.Table, path: str) -> None:
    storage.makedirs(path.rsplit("/", 1)[0])
    with storage.atomic_write(path) as f:
        pq.write_table(table, f)


def read_files(files: list[str], schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    parts = []
    for f in files:
        with storage.open_read(f) as fh:
            parts.append(pq.read_table(fh, columns=columns))
    target = pa.schema([schema.field(c) for c in columns]) if columns else schema
    return pa.concat_tables([p.cast(target) for p in parts]) if parts else target.empty_table()


def part_dir(root: str, p: int) -> str:
    return storage.join(root, f"p-{p:06d}")


def read_part(root: str, p: int, schema: pa.Schema) -> pa.Table:
    return read_files(storage.listdir(part_dir(root, p), ".parquet"), schema)


def parts_present(root: str) -> list[int]:
    """Partition numbers that have a folder under ``root``."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    return sorted(int(n[2:]) for n in names if n.startswith("p-") and n[2:].isdigit())


def split_write(table: pa.Table, dest: np.ndarray, root: str, name: str) -> list[int]:
    """Rows of ``table`` to ``root/p-<dest>/<name>.parquet``, one file per destination present."""
    if not len(table):
        return []
    order = np.argsort(dest, kind="stable")
    sorted_dest = dest[order]
    starts, sizes = runs(sorted_dest)
    for s, n in zip(starts.tolist(), sizes.tolist(), strict=True):
        write_table(
            table.take(pa.array(order[s : s + n])), storage.join(part_dir(root, int(sorted_dest[s])), f"{name}.parquet")
        )
    return sorted_dest[starts].tolist()


def feature_file(features_dir: str, f: int) -> str:
    return storage.join(features_dir, f"part-{f:06d}.parquet")


def save_feature_index(features_dir: str, lows: list[int]) -> None:
    storage.makedirs(features_dir)
    with storage.atomic_write(storage.join(features_dir, FEATURE_INDEX)) as f:
        np.save(f, np.asarray(lows, dtype=np.int64))


def load_feature_index(features_dir: str) -> np.ndarray:
    """First node of every feature file (by task number); read from the files where the index is
    missing (a work directory from before the index)."""
    path = storage.join(features_dir, FEATURE_INDEX)
    if storage.exists(path):
        return np.load(io.BytesIO(storage.read_bytes(path)))
    files = storage.listdir(features_dir, ".parquet")
    lows = np.full(1 + max(int(f.rsplit("part-", 1)[1].split(".")[0]) for f in files), np.iinfo(np.int64).max)
    for f in files:
        with storage.open_read(f) as fh:
            nodes = pq.read_table(fh, columns=["node"])["node"].to_numpy()
        if len(nodes):
            lows[int(f.rsplit("part-", 1)[1].split(".")[0])] = nodes.min()
    return np.minimum.accumulate(lows[::-1])[::-1]  # an empty file takes its successor's start


def file_of(nodes: np.ndarray, lows: np.ndarray) -> np.ndarray:
    return np.searchsorted(lows, nodes, side="right") - 1


def pair_partition(a: np.ndarray, b: np.ndarray, partitions: int) -> np.ndarray:
    return partition_of(pair_key(a, b), partitions)


@dataclass(frozen=True)
class Layout:
    """Where the partitioned steps read and write; ``partitions`` hash partitions."""

    features: str
    partitions: int

    def lows(self) -> np.ndarray:
        return load_feature_index(self.features)


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class RouteCandidates:
    """One candidates file: confirmed pairs to their pair partition, the endpoints of pairs still
    to verify to the feature file of their node."""

    file: str
    tag: str
    layout: Layout
    confirmed: str
    endpoints: str


def route_candidates_task(t: RouteCandidates) -> dict[str, Any]:
    c = read_files([t.file], EDGE_SCHEMA)
    a, b, method = c["a"].to_numpy(), c["b"].to_numpy(), c["method"].to_numpy()
    later = np.isin(method, VERIFIED_LATER)
    done = c.filter(pa.array(~later))
    split_write(done, pair_partition(a[~later], b[~later], t.layout.partitions), t.confirmed, t.tag)
    a, b, method = a[later], b[later], method[later]
    n = len(a)
    ends = pa.Table.from_arrays(
        [
            pa.array(np.concatenate([a, b])),
            pa.array(np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])),
            pa.array(np.concatenate([b, a])),
            pa.array(np.tile(method, 2).astype(np.int8)),
        ],
        schema=ENDPOINT_SCHEMA,
    )
    split_write(ends, file_of(ends["node"].to_numpy(), t.layout.lows()), t.endpoints, t.tag)
    return {"confirmed": len(done), "endpoints": 2 * n}


@dataclass(frozen=True)
class AttachBlobs:
    """One feature file: every endpoint routed to it gets its node's blob, then goes to its pair's
    partition."""

    file: int
    cfg: DedupConfig
    layout: Layout
    endpoints: str
    attached: str


def attach_blobs_task(t: AttachBlobs) -> dict[str, Any]:
    ends = read_part(t.endpoints, t.file, ENDPOINT_SCHEMA)
    node, method = ends["node"].to_numpy(), ends["method"].to_numpy()
    columns = sorted({blob_column(int(m), t.cfg) for m in np.unique(method)})
    with storage.open_read(feature_file(t.layout.features, t.file)) as fh:
        pf = pq.ParquetFile(fh)
        nodes = pf.read(columns=["node"])["node"].to_numpy()
        wanted = np.isin(nodes, node)
        blobs = pf.read(columns=columns).filter(pa.array(wanted))
    nodes = nodes[wanted]
    order = np.argsort(nodes)
    pos = np.minimum(np.searchsorted(nodes[order], node), max(len(nodes) - 1, 0))
    found = (nodes[order][pos] == node) if len(nodes) else np.zeros(len(node), bool)
    parts = []
    for m in np.unique(method).tolist():
        sel = np.flatnonzero(found & (method == m))
        blob = blobs[blob_column(int(m), t.cfg)].combine_chunks().take(pa.array(order[pos[sel]]))
        rows = pa.Table.from_arrays(
            [
                ends["node"].take(pa.array(sel)),
                ends["side"].take(pa.array(sel)),
                ends["other"].take(pa.array(sel)),
                blob.cast(pa.binary()),
                pa.array(np.full(len(sel), m, np.int8)),
            ],
            schema=ATTACHED_SCHEMA,
        )
        parts.append(rows.filter(pc.is_valid(rows["blob"])))
    rows = pa.concat_tables(parts) if parts else ATTACHED_SCHEMA.empty_table()
    n, other, side = rows["node"].to_numpy(), rows["other"].to_numpy(), rows["side"].to_numpy()
    a, b = np.where(side == 0, n, other), np.where(side == 0, other, n)
    split_write(rows, pair_partition(a, b, t.layout.partitions), t.attached, f"f-{t.file:06d}")
    return {"rows": len(rows)}


@dataclass(frozen=True)
class ComparePairs:
    """One pair partition: both endpoints of every pair to verify are here; compare them. The
    confirmed pairs of the partition pass, each once."""

    partition: int
    cfg: DedupConfig
    attached: str
    confirmed: str
    out: str


def compare_task(t: ComparePairs) -> dict[str, Any]:
    parts = []
    done = read_part(t.confirmed, t.partition, EDGE_SCHEMA)
    if len(done):
        parts.append(
            done.take(pa.array(unique_rows(done["a"].to_numpy(), done["b"].to_numpy(), done["method"].to_numpy())))
        )
    rows = read_part(t.attached, t.partition, ATTACHED_SCHEMA)
    method = rows["method"].to_numpy()
    for m in np.unique(method).tolist():
        mine = rows.filter(pa.array(method == m)).select(JOIN_SCHEMA.names)
        parts.append(compare_pairs(mine, int(m), t.cfg).cast(EDGE_SCHEMA))
    edges = pa.concat_tables(parts) if parts else EDGE_SCHEMA.empty_table()
    if len(edges):
        write_table(edges, storage.join(t.out, f"part-{t.partition:06d}.parquet"))
    return {"rows": len(edges), "by_method": counts_by_method(edges)}


def counts_by_method(t: pa.Table) -> dict[str, int]:
    values, counts = np.unique(t["method"].to_numpy(), return_counts=True)
    return {METHODS[v]: int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


# ---------------------------------------------------------------- connected components


@dataclass(frozen=True)
class ScatterEdges:
    """One edges file: both directions of every edge to the partition of their first node (the
    star steps' input), and each endpoint's (method, score) to its node's partition."""

    file: str
    tag: str
    partitions: int
    stars: str
    links: str


def scatter_edges_task(t: ScatterEdges) -> dict[str, Any]:
    e = read_files([t.file], EDGE_SCHEMA)
    a, b = e["a"].to_numpy(), e["b"].to_numpy()
    u, v = np.concatenate([a, b]), np.concatenate([b, a])
    parts = partition_of(u, t.partitions)
    stars = pa.Table.from_arrays([pa.array(u), pa.array(v), pa.array(np.zeros(len(u), np.int8))], schema=cc.STAR_SCHEMA)
    split_write(stars, parts, t.stars, t.tag)
    links = pa.Table.from_arrays(
        [
            pa.array(u),
            pa.array(np.tile(e["method"].to_numpy(), 2).astype(np.int8)),
            pa.array(np.tile(e["score"].to_numpy(), 2).astype(np.float32)),
        ],
        schema=LINK_SCHEMA,
    )
    split_write(links, parts, t.links, t.tag)
    return {"rows": len(e)}


@dataclass(frozen=True)
class StarStep:
    """One node partition of a large-star or small-star step: its output edges, both directions,
    to the partitions of their first node."""

    partition: int
    step: str  # large | small
    partitions: int
    source: str
    out: str


def star_step_task(t: StarStep) -> dict[str, Any]:
    rows = read_part(t.source, t.partition, cc.STAR_SCHEMA)
    out = (cc.large_star if t.step == "large" else cc.small_star)(rows)
    changed = int(out["changed"].to_numpy().sum()) if len(out) else 0
    mirrored = cc.both_ways(out)
    split_write(mirrored, partition_of(mirrored["u"].to_numpy(), t.partitions), t.out, f"from-{t.partition:06d}")
    return {"rows": len(out), "changed": changed}


@dataclass(frozen=True)
class Labels:
    """One node partition of the converged stars: every node that is not its star's root, with
    its root and its strongest edge, written as the components output and routed to the feature
    file of the root (for the kept-id lookup)."""

    partition: int
    layout: Layout
    stars: str
    links: str
    out: str
    by_file: str


def labels_task(t: Labels) -> dict[str, Any]:
    rows = read_part(t.stars, t.partition, cc.STAR_SCHEMA)
    u, v = rows["u"].to_numpy(), rows["v"].to_numpy()
    keep = unique_rows(u, v)  # sorted by (u, v): a run's first v is the node's smallest neighbour
    u, v = u[keep], v[keep]
    starts, _ = runs(u)
    node, root = u[starts], np.minimum(u[starts], v[starts])
    drop = root < node
    node, root = node[drop], root[drop]
    links = read_part(t.links, t.partition, LINK_SCHEMA)
    link_nodes, link_methods, link_scores = best_links(
        links["node"].to_numpy(), links["method"].to_numpy(), links["score"].to_numpy()
    )
    pos = np.searchsorted(link_nodes, node)
    table = pa.Table.from_arrays(
        [pa.array(node), pa.array(root), pa.array(link_methods[pos]), pa.array(link_scores[pos])],
        schema=DUPLICATE_SCHEMA,
    )
    if len(table):
        write_table(table, storage.join(t.out, f"part-{t.partition:06d}.parquet"))
    split_write(table, file_of(root, t.layout.lows()), t.by_file, f"from-{t.partition:06d}")
    return {"rows": len(table)}


def best_links(nodes: np.ndarray, methods: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node, its strongest edge: highest score, then the lowest method (exact before near)."""
    order = np.lexsort((methods, -scores, nodes))
    first = order[np.concatenate([[True], nodes[order][1:] != nodes[order][:-1]])] if len(order) else order
    return nodes[first], methods[first], scores[first]


# ---------------------------------------------------------------- kept ids


@dataclass(frozen=True)
class KeptIds:
    """One feature file: the drops whose root is in it get the root's sample id."""

    file: int
    layout: Layout
    by_file: str
    out: str
    by_shard: str


def kept_ids_task(t: KeptIds) -> dict[str, Any]:
    drops = read_part(t.by_file, t.file, DUPLICATE_SCHEMA)
    with storage.open_read(feature_file(t.layout.features, t.file)) as fh:
        ids = pq.read_table(fh, columns=["node", "id"])
    ids = ids.filter(pc.is_in(ids["node"], pa.array(np.unique(drops["root"].to_numpy()))))
    table = attach_root_ids(drops, ids)
    if len(table):
        write_table(table, storage.join(t.out, f"part-{t.file:06d}.parquet"))
    split_by_shard(table, t.by_shard, f"f-{t.file:06d}")
    return {"rows": len(table), "by_method": counts_by_method(table)}


def split_by_shard(drops: pa.Table, root: str, name: str) -> None:
    """Drops (with kept ids) to ``root/p-<shard>/``: what the apply phase's task for a shard reads."""
    split_write(drops, drops["node"].to_numpy() >> ROW_BITS, root, name)


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
