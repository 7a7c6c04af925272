"""Vectorised access to the segments of a batch: which row each segment belongs to, and its fields.

Operators that work per segment (language ID, CLIP score, media rules) flatten the segment lists
once with Arrow instead of walking Python dicts row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class FlatSegments:
    """All segments of a batch in row-then-segment order."""

    row: np.ndarray  # int64 row index of each segment
    offsets: np.ndarray  # int64 segment offsets per row (len rows + 1), relative to the first segment
    modality: pa.Array
    text: pa.Array
    data: pa.Array  # the segments' ``bytes``
    meta: pa.Array

    def __len__(self) -> int:
        return len(self.row)

    def where(self, modality: str) -> np.ndarray:
        """Indices of the segments of one modality."""
        return np.flatnonzero(pc.fill_null(pc.equal(self.modality, modality), False).to_numpy(zero_copy_only=False))


def flat_segments(table: pa.Table) -> FlatSegments:
    segments = table["segments"].combine_chunks()
    flat = segments.flatten()
    offsets = pc.subtract(segments.offsets, segments.offsets[0]).to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(table), dtype=np.int64), np.diff(offsets))
    return FlatSegments(
        row, offsets, flat.field("modality"), flat.field("text"), flat.field("bytes"), flat.field("meta")
    )


def per_segment_list(values: pa.Array, offsets: np.ndarray) -> pa.ListArray:
    """A list column aligned with the segments: ``values`` holds one entry per segment (nulls allowed)."""
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def scatter(length: int, index: np.ndarray, values: np.ndarray | list, type_: pa.DataType) -> pa.Array:
    """An Arrow array of ``length`` nulls with ``values`` placed at ``index``."""
    mask = np.ones(length, dtype=bool)
    mask[index] = False
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        full = np.zeros(length, dtype=values.dtype)
        full[index] = values
        return pa.array(full, type_, mask=mask)
    full_list: list = [None] * length
    for i, v in zip(index.tolist(), values, strict=True):
        full_list[i] = v
    return pa.array(full_list, type_)


def scatter_array(length: int, index: np.ndarray, values: pa.Array) -> pa.Array:
    """Like ``scatter`` for an Arrow array of any type, without a Python loop."""
    positions = np.full(length, -1, dtype=np.int64)
    positions[index] = np.arange(len(index))
    missing = positions < 0
    if not len(values):
        return pa.nulls(length, values.type)
    return values.take(pa.array(np.where(missing, 0, positions), mask=missing))


def sample_texts(table: pa.Table, separator: str = "\n") -> list[str | None]:
    """Each sample's text segments joined (None when it has none), in segment order."""
    flat = flat_segments(table)
    idx = flat.where("text")
    out: list[list[str]] = [[] for _ in range(len(table))]
    texts = flat.text.take(pa.array(idx)).to_pylist() if len(idx) else []
    for r, t in zip(flat.row[idx].tolist(), texts, strict=True):
        if t:
            out[r].append(t)
    return [separator.join(parts) if parts else None for parts in out]


def put_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Add a score column, replacing one of the same name (a score step run twice scores afresh)."""
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)
