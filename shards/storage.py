"""Local and object-store I/O behind one small API (fsspec underneath).

Writes are atomic for readers: a local file is written under a temporary name and renamed; an S3
object only becomes visible when its (multipart) upload completes, so it is written in place.
The S3 endpoint comes from the recipe's ``storage`` block or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

_options: dict[str, dict[str, Any]] = {}
TMP = ".tmp-"  # prefix of a local file still being written by ``atomic_write``


def configure(endpoint_url: str | None = None, **s3_options: Any) -> None:
    """Set S3 options (endpoint, key, secret, client kwargs) for every later call in this process."""
    opts = dict(s3_options)
    if endpoint_url:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
    _options["s3"] = opts


def storage_options() -> dict[str, Any]:
    """What ``configure`` set, so a Ray worker can be configured the same way."""
    return dict(_options.get("s3", {}))


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = path.split("://", 1)[0] if is_remote(path) else "file"
    opts = dict(_options.get(protocol, {}))
    if protocol == "s3" and "client_kwargs" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    fs = fsspec.filesystem(protocol, **opts)
    return fs, fs._strip_protocol(path) if protocol != "file" else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str, suffix: str = "") -> list[str]:
    """Sorted full paths (with protocol for remote) of files directly under ``path``; the
    temporaries of unfinished atomic writes (``.tmp-*``) are not files yet and are left out."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        return []
    names = [n for n in fs.ls(p, detail=False) if n.endswith(suffix) and not n.rsplit("/", 1)[-1].startswith(TMP)]
    if is_remote(path):
        prefix = path.split("://", 1)[0] + "://"
        names = [prefix + n for n in names]
    return sorted(names)


def size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


def open_read(path: str) -> IO[bytes]:
    """A seekable binary reader with the full ``io`` interface (``readline(size)`` included)."""
    if not is_remote(path):
        return open(os.path.abspath(path.removeprefix("file://")), "rb")  # noqa: SIM115 - the caller closes it
    fs, p = filesystem(path)
    return io.BufferedReader(fs.open(p, "rb"), buffer_size=1 << 20)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A writable file that appears at ``path`` whole or not at all."""
    fs, p = filesystem(path)
    if is_remote(path):
        with fs.open(p, "wb") as f:
            yield f
        return
    directory = os.path.dirname(p)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{TMP}{uuid.uuid4().hex}-{os.path.basename(p)}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def remove(path: str) -> None:
    fs, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p)


def remove_stale_temporaries(directory: str) -> int:
    """Delete ``.tmp-*`` files a killed writer left behind; returns how many."""
    if is_remote(directory) or not os.path.isdir(directory):
        return 0
    n = 0
    for name in os.listdir(directory):
        if name.startswith(TMP):
            os.unlink(os.path.join(directory, name))
            n += 1
    return n
