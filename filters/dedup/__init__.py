"""Global exact and near-duplicate detection over a finished run or any shard set, on Ray Data.

``run_dedup(target, work_dir, config)`` runs the resumable phases (see ``filters.dedup.job``) and
moves every duplicate to the rejects ledger; ``DedupConfig`` holds the settings.
"""

from filters.dedup.config import DedupConfig
from filters.dedup.job import run_dedup

__all__ = ["DedupConfig", "run_dedup"]
