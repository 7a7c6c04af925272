"""Global exact and near-duplicate detection over a finished run or any shard set, on
Ray tasks or a local process pool.

``run_dedup(target, work_dir, config)`` runs the resumable phases (see ``filters.dedup.job``) and
moves every duplicate to the rejects ledger; ``DedupConfig`` holds the settings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DedupConfig", "run_dedup"]


def __getattr__(name: str) -> Any:
    """Imported on first use, so ``filters.dedup.minhash`` alone does not pull in the job (and Ray)."""
    if name == "DedupConfig":
        from filters.dedup.config import DedupConfig

        return DedupConfig
    if name == "run_dedup":
        from filters.dedup.job import run_dedup

        return run_dedup
    raise AttributeError(name)
