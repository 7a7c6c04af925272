"""Operators only the tests use, registered through a recipe's ``imports`` like a user's own."""

from __future__ import annotations

import json

import pyarrow as pa

from pipelines.operator import Operator, register


@register
class ExplodesOnCats(Operator):
    """Fails a whole batch when one row is bad, like a buggy user operator; stateful like a model."""

    name = "test_explodes_on_cats"
    stateful = True

    def setup(self) -> None:
        self.ready = True

    def __call__(self, batch: pa.Table) -> pa.Table:
        assert self.ready, "setup() runs before the first batch"
        for meta in batch["meta"].to_pylist():
            if "chelsea" in json.loads(meta)["locator"]:
                raise ValueError("cats are not allowed")
        return batch.append_column("cat_free", pa.array([True] * len(batch)))


@register
class HoldsAModel(Operator):
    """A stateful step that asks for a whole CPU, like every model step: its actor holds it."""

    name = "test_holds_a_model"
    stateful = True

    def __init__(self, column: str = "held") -> None:
        super().__init__(column=column)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column(self.column, pa.array([len(batch)] * len(batch)))
