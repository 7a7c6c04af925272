"""Every stage benchmark in one run and one table (``make bench``); JSON only when ``--out`` is given."""

from __future__ import annotations

from bench import shards_bench, validate_bench
from bench.common import Row, main

MODULES = (shards_bench, validate_bench)


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    for module in MODULES:
        rows.extend(module.run(quick))
    return rows


if __name__ == "__main__":
    main(run)
