"""Timing, result rows and real sample data shared by the stage benchmarks.

Numbers are only meaningful as ratios taken in the same run on the same machine, so every row
carries ours, the bare library's and their ratio. Nothing here asserts on timings.

Fairness rules every row follows (a row that flatters us is a bug):
- both sides do the same work on the same N, and run in turns (``best_times`` / ``alternate_best``),
  each kept at its best of the same number of repeats, so a busy spell of the machine hits both;
- both sides get the same threads; where they cannot, the row's stage name says so;
- "1 core" rows run pinned to one core (``pinned``), restored afterwards;
- reads are reported warm (page cache) and cold (``drop_from_cache``) against the matching raw bar
  (a raw sequential read of the same files); writes against copy + fsync;
- start-up (a cluster, a model load) is its own row, never hidden in or left out of a throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

MB = 1_000_000

Row = dict[str, Any]


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best-of-N wall seconds: the minimum is the run least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def best_times(fns: Mapping[str, Callable[[], object]], repeats: int = 3) -> dict[str, float]:
    """Best-of-N for several contenders, run in turns so a slow spell of the machine hits all."""
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its finished children (ffmpeg, ...)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def alternate_best(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-N wall seconds per function, run in turns so load drifts hit all alike; also the best
    CPU seconds under ``<name>_cpu`` (less sensitive to a machine shared with other work)."""
    best = {name: float("inf") for name in fns} | {f"{name}_cpu": float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), cpu_seconds()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            best[f"{name}_cpu"] = min(best[f"{name}_cpu"], cpu_seconds() - cpu)
    return best


def cpu_note(t: Mapping[str, float], ours: str = "ours", bare: str = "bare") -> str:
    return f"cpu-time ratio {t[f'{bare}_cpu'] / t[f'{ours}_cpu']:.3f}"


@contextmanager
def pinned(cores: int = 1) -> Iterator[set[int]]:
    """Run the block on ``cores`` cores of this process's current set (``sched_setaffinity``), then
    restore the set. Threads and processes started inside inherit the pinning."""
    if not hasattr(os, "sched_setaffinity"):
        yield set()
        return
    before = os.sched_getaffinity(0)
    chosen = set(sorted(before)[:cores])
    os.sched_setaffinity(0, chosen)
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, before)


def drop_from_cache(paths: Sequence[str | Path]) -> bool:
    """Evict files from the page cache (``posix_fadvise(DONTNEED)`` after an fsync: no root needed),
    so the next read comes from the disk. False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_raw(paths: Sequence[str | Path], block: int = 1 << 20) -> int:
    """A raw sequential read of the files, 1 MiB at a time: the disk's (or page cache's) bar."""
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(block):
                total += len(chunk)
    return total


def result(stage: str, unit: str, ours_per_s: float, bare_per_s: float, notes: str = "", **extra: Any) -> Row:
    """One result row; ``ratio`` > 1 means ours is faster than the bare library. ``stage`` is
    ``<operator>.<variant>`` (``pipelines/plan.py`` reads the part before the first dot); ``extra``
    adds keys such as ``cores=1`` for a row pinned to one core."""
    return {
        "stage": stage,
        "unit": unit,
        "ours_per_s": round(ours_per_s, 2),
        "bare_per_s": round(bare_per_s, 2),
        "ratio": round(ours_per_s / bare_per_s, 3) if bare_per_s else None,
        "notes": notes,
        **extra,
    }


def format_table(rows: Sequence[Row]) -> str:
    cols = ["stage", "unit", "ours_per_s", "bare_per_s", "ratio", "notes"]
    cells = [cols] + [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1] for line in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    Path(path).write_text(json.dumps(list(rows), indent=2) + "\n", encoding="utf-8")


def main(run: Callable[[bool], list[Row]], argv: Sequence[str] | None = None) -> list[Row]:
    """Command line shared by every bench module: ``--quick`` for small sizes, ``--out`` for JSON."""
    parser = argparse.ArgumentParser(description="Throughput as a ratio against the bare library.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--out", help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(format_table(rows))
    if args.out:
        write_json(rows, args.out)
    return rows


@cache
def jpeg_variants() -> tuple[bytes, ...]:
    """Real photographs as JPEGs of 30-65 KB, a typical web image; a few sizes each for variety."""
    from pipelines.demo_data import PHOTOS, photo_bytes

    out = []
    for name in PHOTOS:
        for size in ((400, 300), (480, 360), (512, 384)):
            data = photo_bytes(name, size=size)
            if 30_000 <= len(data) <= 65_000:
                out.append(data)
    return tuple(out)


def image_caption_rows(n: int) -> list[Row]:
    """``n`` image_caption samples with distinct ids, cycling over the real JPEGs."""
    from pipelines.demo_data import PHOTOS
    from shards.schema import Segment, make_sample

    images = jpeg_variants()
    captions = list(PHOTOS.values())
    return [
        make_sample(
            "bench",
            "image_caption",
            [Segment("image", bytes=images[i % len(images)]), Segment("text", text=captions[i % len(captions)])],
            locator=f"bench/{i:06d}",
        )
        for i in range(n)
    ]
