"""Check a shard against what its manifest says: it exists, has the recorded size and sha256.

Size is one ``stat`` (it catches truncation, the usual damage); sha256 needs the whole file, so
callers ask for it where they read the whole shard anyway (audit, repair, the trainer's loader).
``ShardScan`` does both in the one pass that parses the shard, so a check costs no second read.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Mapping
from typing import Any

from shards import storage
from shards.reader import Record, iter_tar_records


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_damage(size: int | None, expected: Mapping[str, Any]) -> str | None:
    """Why a shard of ``size`` bytes (None: not there) is not the manifest entry ``expected``."""
    if size is None:
        return "missing"
    want = expected.get("bytes")
    if want is not None and size != want:
        return f"size {size} B, manifest says {want} B"
    return None


def shard_damage(path: str, expected: Mapping[str, Any], full: bool = False) -> str | None:
    """Why the shard at ``path`` is not what ``expected`` (a manifest entry) says, or None.

    ``full`` also compares the sha256 (reads the whole file)."""
    try:
        if not storage.exists(path):
            return "missing"
        size = storage.size(path)
    except OSError as e:
        return f"unreadable: {e}"
    damage = size_damage(size, expected)
    if damage is not None:
        return damage
    if full and expected.get("sha256"):
        try:
            digest = sha256_of(path)
        except OSError as e:
            return f"unreadable: {e}"
        if digest != expected["sha256"]:
            return "sha256 mismatch"
    return None


class _Hashing(io.RawIOBase):
    """A raw reader that hashes every byte it hands out; wrapped in a BufferedReader (which gives
    the parser its ``peek``) and never seekable, so the parser reads every byte exactly once."""

    def __init__(self, f: io.BufferedIOBase | Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.bytes += n
        return n


class ShardScan:
    """One read of a shard that yields its records and then knows whether it is damaged.

    ``damage`` is set before any record when the size is off (a truncated shard is not parsed), on
    the first record the parser rejects (``unparseable: reason``), and, once every byte was read,
    on a sha256 mismatch. A scan stopped early (a preview) checks only what it read."""

    def __init__(self, path: str, expected: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        self.path = path
        self.expected = expected
        self.name = name or path
        self.damage: str | None = None
        self.rejects = 0
        self.complete = False

    def _note(self, why: str) -> None:
        if self.damage is None:
            self.damage = why

    def records(self) -> Iterator[Record]:
        """Every sample and reject of the shard; never raises for what is wrong with the file."""
        if self.expected is not None:
            self.damage = shard_damage(self.path, self.expected)
            if self.damage is not None:
                return
        try:
            f = storage.open_read(self.path)
        except OSError as e:
            self._note("missing" if isinstance(e, FileNotFoundError) else f"unreadable: {e}")
            return
        try:
            raw = _Hashing(f)
            buffered = io.BufferedReader(raw, buffer_size=1 << 20)
            for rec in iter_tar_records(buffered, self.name, self.name):
                if rec.reject is not None:
                    self.rejects += 1
                    self._note(f"unparseable: {rec.reject.reason} ({rec.reject.detail})")
                yield rec
            while buffered.read(1 << 20):  # the tail after the end-of-archive blocks counts too
                pass
            self.complete = True
            want = (self.expected or {}).get("sha256")
            if want and raw.sha.hexdigest() != want:
                self.damage = "sha256 mismatch"  # the cause of any parse error it brought
        except Exception as e:  # noqa: BLE001 - whatever the file does to the parser is damage, not a crash
            self._note(f"unreadable: {type(e).__name__}: {e}")
        finally:
            f.close()
