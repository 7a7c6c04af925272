"""Operators only the tests use, registered through a recipe's ``imports`` like a user's own."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa

from pipelines.operator import Operator, Resources, register


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


@register
class WhereAmI(Operator):
    """A GPU step: records which actor (process) and which GPU Ray gave it handled each row, and how
    many rows each call got; ``delay_s`` per call stands in for a model's work."""

    name = "test_where_am_i"
    stateful = True
    resources = Resources(cpus=1, gpus=1)

    def __init__(self, delay_s: float = 0.0, mark_dir: str | None = None) -> None:
        super().__init__(delay_s=delay_s, mark_dir=mark_dir)
        self.delay_s, self.mark_dir = float(delay_s), mark_dir

    def setup(self) -> None:
        """With ``mark_dir``, each instance leaves a file named by its process and GPU: who started."""
        if self.mark_dir:
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            with open(os.path.join(self.mark_dir, f"{os.getpid()}-gpu{gpu}"), "w") as f:
                f.write(gpu)

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(self.delay_s)
        n = len(batch)
        worker = f"{os.getpid()}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
        return batch.append_column("worker", pa.array([worker] * n)).append_column("call_rows", pa.array([n] * n))
