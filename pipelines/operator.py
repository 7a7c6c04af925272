"""The operator contract: an Arrow table in, an Arrow table out, no knowledge of Ray.

An operator may add columns (scores) and may mark rows it drops with a ``reason`` (and optional
``detail``) column; the executor moves marked rows to the rejects ledger. Heavy state (a model) is
loaded in ``setup()``, called once per worker before the first batch, never in ``__init__``, so
Ray can run the class as an actor pool and a plain loop can run it in tests.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from shards.schema import DETAIL_COLUMN, REASON_COLUMN

if TYPE_CHECKING:
    from pipelines.recipe import Recipe


@dataclass(frozen=True)
class Resources:
    """What one instance needs; the Ray executor turns this into ``map_batches`` arguments.

    An operator declares its defaults; a recipe step's ``resources`` overrides them (``with_overrides``)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 0
    concurrency: int | tuple[int, int] | None = None  # actor-pool size or [min, max]; None: the executor sizes it
    batch_size: int | None = None  # rows per operator call (a GPU batch); None: a whole unit

    def with_overrides(self, overrides: dict[str, Any]) -> Resources:
        """These resources with a recipe step's ``resources`` mapping (already schema-checked) applied."""
        changes = {k: v for k, v in overrides.items() if k in ("cpus", "gpus", "batch_size")}
        if "memory" in overrides:
            changes["memory_mb"] = -(-int(overrides["memory"]) // (1 << 20))
        if "concurrency" in overrides:
            pool = overrides["concurrency"]
            changes["concurrency"] = tuple(pool) if isinstance(pool, list | tuple) else int(pool)
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Threshold:
    """A cut a step makes on a numeric column: rows under ``min`` or over ``max`` are dropped (or,
    for a step that decides rather than drops, handled otherwise: ``label`` says how). Reports draw it
    on the column's histogram."""

    column: str
    side: typing.Literal["min", "max"]
    value: float
    label: str = ""


class Operator:
    """Base class for every registered step. Subclasses set ``name`` and implement ``__call__``."""

    name: ClassVar[str] = ""
    resources: ClassVar[Resources] = Resources()
    stateful: ClassVar[bool] = False  # True when setup() loads something worth keeping in an actor
    # inclusive (low, high) bounds of numeric parameters, None for open; checked before a run starts
    param_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = params

    def setup(self) -> None:
        """Load models or other heavy state; called once per worker before the first batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def score_columns(self) -> list[str]:
        """The numeric columns this step writes, for reports to plot together; none by default."""
        return []

    def thresholds(self) -> list[Threshold]:
        """The cuts this step makes on numeric columns (its own or another step's); none by default."""
        return []


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
    for module in ("filters", "synth", "pipelines.accounting", *imports):
        importlib.import_module(module)


def get_operator(name: str, imports: tuple[str, ...] = ()) -> type[Operator]:
    _load_operators(imports)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"registered: {', '.join(sorted(_REGISTRY)) or 'none'}"
        raise UnknownOperator(f"unknown operator {name!r} ({hint})") from None


def _annotation(value: Any, module_globals: dict[str, Any]) -> Any:
    """A parameter's annotation as an object (``from __future__ import annotations`` makes it a string)."""
    if not isinstance(value, str):
        return value
    try:
        return eval(value, module_globals)  # our own modules' annotation text, not user input
    except Exception:  # a name imported only for type checkers: not checked
        return inspect.Parameter.empty


def _matches(value: Any, ann: Any) -> bool | None:
    """Does ``value`` (from YAML) fit a simple annotation? None when the annotation is too complex to tell."""
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    if ann is None or ann is type(None):
        return value is None
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union or origin is types.UnionType:
        results = [_matches(value, a) for a in args]
        return True if True in results else (None if None in results else False)
    if origin is typing.Literal:
        return value in args
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    container = origin or ann
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            results = [_matches(v, args[0]) for v in value]
            return False if False in results else (None if None in results else True)
        return None
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return None


def _describe(ann: Any) -> str:
    text = ann if isinstance(ann, str) else inspect.formatannotation(ann)
    return text.replace("typing.", "").replace("collections.abc.", "")


def _parameters(cls: type[Operator]) -> tuple[dict[str, tuple[inspect.Parameter, dict[str, Any]]], bool]:
    """(named parameters with the globals their annotations resolve in, accepts any other name).

    An ``__init__`` taking ``**kwargs`` usually forwards them to its base (the builders do), so the
    named parameters of the bases up the MRO count too, for type checks and near-miss typos.
    """
    named: dict[str, tuple[inspect.Parameter, dict[str, Any]]] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is Operator or klass is object:
            break
        params = inspect.signature(klass.__init__).parameters
        for name, p in params.items():
            if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                named.setdefault(name, (p, getattr(klass.__init__, "__globals__", {})))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    own = inspect.signature(cls.__init__).parameters.values()
    return named, any(p.kind is p.VAR_KEYWORD for p in own)


def param_problem(cls: type[Operator], params: dict[str, Any]) -> str | None:
    """What is wrong with ``params`` for ``cls.__init__`` (unknown, missing, wrong type, out of range), or None."""
    named, open_ended = _parameters(cls)
    own = inspect.signature(cls.__init__).parameters
    for key in params:
        if key in named:
            continue
        # with **kwargs any name goes, except one a letter or two from a known one: that is a typo
        close = difflib.get_close_matches(str(key), list(named), n=1, cutoff=0.85 if open_ended else 0.6)
        if close or not open_ended:
            known = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(named) or 'none'}"
            return f"unknown parameter {key!r} ({known})"
    for name, p in own.items():
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty:
            if name not in params:
                return f"missing required parameter {name!r}"
    for key, value in params.items():
        if key in named:
            p, module_globals = named[key]
            if _matches(value, _annotation(p.annotation, module_globals)) is False:
                return f"parameter {key!r} expects {_describe(p.annotation)}, got {value!r}"[:200]
        low, high = cls.param_ranges.get(key, (None, None))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and ((low is not None and value < low) or (high is not None and value > high)):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            return f"parameter {key!r} must be in {bounds}, got {value!r}"
    return None


def check_steps(recipe: Recipe) -> None:
    """Resolve every step's operator and check its parameters, so a typo fails before a run directory exists.

    Raises ``RecipeError`` (``pipeline[1] (langid): unknown parameter 'model_pth' (did you mean
    'model_path'?)``) or ``UnknownOperator``; each operator is also built once, as its ``__init__``
    checks what a signature cannot (``__init__`` is cheap by contract: models load in ``setup()``).
    """
    from pipelines.recipe import RecipeError

    _load_operators()
    for i, module in enumerate(recipe.imports):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RecipeError(f"imports[{i}]: cannot import {module!r}: {e}") from e
    for i, step in enumerate(recipe.steps):
        try:
            cls = get_operator(step.op)
        except UnknownOperator as e:
            raise UnknownOperator(f"pipeline[{i}]: {e}") from None
        where = f"pipeline[{i}] ({step.op})"
        if step.resources.get("cpus", 1) <= 0 and step.resources.get("gpus", cls.resources.gpus) <= 0:
            raise RecipeError(f"{where}: resources need cpus > 0 or gpus > 0")
        problem = param_problem(cls, step.params)
        if problem:
            raise RecipeError(f"{where}: {problem}")
        try:
            cls(**step.params)
        except (ValueError, TypeError, LookupError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RecipeError(f"{where}: {first}") from e


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
