"""Read WebDataset tars, ours or others', into Sample rows, rejecting what is unsafe or broken.

Members are read into memory, never extracted, so a hostile path cannot write anywhere; it is
still reported. Grouping follows WebDataset: consecutive members sharing a key form a sample.
What a key may make us hold is bounded (``TarBounds``): members are counted and sized from their
headers before their data is read, so a key over its bound is skipped, not loaded; members compressed
one by one (``txt.gz``) are inflated under the same bounds (``shards.codec.inflate_members``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

from shards import storage
from shards.codec import TRUSTED_JSON_DEPTH, DecodeError, decode_sample
from shards.schema import SAMPLE_SCHEMA, locator_id, printable
from shards.tarstream import TarCorrupt, TarMember, iter_members

DEFAULT_MAX_MEMBER_BYTES = 2 << 30


@dataclass
class Reject:
    """An input that did not become a sample: its id, a short reason and a detail."""

    id: str
    reason: str
    detail: str = ""
    locator: str = ""

    def __post_init__(self) -> None:  # names from disks and tars may hold undecodable bytes
        self.detail, self.locator = printable(self.detail), printable(self.locator)


@dataclass
class Record:
    """What a reader yields: a sample row, or the reject that stands for one input."""

    sample: dict[str, Any] | None = None
    reject: Reject | None = None


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's split: key is everything before the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext


def unsafe_member_reason(member: TarMember, max_member_bytes: int) -> str | None:
    name = member.name
    if printable(name) != name:
        return "unsafe tar member: name is not utf-8"
    if name.startswith("/"):
        return "unsafe tar member: absolute path"
    if ".." in name and ".." in name.split("/"):
        return "unsafe tar member: parent path"
    if member.issym() or member.islnk():
        return "unsafe tar member: link"
    if not member.isfile():
        return "unsafe tar member: not a regular file"
    if member.size > max_member_bytes:
        return "tar member too large"
    return None


@dataclass
class TarBounds:
    """What one tar may make us hold: bytes per member, members and bytes per key (after
    decompression: a gzip of zeros is small on disk), and its json members' size and depth.

    The defaults are for reading our own output; ingest passes the recipe's limits."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_members_per_key: int = 1 << 16
    max_key_bytes: int = 4 << 30
    max_json_depth: int | None = TRUSTED_JSON_DEPTH
    max_json_bytes: int | None = None


class _KeyBudget:
    """Members and bytes of the key being read, counted before its data is read so an over-budget
    key's remaining members are skipped unread."""

    def __init__(self, bounds: TarBounds) -> None:
        self.bounds = bounds
        self.key: str | None = None
        self.members = 0
        self.bytes = 0
        self.over: tuple[str, str] | None = None

    def admit(self, member: TarMember) -> bool:
        """Count ``member`` against its key; False when its data must not be read."""
        key = split_key(member.name)[0]
        if key != self.key:
            self.key, self.members, self.bytes, self.over = key, 0, 0, None
        self.members += 1
        if member.size <= self.bounds.max_member_bytes:
            self.bytes += member.size
        if self.over is None and self.members > self.bounds.max_members_per_key:
            self.over = ("too many members in sample", f"over {self.bounds.max_members_per_key} members")
        if self.over is None and self.bytes > self.bounds.max_key_bytes:
            self.over = ("sample too large", f"over {self.bounds.max_key_bytes} bytes in its members")
        return self.over is None and member.size <= self.bounds.max_member_bytes


