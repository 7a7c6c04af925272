"""Phase 4: connected components of the duplicate graph; every component keeps its smallest node.

Two ways, same answer:

* in one process, when the verified edges number at most ``local_graph_max``: min-label
  propagation with pointer jumping in numpy. Memory is O(edges), the duplicate graph only (never
  all signatures): about 40 bytes per edge.
* distributed otherwise: the alternating large-star / small-star contraction of Kiveris et al.
  ("Connected Components in MapReduce and Beyond", 2014). Each step is one task per node
  partition of the edge list (``filters.dedup.partitioned``), so a worker holds one partition; it
  converges in O(log^2 n) rounds to stars around each component's minimum node. Every step is
  materialised, so a crash resumes at a step.

Nodes are ``shard << 32 | row``, so the smallest node is the first copy in shard order: the rule
that decides which copy stays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.dedup.grouping import runs, unique_rows

STAR_SCHEMA = pa.schema([pa.field("u", pa.int64()), pa.field("v", pa.int64()), pa.field("changed", pa.int8())])
LABEL_SCHEMA = pa.schema([pa.field("node", pa.int64()), pa.field("root", pa.int64())])


def components_local(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node, root) for every node of the edge list, root = smallest node of its component."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    u, v = inverse[: len(a)], inverse[len(a) :]
    label = np.arange(len(nodes))
    while True:
        lowest = np.minimum(label[u], label[v])
        new = label.copy()
        np.minimum.at(new, u, lowest)
        np.minimum.at(new, v, lowest)
        while True:  # pointer jumping: follow labels to their own labels until they stop moving
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def _rows(edges: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The partition's directed rows (node -> neighbour), distinct, no self-loops, sorted.

    Rows are not mirrored here: a partition holds every row of its nodes (``both_ways`` mirrored
    them before the shuffle) and only those, so a mirror would give other nodes partial lists."""
    node, nbr = edges["u"].to_numpy(), edges["v"].to_numpy()
    keep = unique_rows(node, nbr)
    keep = keep[node[keep] != nbr[keep]]
    return node[keep], nbr[keep]


def _star_table(x: np.ndarray, y: np.ndarray, changed: np.ndarray) -> pa.Table:
    lo, hi = np.minimum(x, y), np.maximum(x, y)
    keep = lo != hi
    return pa.Table.from_arrays(
        [pa.array(lo[keep]), pa.array(hi[keep]), pa.array(changed[keep].astype(np.int8))], schema=STAR_SCHEMA
    )


def large_star(edges: pa.Table) -> pa.Table:
    """For each node u: connect every neighbour larger than u to m(u), the smallest of u and its
    neighbours. Each undirected edge is handled at its smaller end."""
    node, nbr = _rows(edges)
    if not len(node):
        return STAR_SCHEMA.empty_table()
    starts, sizes = runs(node)
    m = np.repeat(np.minimum(node[starts], nbr[starts]), sizes)  # sorted neighbours: the first is the smallest
    larger = nbr > node
    return _star_table(nbr[larger], m[larger], (m < node)[larger])


def small_star(edges: pa.Table) -> pa.Table:
    """For each node u with smaller neighbours S: connect S and u to min(S). Each undirected edge
    is handled at its larger end."""
    node, nbr = _rows(edges)
    smaller = nbr < node
    node, nbr = node[smaller], nbr[smaller]
    if not len(node):
        return STAR_SCHEMA.empty_table()
    starts, sizes = runs(node)
    m = np.repeat(nbr[starts], sizes)  # sorted neighbours: the run's first is min(S)
    changed = np.repeat(sizes > 1, sizes)
    others = nbr != m
    x = np.concatenate([nbr[others], node[starts]])
    y = np.concatenate([m[others], nbr[starts]])
    return _star_table(x, y, np.concatenate([changed[others], sizes > 1]))


def both_ways(table: pa.Table) -> pa.Table:
    """Each undirected edge as two directed rows, partitioned later by their first column."""
    u, v = table["u"].to_numpy(), table["v"].to_numpy()
    return pa.Table.from_arrays(
        [pa.array(np.concatenate([u, v])), pa.array(np.concatenate([v, u])), pa.array(np.zeros(2 * len(u), np.int8))],
        schema=STAR_SCHEMA,
    )


def star_labels(table: pa.Table) -> pa.Table:
    """(node, root) from converged stars: every edge is (root, leaf) with root < leaf."""
    u, v = table["u"].to_numpy(), table["v"].to_numpy()
    nodes = np.concatenate([u, v])
    roots = np.concatenate([u, u])
    keep = unique_rows(nodes, roots)
    return pa.Table.from_arrays([pa.array(nodes[keep]), pa.array(roots[keep])], schema=LABEL_SCHEMA)
