"""The tar format, read and written without ``tarfile``'s per-member Python layers.

``tarfile`` spends more time building ``TarInfo`` objects and stream wrappers than the disk
spends moving the bytes (shard I/O ran at 0.35-0.5 of a raw copy through it). Here a header is
one ``struct`` unpack and member data one ``read``. Written headers are byte-identical to
``tarfile``'s USTAR headers (the tests compare them), so shards stay reproducible; reading
follows ``tarfile`` for USTAR, GNU long names, pax extended headers, base-256 sizes and
gzip/bzip2/xz/zstd compression, but a bad header after the first is an error here, not a silent end.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from shards.codec import DECOMPRESS_ERRORS, decompressing

STREAM_MAGIC = ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zst"))

BLOCK = 512
RECORD = tarfile.RECORDSIZE
ENCODING = "utf-8"
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_REGULAR = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: size is not data
_USTAR_TEMPLATE = bytearray(tarfile.TarInfo("").tobuf(tarfile.USTAR_FORMAT, ENCODING, "surrogateescape"))
_USTAR_TEMPLATE[148:156] = b" " * 8  # the checksum is summed over spaces in its own field
_MAX_OCTAL_SIZE = 8**11
MAX_EXTENDED_HEADER = 1 << 20  # pax / GNU long-name data read into memory; tarfile has no bound


class TarCorrupt(Exception):
    """The stream is not a tar (``offset`` 0), or stops or breaks in the middle of one."""

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(slots=True)
class TarMember:
    """A member header: the fields readers need, with ``tarfile.TarInfo``'s predicates."""

    name: str
    size: int
    type: bytes
    linkname: str = ""
    offset_data: int = 0

    def isfile(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"


def padding(size: int) -> int:
    return -size % BLOCK


def ustar_header(name: str, size: int) -> bytes:
    """``tarfile``'s USTAR header for a regular file (mode 0644, mtime 0, uid/gid 0), fast."""
    raw = name.encode(ENCODING, "surrogateescape")
    if len(raw) > 100 or not 0 <= size < _MAX_OCTAL_SIZE:
        info = tarfile.TarInfo(name)  # long names go into the prefix field, as tarfile splits them
        info.size, info.mtime, info.mode = size, 0, 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, ENCODING, "surrogateescape")
    header = _USTAR_TEMPLATE.copy()
    header[0 : len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(ENCODING, "surrogateescape")


def _number(field: bytes) -> int:
    """An octal field, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarCorrupt(f"bad number field {field!r}") from None


def _check(block: bytes) -> None:
    stored = _number(block[148:156])
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    if stored != unsigned:
        signed = 256 + sum(struct.unpack_from("148b8x356b", block))
        if stored != signed:
            raise TarCorrupt("bad header checksum")


def _pax_records(data: bytes) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records; values are UTF-8 (or raw bytes, kept by surrogateescape)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarCorrupt("bad pax header") from None
        if length <= 0 or space < 0:
            raise TarCorrupt("bad pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode(ENCODING, "surrogateescape")] = value.decode(ENCODING, "surrogateescape")
        pos += length
    return out


def open_stream(fileobj: IO[bytes]) -> IO[bytes]:
    """The tar inside ``fileobj``, decompressed when it starts with gzip, bzip2, xz or zstd magic."""
    head = fileobj.peek(6)[:6] if hasattr(fileobj, "peek") else b""
    if not head and fileobj.seekable():
        start = fileobj.tell()
        head = fileobj.read(6)
        fileobj.seek(start)
    for magic, compression in STREAM_MAGIC:
        if head.startswith(magic):
            return decompressing(fileobj, compression)
    return fileobj


class _Blocks:
    """Exact-size reads with an offset; a short read is a truncated tar."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.offset = 0
        self._seekable = f.seekable()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise TarCorrupt(f"unexpected end of data at byte {self.offset + len(data)}")
        self.offset += n
        return data

    def skip(self, n: int) -> None:
        if self._seekable and n:
            self.f.seek(n - 1, 1)
            if len(self.f.read(1)) != 1:  # a seek past the end succeeds; reading its last byte does not
                raise TarCorrupt(f"unexpected end of data in a member skipped at byte {self.offset}")
            self.offset += n
            return
        while n:
            step = min(n, 1 << 20)
            self.read(step)
            n -= step


def iter_members(
    fileobj: IO[bytes], want: Callable[[TarMember], bool] = TarMember.isfile
) -> Iterator[tuple[TarMember, bytes | None]]:
    """Each member header in order with its data when ``want(member)``, else ``None`` (skipped).

    Raises ``TarCorrupt`` when the stream is no tar (at the first header) or breaks later; a
    member already yielded is whole. Pax and GNU long-name headers are folded into the member
    they describe, as ``tarfile`` does.
    """
    blocks = _Blocks(open_stream(fileobj))
    try:
        yield from _members(blocks, want)
    except TarCorrupt as e:
        raise TarCorrupt(str(e), blocks.offset if e.offset < 0 else e.offset) from e
    except DECOMPRESS_ERRORS as e:
        raise TarCorrupt(f"unreadable stream: {e}", blocks.offset) from e


def _members(blocks: _Blocks, want: Callable[[TarMember], bool]) -> Iterator[tuple[TarMember, bytes | None]]:
    pax_global: dict[str, str] = {}
    pending: dict[str, str] = {}
    while True:
        header_at = blocks.offset
        block = blocks.f.read(BLOCK)
        if not block:  # no end-of-archive blocks: tarfile accepts that, but not an empty file
            if header_at == 0:
                raise TarCorrupt("empty file", 0)
            return
        if len(block) != BLOCK:
            raise TarCorrupt(f"truncated header at byte {header_at}", header_at)
        blocks.offset += BLOCK
        if block.count(0) == BLOCK:
            return
        try:
            _check(block)
        except TarCorrupt as e:
            raise TarCorrupt(f"{e} at byte {header_at}", header_at) from None
        fields = _HEADER.unpack(block)
        name, size, typeflag = _nts(fields[0]), _number(fields[4]), fields[7]
        if fields[9] == b"ustar\x00" and fields[15][:1] != b"\0":
            name = _nts(fields[15]) + "/" + name
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER:  # a name or pax record set is never this big: a memory bomb
                raise TarCorrupt(f"extended header of {size} bytes at byte {header_at}", header_at)
            data = blocks.read(size)
            blocks.skip(padding(size))
            if typeflag == b"L":
                pending["path"] = _nts(data)
            elif typeflag == b"K":
                pending["linkpath"] = _nts(data)
            else:
                (pending if typeflag == b"x" else pax_global).update(_pax_records(data))
            continue
        extended = {**pax_global, **pending} if pending or pax_global else {}
        pending = {}
        if "size" in extended:
            try:
                size = int(extended["size"])
            except ValueError:
                raise TarCorrupt("bad pax size") from None
        name = extended.get("path", name)
        if typeflag == b"\0" and name.endswith("/"):
            typeflag = b"5"  # an old-style directory
        if typeflag == b"5":
            name = name.rstrip("/")
        member = TarMember(name, size, typeflag, extended.get("linkpath", _nts(fields[8])), blocks.offset)
        if typeflag in _NO_DATA:
            yield member, None
        elif member.isfile() and want(member):
            data = blocks.read(size)
            blocks.skip(padding(size))
            yield member, data
        else:
            blocks.skip(size + padding(size))
            yield member, None
