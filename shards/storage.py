"""Local and object-store I/O behind one small API (fsspec underneath).

Writes are atomic for readers: a local file is written under a temporary name and renamed; an S3
object only becomes visible when its (multipart) upload completes, so it is written in place.
The S3 endpoint comes from the recipe's ``storage`` block or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import hashlib
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


def sizes(directory: str) -> dict[str, int]:
    """``{name: bytes}`` of the files directly under ``directory`` from one listing (one LIST on S3,
    instead of a HEAD per file); temporaries of unfinished writes are left out."""
    if not is_remote(directory):
        if not os.path.isdir(directory):
            return {}
        with os.scandir(directory) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file() and not e.name.startswith(TMP)}
    fs, p = filesystem(directory)
    try:
        entries = fs.ls(p, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") != "directory" and not name.startswith(TMP):
            out[name] = int(e.get("size") or 0)
    return out


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


# ------------------------------------------------------------ conditional writes (the run lock)


class Conflict(FileExistsError):
    """A conditional write found another version of the object than the one it named."""


def _s3_split(path: str) -> tuple[Any, str, str] | None:
    """``(s3fs, bucket, key)`` for an S3 path, None for other stores."""
    if not path.startswith(("s3://", "s3a://")):
        return None
    fs, p = filesystem(path)
    bucket, _, key = p.partition("/")
    return fs, bucket, key


def _is_precondition_failure(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


def put_conditional(path: str, data: bytes, if_match: str | None = None) -> str:
    """Write ``data`` only when no object is at ``path`` (``if_match`` None) or when the object there
    is still version ``if_match``; returns the new version tag. Raises ``Conflict`` otherwise,
    ``FileNotFoundError`` when ``if_match`` names an object that is gone.

    S3 does this atomically (``If-None-Match: *`` / ``If-Match: etag``). Other remote stores get a
    check-then-write, which two writers in the same instant can both pass; local files are locked
    with ``flock`` instead (see ``pipelines.rundir``)."""
    s3 = _s3_split(path)
    if s3 is not None:
        fs, bucket, key = s3
        cond = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            if _is_precondition_failure(e):
                raise Conflict(f"{path} changed") from e
            raise
        finally:
            fs.invalidate_cache(f"{bucket}/{key}")
        return str(response["ETag"])
    try:
        current: str | None = read_versioned(path)[1]
    except FileNotFoundError:
        current = None
    if if_match is not None and current is None:
        raise FileNotFoundError(path)
    if current != if_match:
        raise Conflict(f"{path} changed")
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_versioned(path: str) -> tuple[bytes, str, float | None]:
    """``(data, version tag, age in seconds)`` of an object; the age is measured on the store's own
    clock (S3: response ``Date`` minus ``LastModified``), so clocks of different hosts never matter.

    On S3 the tag comes from the same HEAD as the age; the body is a second GET, so a caller that
    acts on the object conditions its write on the tag (``put_conditional``), never on the body."""
    s3 = _s3_split(path)
    if s3 is not None:
        fs, bucket, key = s3
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        age = None
        date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date and head.get("LastModified") is not None:
            age = (email.utils.parsedate_to_datetime(date) - head["LastModified"]).total_seconds()
        return fs.cat_file(f"{bucket}/{key}"), str(head["ETag"]), age
    fs, p = filesystem(path)
    data = read_bytes(path)
    try:
        modified = fs.modified(p)
    except (NotImplementedError, OSError, AttributeError):
        return data, hashlib.sha256(data).hexdigest(), None
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=dt.timezone.utc)
    return data, hashlib.sha256(data).hexdigest(), (dt.datetime.now(dt.timezone.utc) - modified).total_seconds()


def remove_conditional(path: str, if_match: str) -> bool:
    """Delete the object only while it is still version ``if_match``; False when it is not (or gone).

    Stores without conditional deletes get a check-then-delete."""
    s3 = _s3_split(path)
    if s3 is not None:
        fs, bucket, key = s3
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=if_match)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if _is_precondition_failure(e):
                return False
            # a store that does not know conditional deletes: check, then delete
        finally:
            fs.invalidate_cache(f"{bucket}/{key}")
    try:
        if read_versioned(path)[1] != if_match:
            return False
    except FileNotFoundError:
        return False
    remove(path)
    return True
