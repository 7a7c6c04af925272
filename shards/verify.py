"""Check a shard against what its manifest says: it exists, has the recorded size and sha256.

Size is one ``stat`` (it catches truncation, the usual damage); sha256 needs the whole file, so
callers ask for it where they read the whole shard anyway (audit, repair, the trainer's loader).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from shards import storage


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_damage(path: str, expected: Mapping[str, Any], full: bool = False) -> str | None:
    """Why the shard at ``path`` is not what ``expected`` (a manifest entry) says, or None.

    ``full`` also compares the sha256 (reads the whole file)."""
    try:
        if not storage.exists(path):
            return "missing"
        size = storage.size(path)
    except OSError as e:
        return f"unreadable: {e}"
    want = expected.get("bytes")
    if want is not None and size != want:
        return f"size {size} B, manifest says {want} B"
    if full and expected.get("sha256"):
        try:
            digest = sha256_of(path)
        except OSError as e:
            return f"unreadable: {e}"
        if digest != expected["sha256"]:
            return "sha256 mismatch"
    return None
