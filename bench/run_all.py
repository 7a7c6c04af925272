"""Every stage benchmark in one run and one table (``make bench``); JSON only when ``--out`` is given."""

from __future__ import annotations

import sys
import time

from bench import (
    asr_bench,
    caption_bench,
    dedup_bench,
    download_bench,
    e2e_bench,
    langid_bench,
    shards_bench,
    trainer_bench,
    tts_bench,
    validate_bench,
)
from bench.common import Row, main

MODULES = (
    shards_bench,
    validate_bench,
    asr_bench,
    caption_bench,
    tts_bench,
    trainer_bench,
    dedup_bench,
    langid_bench,
    download_bench,
    e2e_bench,
)


def run(quick: bool = False) -> list[Row]:
    """Every module's rows; each module's wall time goes to stderr as it finishes, and the total last."""
    rows: list[Row] = []
    started = time.perf_counter()
    for module in MODULES:
        start = time.perf_counter()
        rows.extend(module.run(quick))
        print(f"bench: {module.__name__} {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    print(f"bench: all {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main(run)
