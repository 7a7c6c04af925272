"""Every stage benchmark in one run and one table (``make bench``); JSON only when ``--out`` is given."""

from __future__ import annotations

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
    rows: list[Row] = []
    for module in MODULES:
        rows.extend(module.run(quick))
    return rows


if __name__ == "__main__":
    main(run)
