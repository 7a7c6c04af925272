"""Where a run may read: local paths under allowed roots (by real path), URIs under allowed prefixes.

One rule for ingest and for the trainer, so a record or a shard can never make either read
``/etc/passwd``, follow a symlink out of its source, or fetch an arbitrary URL (an SSRF). Local
paths are compared after ``realpath`` (symlinks that stay inside are fine); remote URIs by scheme
and normalised prefix, and any ``..`` segment in a remote URI is refused outright. What may be
opened must also be a regular file: a fifo blocks a reader forever and ``/dev/zero`` never ends.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from shards import storage


class Confined(ValueError):
    """A path or URI outside what the recipe allows; ``reason`` is the ledger reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _scheme(uri: str) -> str:
    if uri.startswith("file://"):
        return "file"
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _local(path: str) -> str:
    return os.path.realpath(path.removeprefix("file://"))


def _remote(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    if ".." in rest.split("/"):
        raise Confined("uri not allowed", f"{uri[:200]} (parent segment)")
    if not rest.strip("/"):
        return f"{scheme.lower()}://"  # a bare scheme (``https://``) allows that whole scheme
    return f"{scheme.lower()}://{posixpath.normpath(rest)}".rstrip("/")


def normalize(uri: str) -> str:
    """A comparable form: the real path for local files, ``scheme://norm/path`` for remote ones."""
    return _local(uri) if _scheme(uri) == "file" else _remote(uri)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


@dataclass
class UriPolicy:
    """Allowed roots; ``check`` raises ``Confined`` for anything else."""

    prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._roots = sorted({normalize(p) for p in self.prefixes if p})

    @classmethod
    def of(cls, *groups: Iterable[str]) -> UriPolicy:
        return cls([p for g in groups for p in g])

    def allows(self, uri: str) -> bool:
        try:
            self.check(uri)
        except Confined:
            return False
        return True

    def check(self, uri: str) -> str:
        """The normalised ``uri`` when some allowed root holds it; raises ``Confined`` otherwise."""
        if not isinstance(uri, str) or not uri or "\0" in uri:
            raise Confined("uri not allowed", repr(uri)[:200])
        target = normalize(uri)
        scheme = _scheme(uri)
        for root in self._roots:
            if _scheme(root) == scheme and _under(target, root):
                return target
        what = "path outside allowed roots" if scheme == "file" else "uri not allowed"
        raise Confined(what, uri[:200])


def resolve_record_path(value: str, base: str) -> str:
    """A record's media path: relative paths resolve under the manifest's folder ``base``."""
    if storage.is_remote(value) or value.startswith("file://"):
        return value
    if posixpath.isabs(value):
        return value
    return storage.join(base, value) if storage.is_remote(base) else os.path.normpath(os.path.join(base, value))


def check_regular(real: str) -> None:
    """Raise ``Confined`` for what must never be opened: fifos, devices, sockets, directories."""
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # missing: the reader reports it with its own reason
    except OSError as e:
        raise Confined("unreadable file", str(e)) from e
    if not stat.S_ISREG(mode):
        raise Confined("not a regular file", real)


def confine_local(path: str, policy: UriPolicy, reason: str) -> str:
    """The real path to open for local ``path``: ``policy`` must allow it and it must be a regular file
    (or missing, for the reader to report); raises ``Confined``, with ``reason`` when it lies outside
    the roots. A remote path is checked by prefix and returned as it is."""
    if storage.is_remote(path):
        policy.check(path)
        return path
    try:
        real = policy.check(path)
    except Confined as e:
        raise Confined(reason, path) from e
    check_regular(real)
    return real
