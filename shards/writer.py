"""WebDataset shard writer: plain tar, rolled over by samples or bytes, committed by rename.

Tar headers are fixed (mtime 0, uid 0, mode 0644) so the same samples always give the same bytes
and the same sha256: a resumed run reproduces the shards of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Mapping
from typing import IO, Any

from shards import storage
from shards.codec import encode_sample
from shards.manifest import ShardInfo, ShardStats

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # end-of-archive marker


class _HashingWriter(io.RawIOBase):
    """Counts and hashes bytes on their way to the real file."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.count += len(mv)
        self.raw.write(mv)
        return len(mv)


def _tar_member_size(n: int) -> int:
    return TAR_BLOCK + ((n + TAR_BLOCK - 1) // TAR_BLOCK) * TAR_BLOCK


def encoded_size(members: Mapping[str, bytes]) -> int:
    return sum(_tar_member_size(len(v)) for v in members.values())


def final_tar_size(member_bytes: int) -> int:
    """Size on disk: members, the end marker, then padding to tarfile's 10 KiB record."""
    return -(-(member_bytes + TAR_END) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes samples into ``<directory>/<prefix>-NNNNN.tar``; ``close()`` returns what it wrote.

    A shard is closed when it holds ``max_samples`` samples or adding the next sample would make
    the file pass ``max_bytes`` (a single larger sample still gets a shard of its own).
    """

    def __init__(self, directory: str, prefix: str, max_samples: int = 10_000, max_bytes: int = 1 << 30) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.directory = directory
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.written: list[ShardInfo] = []
        self._index = 0
        self._ctx: Any = None
        self._out: _HashingWriter | None = None
        self._stats = ShardStats()
        self._bytes = 0
        self._name = ""

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        self._name = f"{self.prefix}-{self._index:05d}.tar"
        self._index += 1
        self._ctx = storage.atomic_write(storage.join(self.directory, self._name))
        self._out = _HashingWriter(self._ctx.__enter__())
        self._stats = ShardStats()
        self._bytes = 0

    def _finish(self) -> None:
        assert self._out is not None
        # What tarfile.close() writes: the end-of-archive blocks, then zeros up to a full record.
        self._out.write(bytes(final_tar_size(self._bytes) - self._bytes))
        self._ctx.__exit__(None, None, None)
        self.written.append(ShardInfo(self._name, self._out.sha.hexdigest(), self._out.count, self._stats))
        self._out = self._ctx = None

    def write(self, row: Mapping[str, Any]) -> None:
        key = row["id"]
        if "." in key or "/" in key:
            raise ValueError(f"sample id {key!r} cannot be a WebDataset key")
        members = encode_sample(row)
        size = encoded_size(members)
        if self._out is not None and (
            self._stats.samples >= self.max_samples or final_tar_size(self._bytes + size) > self.max_bytes
        ):
            self._finish()
        if self._out is None:
            self._open()
        assert self._out is not None
        for suffix, data in members.items():
            # The same USTAR member tarfile's addfile writes, without its stream layer in between.
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._out.write(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
            self._out.write(data)
            self._out.write(bytes(-len(data) % TAR_BLOCK))
        self._stats.add(row)
        self._bytes += size

    def write_all(self, rows: Iterable[Mapping[str, Any]]) -> list[ShardInfo]:
        for row in rows:
            self.write(row)
        return self.close()

    def close(self) -> list[ShardInfo]:
        if self._out is not None:
            self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the open shard (its temporary file goes with the failed context)."""
        if self._ctx is not None:
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
        self._out = self._ctx = None
