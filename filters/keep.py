"""``keep``: the one threshold step for every score column.

Score steps (``langid``, ``text_quality``, ``media_quality``, ``clip_score``, ``content_hash``) only
write columns; ``keep`` drops rows by those columns, so thresholds can be tuned from the columns'
histograms without re-running a model. A dropped row's ``reason`` is the rule's reason and its
``detail`` the column and value, e.g. ``lang_score=0.41 < 0.65``.

One rule: ``{column, min, max, values, reason, keep_null}``; several: ``rules: [...]`` (the first
rule a row fails gives its reason); ``preset: gopher`` (or ``c4``, ``media``) adds a published set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.operator import Operator, Resources, Threshold, register, with_rejections


@dataclass(frozen=True)
class Rule:
    column: str
    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] | None = None  # allowed values (e.g. languages)
    reason: str = ""
    keep_null: bool = True  # rows the score step did not score (no text, wrong kind) stay

    def __post_init__(self) -> None:
        if self.min is None and self.max is None and self.values is None:
            raise ValueError(f"keep rule on {self.column!r} needs min, max or values")
        if not self.reason:
            object.__setattr__(self, "reason", f"{self.column} out of range")

    def failing(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Boolean mask of the rows this rule drops."""
        valid = pc.is_valid(column)
        bad = pc.invert(valid) if not self.keep_null else pa.array(np.zeros(len(column), bool))
        if self.values is not None:
            outside = pc.invert(pc.is_in(column, value_set=pa.array(list(self.values))))
            bad = pc.or_(bad, pc.and_(valid, outside))
        if self.min is not None:
            bad = pc.or_(bad, pc.fill_null(pc.less(column, self.min), False))
        if self.max is not None:
            bad = pc.or_(bad, pc.fill_null(pc.greater(column, self.max), False))
        return np.asarray(pc.fill_null(bad, False).to_numpy(zero_copy_only=False), dtype=bool)

    def describe(self, value: Any) -> str:
        if value is None:
            return f"{self.column} missing"
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        if self.values is not None and value not in self.values:
            return f"{self.column}={shown} not in {list(self.values)}"
        if self.min is not None and value < self.min:
            return f"{self.column}={shown} < {self.min}"
        return f"{self.column}={shown} > {self.max}"


def _gopher() -> list[dict[str, Any]]:
    from filters.text_quality import GOPHER_THRESHOLDS

    return GOPHER_THRESHOLDS


def _c4() -> list[dict[str, Any]]:
    from filters.text_quality import C4_THRESHOLDS

    return C4_THRESHOLDS


def _media() -> list[dict[str, Any]]:
    from filters.media_quality import MEDIA_THRESHOLDS

    return MEDIA_THRESHOLDS


PRESETS = {"gopher": _gopher, "c4": _c4, "media": _media}


def build_rules(
    single: Mapping[str, Any] | None, rules: Sequence[Mapping[str, Any]] | None, preset: str | Sequence[str] | None
) -> list[Rule]:
    out: list[Rule] = []
    for name in [preset] if isinstance(preset, str) else list(preset or []):
        if name not in PRESETS:
            raise ValueError(f"unknown keep preset {name!r} (one of {', '.join(PRESETS)})")
        out.extend(Rule(**{**r, "values": _tuple(r.get("values"))}) for r in PRESETS[name]())
    for r in rules or []:
        out.append(Rule(**{**r, "values": _tuple(r.get("values"))}))
    if single and single.get("column"):
        out.append(Rule(**{**single, "values": _tuple(single.get("values"))}))
    if not out:
        raise ValueError("keep needs a column, rules or a preset")
    return out


def _tuple(values: Any) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


@register
class Keep(Operator):
    """Drops rows by their score columns: one rule, a list of ``rules`` or a published ``preset``.

    The first rule a row fails gives its reject reason; the detail names the column and its value.

    Params:
        column: the score column of a single rule.
        min: a row whose ``column`` is below this is dropped.
        max: a row whose ``column`` is above this is dropped.
        values: the allowed values of ``column`` (languages, say); a row with another is dropped.
        reason: the single rule's reject reason (default ``<column> out of range``).
        keep_null: keep rows the score step left unscored (no text, another kind).
        rules: several rules, each ``{column, min, max, values, reason, keep_null}``.
        preset: ``gopher``, ``c4`` or ``media`` (or a list of them): published thresholds, applied first.
    """

    name = "keep"
    resources = Resources(cpus=0.25)

    def __init__(
        self,
        column: str | None = None,
        min: float | None = None,
        max: float | None = None,
        values: Sequence[Any] | None = None,
        reason: str = "",
        keep_null: bool = True,
        rules: Sequence[Mapping[str, Any]] | None = None,
        preset: str | Sequence[str] | None = None,
    ) -> None:
        single = {"column": column, "min": min, "max": max, "values": values, "reason": reason, "keep_null": keep_null}
        super().__init__(**{k: v for k, v in single.items() if v is not None}, rules=rules, preset=preset)
        self.rules = build_rules(single, rules, preset)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        decided = np.zeros(n, dtype=bool)
        for rule in self.rules:
            if rule.column not in batch.column_names:
                raise KeyError(f"keep: no column {rule.column!r}; run its score step first")
            column = batch[rule.column]
            hits = np.flatnonzero(rule.failing(column) & ~decided)
            if len(hits):
                values = column.take(pa.array(hits)).to_pylist()
                for i, v in zip(hits.tolist(), values, strict=True):
                    reasons[i] = rule.reason
                    details[i] = rule.describe(v)
                decided[hits] = True
        return with_rejections(batch, reasons, details)

    def thresholds(self) -> list[Threshold]:
        return [
            Threshold(rule.column, side, float(value), rule.reason)
            for rule in self.rules
            for side, value in (("min", rule.min), ("max", rule.max))
            if value is not None
        ]