def iter_tar_records(
    fileobj: IO[bytes],
    source: str,
    shard: str,
    max_member_bytes: int | None = None,
    *,
    bounds: TarBounds | None = None,
    trust_id: bool = True,
) -> Iterator[Record]:
    """Samples and rejects from one tar stream; a truncated tar ends with a reject, not a crash.

    Every locator is unique within the tar (a key that comes back after another key gets ``~2``,
    ``~3``...), so ids computed from source + locator cannot collide."""
    bounds = bounds or TarBounds()
    if max_member_bytes is not None:
        bounds = TarBounds(**{**vars(bounds), "max_member_bytes": max_member_bytes})
    budget = _KeyBudget(bounds)
    used: set[str] = set()
    current_key: str | None = None
    current_over: tuple[str, str] | None = None
    members: dict[str, bytes] = {}

    def unique(locator: str) -> str:
        n, candidate = 1, locator
        while candidate in used:
            n += 1
            candidate = f"{locator}~{n}"
        used.add(candidate)
        return candidate

    def reject(locator: str, reason: str, detail: str) -> Record:
        locator = unique(locator)
        return Record(reject=Reject(locator_id(source, locator), reason, detail[:500], locator))

    def flush() -> Iterator[Record]:
        if current_key is None:
            return
        if current_over is not None:
            yield reject(f"{shard}#{current_key}", *current_over)
            return
        locator = unique(f"{shard}#{current_key}")
        try:
            row = decode_sample(
                current_key,
                members,
                source=source,
                locator=locator,
                trust_id=trust_id,
                max_json_depth=bounds.max_json_depth,
                max_json_bytes=bounds.max_json_bytes,
                max_member_bytes=bounds.max_member_bytes,
                max_key_bytes=bounds.max_key_bytes,
            )
        except DecodeError as e:
            yield Record(reject=Reject(locator_id(source, locator), e.reason, e.detail[:500], locator))
            return
        yield Record(sample=row)

    def wanted(member: TarMember) -> bool:  # unsafe members are never read, nor written anywhere
        if unsafe_member_reason(member, bounds.max_member_bytes) not in (None, "tar member too large"):
            return False
        return budget.admit(member)

    try:
        for member, data in iter_members(fileobj, wanted):
            if member.isdir():
                continue
            reason = unsafe_member_reason(member, bounds.max_member_bytes)
            if reason is not None and (reason != "tar member too large" or budget.over is None):
                yield reject(f"{shard}#{member.name}", reason, member.name)
                continue
            key, ext = split_key(member.name)
            if key != current_key:
                yield from flush()
                current_key, members, current_over = key, {}, None
            if current_over is None and budget.over is not None:
                current_over = budget.over
            if current_over is None and ext in members:
                current_over = ("duplicate member in sample", member.name)
            if current_over is not None:
                members = {}  # what was read of this key is dropped; the rest is skipped unread
                continue
            members[ext] = data if data is not None else b""
        yield from flush()
    except TarCorrupt as e:
        if e.offset == 0:
            yield reject(f"{shard}#", "unreadable tar", str(e)[:200])
            return
        yield reject(f"{shard}#{current_key or ''}@truncated", "truncated or corrupt tar", str(e)[:200])


def iter_records(
    path: str,
    source: str = "",
    max_member_bytes: int | None = None,
    name: str | None = None,
    *,
    bounds: TarBounds | None = None,
    trust_id: bool = True,
) -> Iterator[Record]:
    """Records of one tar; ``name`` (default: the path) prefixes locators. Ingest passes
    ``trust_id=False`` (ids computed, claims kept in meta) and the recipe's ``bounds``."""
    with storage.open_read(path) as f:
        yield from iter_tar_records(f, source or path, name or path, max_member_bytes, bounds=bounds, trust_id=trust_id)


def iter_samples(path: str) -> Iterator[dict[str, Any]]:
    """Samples of a shard we trust (our own output): any reject is an error."""
    for rec in iter_records(path):
        if rec.reject is not None:
            raise ValueError(f"{path}: {rec.reject.reason} ({rec.reject.detail})")
        assert rec.sample is not None
        yield rec.sample


def read_shard(path: str) -> pa.Table:
    """A whole shard as an Arrow table (Sample columns only; extra score columns are dropped)."""
    rows = [{k: r[k] for k in SAMPLE_SCHEMA.names} for r in iter_samples(path)]
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
