"""One line for a failure a user can fix: a full disk, refused S3 credentials, an unreachable endpoint,
a bad path. Everything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
from urllib.parse import urlsplit

S3_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
S3_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
# errno values that mean "fix your path or your disk", each with what to do about it
PATH_ERRNOS = {
    errno.ENOSPC: "free some space or choose another --output",
    errno.EDQUOT: "free some space or choose another --output",
    errno.EROFS: "choose a writable --output",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EISDIR: "it must be a file",
    errno.ENOTDIR: "a part of it is a file, not a folder",
    errno.EEXIST: "a file is where a folder must go",
    errno.ENOENT: "",
    errno.ENAMETOOLONG: "",
    errno.ELOOP: "",
}


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``/``__context__`` and a Ray task error's ``cause``, outermost first."""
    chain: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(chain) < 32:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is seen for seen in chain):
            continue
        chain.append(e)
        todo += [getattr(e, "cause", None), e.__cause__, None if e.__suppress_context__ else e.__context__]
    return chain


def _s3_message(e: BaseException) -> str | None:
    """botocore's refusals: wrong or missing credentials, denied access, a missing bucket."""
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no S3 credentials: set storage key and secret, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    response = getattr(e, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    if not isinstance(error, dict):
        return None
    code, bucket = str(error.get("Code", "")), error.get("BucketName")
    if code in S3_BAD_CREDENTIALS:
        return (
            f"S3 rejected the credentials ({code}): check storage key and secret "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if code in S3_DENIED:
        where = f" to bucket {bucket}" if bucket else ""
        code = "403 Forbidden" if code == "403" else code  # a HEAD's refusal has no body to name a reason
        return f"S3 denied access{where} ({code}): check the credentials (storage key, secret) and the bucket policy"
    if code == "NoSuchBucket":
        return f"no such S3 bucket{' ' + bucket if bucket else ''}: create it or fix the path"
    return None


def _connection_message(e: BaseException) -> str | None:
    """An endpoint nobody answers at: botocore's errors name the URL, aiohttp's the host and port."""
    kwargs = getattr(e, "kwargs", None)  # botocore keeps the endpoint there
    url = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
    if url and type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        parts = urlsplit(str(url))
        return f"cannot reach S3 endpoint {parts.scheme}://{parts.netloc}: check storage endpoint_url and the network"
    if hasattr(e, "host") and hasattr(e, "port") and isinstance(e, OSError) and "Connect" in type(e).__name__:
        return f"cannot connect to {e.host}:{e.port}: check the endpoint and the network"
    if isinstance(e, ConnectionError) and not isinstance(e, BrokenPipeError):
        return f"cannot connect: {first_line(e)}"
    return None


def _disk_message(e: BaseException, target: str | None) -> str | None:
    """A path the user can fix: disk full, quota, permissions, a file where a folder should be."""
    if type(e).__name__ == "OutOfDiskError":  # Ray could not spill objects
        return "disk full: Ray cannot spill objects to disk; free some space under its temp folder (/tmp/ray)"
    if not isinstance(e, OSError) or e.errno not in PATH_ERRNOS:
        return None
    path = e.filename or (target if e.errno in (errno.ENOSPC, errno.EDQUOT) else None)
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}.get(e.errno or 0)
    what = what or os.strerror(e.errno or 0).lower()
    fix = PATH_ERRNOS[e.errno]
    return f"{what}{': ' + str(path) if path else ''}{' (' + fix + ')' if fix else ''}"


class UserFixable(Exception):
    """A failure already described in one line where it happened (a Ray worker, whose exception
    reaches the driver without its cause)."""


def describe_error(exc: BaseException, target: str | None = None) -> str | None:
    """One line for a failure the user can fix (a full disk, refused credentials, an unreachable
    endpoint, a bad path), looking through Ray's and Python's wrappers; None for anything else, which
    is a bug and keeps its traceback. ``target`` names the output when the OS names no file."""
    chain = _causes(exc)
    for e in chain:
        if isinstance(e, UserFixable):
            return first_line(e)
    for rule in (_s3_message, _connection_message, lambda e: _disk_message(e, target)):
        for e in chain:
            message = rule(e)
            if message:
                return message
    for e in chain:  # an OS error without errno (s3fs's) still has a readable message
        if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return first_line(e)
    return None
