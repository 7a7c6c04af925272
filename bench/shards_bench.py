"""Shard write and read against bare ``tarfile`` / ``webdataset``, and both against the disk.

Same samples, same bytes, same run, contenders timed in turns, one thread each. Ours writes
through ShardWriter (encodes the JSON member, hashes with sha256, fsyncs and renames); bare tarfile
writes the pre-encoded members and fsyncs too. The write bar is the disk's raw copy speed
(``shutil.copyfile`` + fsync of the same shards). Reads come twice, each against its own raw bar:
warm (page cache; bar: a raw sequential read of the same files, also warm) and cold (the shards
dropped from the page cache with ``posix_fadvise`` before every read of every contender; bar: the
raw sequential read, cold). Ours decodes each sample's JSON into a Sample row; webdataset only
groups raw members.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import MB, Row, best_times, drop_from_cache, image_caption_rows, main, read_raw, result
from shards.codec import encode_sample
from shards.reader import iter_samples
from shards.writer import ShardWriter


def _fsync(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _bare_write(directory: Path, shards: Sequence[Sequence[tuple[str, dict[str, bytes]]]]) -> list[Path]:
    """The same members through plain tarfile, one fsynced tar per shard."""
    directory.mkdir()
    paths = []
    for i, samples in enumerate(shards):
        path = directory / f"bare-{i:05d}.tar"
        with open(path, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in samples:
                    for suffix, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(data)
                        info.mtime = 0
                        info.mode = 0o644
                        tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        paths.append(path)
    return paths


def _copy_all(paths: Sequence[Path], directory: Path) -> None:
    directory.mkdir()
    for p in paths:
        dst = directory / p.name
        shutil.copyfile(p, dst)
        _fsync(dst)


def _cold_reads(fns: dict[str, Callable[[], object]], paths: Sequence[Path], repeats: int) -> dict[str, float]:
    """Best-of-N read times, in turns, with the shards dropped from the page cache before each read."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, read in fns.items():
            if not drop_from_cache(paths):
                return {}
            start = time.perf_counter()
            read()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _count_ours(paths: Sequence[Path]) -> int:
    return sum(1 for p in paths for _ in iter_samples(str(p)))


def _count_webdataset(paths: Sequence[Path]) -> int:
    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset warns about single-process node splitting
        return sum(1 for _ in wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def run(quick: bool = False) -> list[Row]:
    n, per_shard, repeats = (120, 40, 3) if quick else (1000, 250, 7)
    rows = image_caption_rows(n)
    encoded = [(r["id"], encode_sample(r)) for r in rows]
    shards = [encoded[i : i + per_shard] for i in range(0, n, per_shard)]
    runs = itertools.count()

    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        root = Path(tmp)
        reference = ShardWriter(str(root / "reference"), "ours", max_samples=per_shard).write_all(rows)
        ours_paths = [root / "reference" / info.path for info in reference]
        ours_bytes = sum(info.bytes for info in reference)
        bare_bytes = sum(p.stat().st_size for p in _bare_write(root / "bare-reference", shards))

        def ours_write() -> None:
            ShardWriter(str(root / f"ours-{next(runs)}"), "ours", max_samples=per_shard).write_all(rows)

        def copy() -> None:
            _copy_all(ours_paths, root / f"copy-{next(runs)}")

        writes = best_times(
            {"ours": ours_write, "bare": lambda: _bare_write(root / f"bare-{next(runs)}", shards), "copy": copy},
            repeats,
        )
        if _count_ours(ours_paths) != n or _count_webdataset(ours_paths) != n:  # also warms both readers
            raise RuntimeError("readers disagree on the sample count")
        read_ours, read_bare = (lambda: _count_ours(ours_paths)), (lambda: _count_webdataset(ours_paths))
        read_disk = lambda: read_raw(ours_paths)  # noqa: E731
        read_disk()  # the whole set in the page cache
        reads = best_times({"ours": read_ours, "bare": read_bare, "raw": read_disk}, repeats)
        cold = _cold_reads({"ours": read_ours, "bare": read_bare, "raw": read_disk}, ours_paths, repeats)

    mb = ours_bytes / MB
    write_mb, bare_write_mb, copy_mb = mb / writes["ours"], bare_bytes / MB / writes["bare"], mb / writes["copy"]
    size = f"{n} samples of ~{mb / n * 1000:.0f} KB, {len(ours_paths)} shards, {mb:.1f} MB; 1 thread each"
    out = [
        result("shards.write", "MB/s", write_mb, bare_write_mb, f"bare=tarfile+fsync; {size}"),
        result("shards.write/disk", "MB/s", write_mb, copy_mb, "bare=shutil.copyfile+fsync (physical limit)"),
        result("shards.read/warm", "samples/s", n / reads["ours"], n / reads["bare"], "bare=webdataset raw dicts"),
        result("shards.read/warm", "MB/s", mb / reads["ours"], mb / reads["bare"], "bare=webdataset raw dicts"),
        result("shards.read/warm-disk", "MB/s", mb / reads["ours"], mb / reads["raw"], "bare=raw read, warm"),
    ]
    if cold:
        note = "page cache dropped before every read"
        out += [
            result("shards.read/cold", "MB/s", mb / cold["ours"], mb / cold["bare"], f"bare=webdataset; {note}"),
            result("shards.read/cold-disk", "MB/s", mb / cold["ours"], mb / cold["raw"], f"bare=raw read; {note}"),
        ]
    return out


if __name__ == "__main__":
    main(run)
