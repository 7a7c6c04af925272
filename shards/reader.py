"""Read WebDataset tars, ours or others', into Sample rows, rejecting what is unsafe or broken.

Members are read into memory, never extracted, so a hostile path cannot write anywhere; it is
still reported. Grouping follows WebDataset: consecutive members sharing a key form a sample.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

from shards import storage
from shards.codec import DecodeError, decode_sample
from shards.schema import SAMPLE_SCHEMA, locator_id
from shards.tarstream import TarCorrupt, TarMember, iter_members

DEFAULT_MAX_MEMBER_BYTES = 2 << 30


@dataclass
class Reject:
    """An input that did not become a sample: its id, a short reason and a detail."""

    id: str
    reason: str
    detail: str = ""
    locator: str = ""


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


def iter_tar_records(
    fileobj: IO[bytes], source: str, shard: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[Record]:
    """Samples and rejects from one tar stream; a truncated tar ends with a reject, not a crash."""
    current_key: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> Iterator[Record]:
        if current_key is None:
            return
        locator = f"{shard}#{current_key}"
        try:
            row = decode_sample(current_key, members, source=source, locator=locator)
        except DecodeError as e:
            yield Record(reject=Reject(locator_id(source, locator), e.reason, e.detail, locator))
            return
        yield Record(sample=row)

    def wanted(member: TarMember) -> bool:  # unsafe names are read but never written anywhere
        return member.size <= max_member_bytes

    try:
        for member, data in iter_members(fileobj, wanted):
            if member.isdir():
                continue
            reason = unsafe_member_reason(member, max_member_bytes)
            if reason is not None:
                locator = f"{shard}#{member.name}"
                yield Record(reject=Reject(locator_id(source, locator), reason, member.name, locator))
                continue
            key, ext = split_key(member.name)
            if key != current_key:
                yield from flush()
                current_key, members = key, {}
            members[ext] = data if data is not None else b""
        yield from flush()
    except TarCorrupt as e:
        if e.offset == 0:
            locator = f"{shard}#"
            yield Record(reject=Reject(locator_id(source, locator), "unreadable tar", str(e)[:200], locator))
            return
        locator = f"{shard}#{current_key or ''}@truncated"
        yield Record(reject=Reject(locator_id(source, locator), "truncated or corrupt tar", str(e)[:200], locator))


def iter_records(
    path: str, source: str = "", max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, name: str | None = None
) -> Iterator[Record]:
    """Records of one tar; ``name`` (default: the path) prefixes locators of foreign samples."""
    with storage.open_read(path) as f:
        yield from iter_tar_records(f, source or path, name or path, max_member_bytes)


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
