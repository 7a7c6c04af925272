"""Where the dedup's tasks run: plain Ray tasks, or a local process pool, the same task functions.

A phase is a list of independent tasks (a shard's row range, a band partition, a feature file)
whose inputs and outputs are files under the work directory, so any worker on any node can run
any task. On Ray each task is one ``ray.remote`` call (milliseconds of overhead, not the seconds of
planning a Ray Data job costs); without Ray a ``ProcessPoolExecutor`` runs the very same functions,
which is what ``executor: auto`` picks for an input small enough that starting Ray would cost more
than the job. Every task reports its CPU seconds and its peak RSS (``VmHWM``, reset at the task's
start where the kernel allows), so a phase can say what its largest worker held.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

from shards import storage

LOCAL, RAY = "local", "ray"


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process (since the last reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Hand memory freed by earlier tasks back to the OS (Arrow's pool, glibc's heap), so a worker
    that ran many tasks does not carry their high-water marks into the next one's peak RSS."""
    import gc

    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _call(fn: Callable[[Any], dict[str, Any]], opts: dict[str, Any], item: Any) -> dict[str, Any]:
    storage.configure(**opts)
    release_memory()
    reset_peak_rss()
    cpu = time.process_time()
    out = dict(fn(item) or {})
    out["_cpu_s"] = time.process_time() - cpu
    out["_peak_rss"] = peak_rss()
    return out


class Runner:
    """Runs a phase's tasks: ``kind`` is ``local`` (a process pool of ``workers``) or ``ray``."""

    def __init__(self, kind: str, workers: int) -> None:
        if kind not in (LOCAL, RAY):
            raise ValueError(f"dedup executor must be 'local' or 'ray', not {kind!r}")
        self.kind, self.workers = kind, max(1, int(workers))

    def map(self, fn: Callable[[Any], dict[str, Any]], items: Sequence[Any]) -> tuple[list[dict[str, Any]], dict]:
        """``fn`` over ``items`` (results in order) and the phase's worker stats: tasks, CPU seconds
        of all tasks, the largest task's peak RSS."""
        opts = storage.storage_options()
        if not items:
            results: list[dict[str, Any]] = []
        elif self.kind == RAY:
            import ray

            remote = ray.remote(num_cpus=1, max_retries=3)(_call)
            results = ray.get([remote.remote(fn, opts, item) for item in items])
        else:
            import pyarrow.dataset  # noqa: F401 - Parquet reads import it (and pandas): once, before the fork

            ray = sys.modules.get("ray")
            # fork is cheap and shares the imported modules; after ray.init a forked child would
            # inherit Ray's threads, so then a fork server gives clean workers
            context = mp.get_context("forkserver" if ray is not None and ray.is_initialized() else "fork")
            with ProcessPoolExecutor(min(self.workers, len(items)), mp_context=context) as pool:
                results = list(pool.map(partial(_call, fn, opts), items, chunksize=1))
        stats = {
            "tasks": len(results),
            "worker_cpu_s": round(sum(r.pop("_cpu_s") for r in results), 3),
            "worker_peak_rss": max((r.pop("_peak_rss") for r in results), default=0),
        }
        return results, stats
