"""The operator contract: an Arrow table in, an Arrow table out, no knowledge of Ray.

An operator may add columns (scores) and may mark rows it drops with a ``reason`` (and optional
``detail``) column; the executor moves marked rows to the rejects ledger. Heavy state (a model) is
loaded in ``setup()``, called once per worker before the first batch, never in ``__init__``, so
Ray can run the class as an actor pool and a plain loop can run it in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from shards.schema import DETAIL_COLUMN, REASON_COLUMN


@dataclass(frozen=True)
class Resources:
    """What one instance needs; the Ray executor turns this into ``map_batches`` arguments."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0
    concurrency: int | None = None  # actor-pool size; None lets the executor decide


class Operator:
    """Base class for every registered step. Subclasses set ``name`` and implement ``__call__``."""

    name: ClassVar[str] = ""
    resources: ClassVar[Resources] = Resources()
    stateful: ClassVar[bool] = False  # True when setup() loads something worth keeping in an actor

    def __init__(self, **params: Any) -> None:
        self.params = params

    def setup(self) -> None:
        """Load models or other heavy state; called once per worker before the first batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


_REGISTRY: dict[str, type[Operator]] = {}


class UnknownOperator(LookupError):
    """A recipe names an operator nobody registered."""


def register(cls: type[Operator]) -> type[Operator]:
    """Class decorator: make an operator available to recipes under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"operator name {cls.name!r} is taken by {_REGISTRY[cls.name].__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_operators(imports: tuple[str, ...] = ()) -> None:
    """Importing a module registers its operators: ours, plus a recipe's ``imports``."""
    import importlib

    for module in ("filters", "synth", "pipelines.accounting", *imports):
        importlib.import_module(module)


def get_operator(name: str, imports: tuple[str, ...] = ()) -> type[Operator]:
    _load_operators(imports)
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownOperator(f"unknown operator {name!r} (registered: {known})") from None


def registered() -> dict[str, type[Operator]]:
    _load_operators()
    return dict(_REGISTRY)


def with_rejections(batch: pa.Table, reasons: list[str | None], details: list[str | None] | None = None) -> pa.Table:
    """Attach per-row reject reasons (None keeps the row); the usual ending of a filter."""
    batch = batch.append_column(REASON_COLUMN, pa.array(reasons, pa.string()))
    return batch.append_column(DETAIL_COLUMN, pa.array(details or [None] * len(reasons), pa.string()))


def split_rejected(result: pa.Table) -> tuple[pa.Table, pa.Table | None]:
    """(kept rows without reason columns, rejected rows with them) from an operator's output."""
    if REASON_COLUMN not in result.column_names:
        return result, None
    if DETAIL_COLUMN not in result.column_names:
        result = result.append_column(DETAIL_COLUMN, pa.nulls(len(result), pa.string()))
    rejected_mask = pc.is_valid(result[REASON_COLUMN])
    kept = result.filter(pc.invert(rejected_mask)).drop_columns([REASON_COLUMN, DETAIL_COLUMN])
    rejected = result.filter(rejected_mask)
    return kept, (rejected if len(rejected) else None)
