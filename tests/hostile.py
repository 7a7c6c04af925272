"""Generators of hostile inputs, shared by the tests that must reject them."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
import zlib


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims billions of pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + width // 8) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tar_with(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A tar holding exactly these members: (name, data) pairs or prepared TarInfo (links)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def deep_json(depth: int = 100_000) -> bytes:
    """Brackets nested ``depth`` deep: ``json.loads`` alone raises RecursionError on it."""
    return b"[" * depth + b"]" * depth


def ours_members(key: str, doc: dict, media: dict[str, bytes] | None = None) -> list[tuple[str, bytes]]:
    """Tar members of one sample in our shard layout, with a hand-made (possibly broken) json doc."""
    members = [(f"{key}.json", json.dumps(doc).encode())]
    return members + [(f"{key}.{name}", data) for name, data in (media or {}).items()]


def write_gzip_tar_of_zeros(path: str | os.PathLike, key: str, members: int, member_bytes: int) -> None:
    """A gzip tar whose one key holds ``members`` members of ``member_bytes`` zeros each, streamed to
    disk (never held whole): tiny on disk, ``members * member_bytes`` once decompressed."""
    zeros = bytes(1 << 20)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        for i in range(members):
            info = tarfile.TarInfo(f"{key}.{i:03d}.bin")
            info.size = member_bytes
            gz.write(info.tobuf(tarfile.USTAR_FORMAT))
            left = member_bytes
            while left:
                gz.write(zeros[: min(left, len(zeros))])
                left -= min(left, len(zeros))
            gz.write(bytes(-member_bytes % tarfile.BLOCKSIZE))
        gz.write(bytes(tarfile.BLOCKSIZE * 2))
