"""Our tar layer against the standard library's: same header bytes written, same members read."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import tarfile
from pathlib import Path

import pytest

from shards.tarstream import TarCorrupt, iter_members, ustar_header
from shards.writer import ShardWriter
from tests.hostile import link, tar_with
from tests.test_shards import _samples


@pytest.mark.parametrize("name", ["a.json", "x" * 100, "é/ü.000.jpg", "d/" * 60 + "f.txt", "0123abcd.001.wav"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 10**6, 8**11 - 1, 8**11])
def test_ustar_header_is_tarfiles(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    try:
        expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    except ValueError:  # USTAR cannot hold 8 GiB or an unsplittable long name: neither do we
        with pytest.raises(ValueError):
            ustar_header(name, size)
        return
    assert ustar_header(name, size) == expected


def _archive(fmt: int) -> bytes:
    rng = random.Random(fmt)
    long_ok = fmt != tarfile.USTAR_FORMAT
    names = ["a.txt", "p" * 120 + "/q.txt", "dir/" + "n" * 90 + ".txt"]
    names += ["ünï.txt", "s" * 150 + ".jpg"] if long_ok else []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name in names:
            data = rng.randbytes(rng.randint(0, 3000))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        tar.addfile(link("lnk", "/etc/" + ("p" * 120 if long_ok else "passwd")))
        tar.addfile(link("hard", "a.txt", hard=True))
    return buf.getvalue()


def _by_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [
            (m.name, m.size, m.type, m.linkname, tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
            for m in tar
        ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", [None, gzip.compress, lzma.compress])
def test_reads_what_tarfile_reads(fmt: int, compress) -> None:
    raw = _archive(fmt)
    data = compress(raw) if compress else raw
    ours = [(m.name, m.size, m.type, m.linkname, d) for m, d in iter_members(io.BytesIO(data))]
    assert ours == _by_tarfile(data)


def test_skipped_members_keep_offsets(tmp_path: Path) -> None:
    """The viewer skips media and later seeks to ``offset_data``: offsets must point at the bytes."""
    data = tar_with([("k.json", b"{}"), ("k.000.jpg", random.Random(1).randbytes(2000)), ("j.json", b"[]")])
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:
        members = list(iter_members(f, want=lambda m: m.name.endswith(".json")))
    assert [d for _, d in members] == [b"{}", None, b"[]"]
    jpg = members[1][0]
    assert data[jpg.offset_data : jpg.offset_data + jpg.size] == _by_tarfile(data)[1][4]


def test_broken_streams_say_where() -> None:
    good = tar_with([("a.txt", b"x" * 700), ("b.txt", b"y" * 10)])
    for bad, offset in [(b"", 0), (random.Random(2).randbytes(3000), 0), (good[:700], 512), (good[:1600], 1536)]:
        with pytest.raises(TarCorrupt) as e:
            list(iter_members(io.BytesIO(bad)))
        assert e.value.offset == offset, (len(bad), str(e.value))
    corrupt = bytearray(good)
    corrupt[1536 + 10] ^= 0xFF  # b.txt's header no longer matches its checksum
    with pytest.raises(TarCorrupt, match="checksum"):
        list(iter_members(io.BytesIO(bytes(corrupt))))


def test_writer_io_failure_raises_and_commits_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    writer = ShardWriter(str(blocker / "shards"), "p", max_samples=2)
    with pytest.raises(OSError):
        writer.write_all(_samples(5))
    assert writer.written == []
    assert sorted(os.listdir(tmp_path)) == ["not-a-directory"]


def test_writer_many_shards_match_tarfile(tmp_path: Path) -> None:
    """Background writes and commits keep shard order, sizes and checksums."""
    rows = _samples(9)
    infos = ShardWriter(str(tmp_path), "p", max_samples=2).write_all(rows)
    assert [i.path for i in infos] == [f"p-{i:05d}.tar" for i in range(5)]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    ids = []
    for info in infos:
        data = (tmp_path / info.path).read_bytes()
        assert len(data) == info.bytes
        members = _by_tarfile(data)
        ids += [name.split(".")[0] for name, *_ in members if name.endswith(".json")]
    assert ids == [r["id"] for r in rows]
