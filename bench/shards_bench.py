"""Shard write and read against bare ``tarfile`` / ``webdataset``, and both against a raw disk copy.

Same samples, same bytes, same run. Ours writes through ShardWriter (encodes the JSON member,
hashes with sha256, fsyncs and renames); bare tarfile writes the pre-encoded members and fsyncs too,
so the write ratio is the cost of our bookkeeping, not of durability. Reads run from a warm page
cache: ours decodes each sample's JSON into a Sample row, webdataset only groups raw members.
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from bench.common import MB, Row, best_time, image_caption_rows, main, result
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


def _count_ours(paths: Sequence[Path]) -> int:
    return sum(1 for p in paths for _ in iter_samples(str(p)))


def _count_webdataset(paths: Sequence[Path]) -> int:
    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset warns about single-process node splitting
        return sum(1 for _ in wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def run(quick: bool = False) -> list[Row]:
    n, per_shard, repeats = (120, 40, 3) if quick else (400, 100, 5)
    rows = image_caption_rows(n)
    encoded = [(r["id"], encode_sample(r)) for r in rows]
    shards = [encoded[i : i + per_shard] for i in range(0, n, per_shard)]
    runs = itertools.count()

    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        root = Path(tmp)

        def ours_write() -> None:
            ShardWriter(str(root / f"ours-{next(runs)}"), "ours", max_samples=per_shard).write_all(rows)

        def bare_write() -> None:
            _bare_write(root / f"bare-{next(runs)}", shards)

        t_ours_w = best_time(ours_write, repeats)
        t_bare_w = best_time(bare_write, repeats)
        ours_paths = sorted(next(root.glob("ours-*")).glob("*.tar"))
        bare_paths = sorted(next(root.glob("bare-*")).glob("*.tar"))
        ours_bytes = sum(p.stat().st_size for p in ours_paths)
        bare_bytes = sum(p.stat().st_size for p in bare_paths)

        if _count_ours(ours_paths) != n or _count_webdataset(ours_paths) != n:  # also warms both readers
            raise RuntimeError("readers disagree on the sample count")
        t_ours_r = best_time(lambda: _count_ours(ours_paths), repeats)
        t_bare_r = best_time(lambda: _count_webdataset(ours_paths), repeats)
        t_copy = best_time(lambda: _copy_all(ours_paths, root / f"copy-{next(runs)}"), repeats)

    write_mb, bare_write_mb = ours_bytes / MB / t_ours_w, bare_bytes / MB / t_bare_w
    read_mb, bare_read_mb = ours_bytes / MB / t_ours_r, ours_bytes / MB / t_bare_r
    copy_mb = ours_bytes / MB / t_copy
    size = f"{n} samples, {len(ours_paths)} shards, {ours_bytes / MB:.1f} MB"
    return [
        result("shards.write", "MB/s", write_mb, bare_write_mb, f"bare=tarfile+fsync; {size}"),
        result("shards.read", "samples/s", n / t_ours_r, n / t_bare_r, "bare=webdataset raw dicts; warm cache"),
        result("shards.read", "MB/s", read_mb, bare_read_mb, "bare=webdataset raw dicts; warm cache"),
        result("shards.write/disk", "MB/s", write_mb, copy_mb, "bare=shutil.copyfile+fsync (physical limit)"),
        result("shards.read/disk", "MB/s", read_mb, copy_mb, "bare=shutil.copyfile+fsync (physical limit)"),
    ]


if __name__ == "__main__":
    main(run)
