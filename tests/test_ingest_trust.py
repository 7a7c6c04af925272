"""Ingest under hostile input (issue 11, "Trust"): every input ends in a shard or in the ledger with
its reason, through a real run; nothing recurses without bound, reads outside what the recipe
allows, holds a whole tar key in memory, skips a file silently, or writes an id twice."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.units import records_to_table
from shards import safejson
from shards.codec import encode_sample
from shards.reader import Record, Reject, iter_samples
from shards.schema import REASON_COLUMN, Segment, make_sample
from tests.hostile import deep_json, ours_members, tar_with, write_gzip_tar_of_zeros

PASSWD = Path("/etc/passwd").read_bytes()[:64]


def _run(tmp_path: Path, sources: list[dict[str, Any]], **doc: Any) -> tuple[dict[tuple[str, str], str], list[dict]]:
    """Run ``sources`` locally; returns {(source, locator): reason} of the ledger and the written samples,
    after checking the audit balances and that nothing of /etc/passwd reached a shard."""
    out = tmp_path / "run"
    recipe = recipe_from_dict({"name": "trust", "output": str(out), "sources": sources, **doc})
    m = run_recipe(recipe, executor="local", progress=False)
    report = audit(str(out))
    assert report.balanced, report.summary()
    assert m["ingested"] == m["written"] + m["rejected"]
    ledger = RunDir(str(out)).read_ledger().to_pylist()
    reasons = {(r["source"], r["locator"]): r["reason"] for r in ledger}
    assert len(reasons) == len(ledger), "one ledger row per input"
    tars = sorted((out / "shards").glob("*.tar"))
    assert not any(PASSWD in t.read_bytes() for t in tars), "/etc/passwd was copied into a shard"
    samples = [s for t in tars for s in iter_samples(str(t))]
    assert len({s["id"] for s in samples}) == len(samples) == m["written"]
    return reasons, samples


def _texts(samples: list[dict]) -> list[str]:
    return sorted(seg["text"] for s in samples for seg in s["segments"] if seg["modality"] == "text")


def _ours(text: str, sample_id: str = "claimed-1", source: str = "elsewhere") -> dict[str, Any]:
    """One of our samples' json doc (what ``encode_sample`` writes), with the id it claims."""
    row = make_sample(source, "text", [Segment("text", text=text)], "orig.jsonl@0")
    doc = json.loads(encode_sample({**row, "id": sample_id})["json"])
    return doc


# ---------------------------------------------------------------- bounded JSON


def test_deep_or_large_json_is_a_reject_in_sidecars_lines_and_tar_members(tmp_path: Path) -> None:
    media, wds = tmp_path / "media", tmp_path / "wds"
    media.mkdir()
    wds.mkdir()
    for stem in ("deep", "strings", "large"):
        (media / f"{stem}.txt").write_text(f"caption of {stem}")
    (media / "deep.json").write_bytes(deep_json())
    (media / "strings.json").write_text(json.dumps({"note": "[{" * 5000}))  # brackets in a string do not nest
    (media / "large.json").write_text(json.dumps({"note": "z" * 400_000}))
    nested: Any = "leaf"
    for _ in range(70):
        nested = [nested]
    lines = [
        deep_json().decode(),
        json.dumps({"text": "nested metadata", "extra": nested}),
        json.dumps({"text": "brackets [[[{{{ in a string are text " + "[" * 3000}),
        json.dumps({"text": "y" * 400_000}),
    ]
    raw = "\n".join(lines) + "\n"
    (tmp_path / "docs.jsonl").write_text(raw)
    offsets = [0]
    for line in lines[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    deep_doc = _ours("deep meta")
    deep_doc["meta"] = "DEEP"
    (wds / "t.tar").write_bytes(
        tar_with(
            [
                ("k1.txt", b"foreign caption"),
                ("k1.json", deep_json()),
                ("k2.json", json.dumps(deep_doc).encode().replace(b'"DEEP"', deep_json())),
                ("k3.txt", b"foreign caption with a large json"),
                ("k3.json", json.dumps({"note": "q" * 400_000}).encode()),
                ("k4.txt", b"a good one"),
                ("k4.json", b'{"url": "http://x/[[[["}'),
            ]
        )
    )
    reasons, samples = _run(
        tmp_path,
        [
            {"name": "media", "type": "local", "path": str(media)},
            {"name": "docs", "type": "jsonl", "path": str(tmp_path / "docs.jsonl")},
            {"name": "wds", "type": "webdataset", "path": str(wds)},
        ],
        limits={"max_json_bytes": 300_000, "max_json_depth": 64},
    )
    assert reasons == {
        ("media", "deep"): "json too deep",
        ("media", "large"): "json too large",
        ("docs", f"docs.jsonl@{offsets[0]}"): "json too deep",
        ("docs", f"docs.jsonl@{offsets[1]}"): "json too deep",
        ("docs", f"docs.jsonl@{offsets[3]}"): "json too large",
        ("wds", "t.tar#k1"): "json too deep",
        ("wds", "t.tar#k2"): "json too deep",
        ("wds", "t.tar#k3"): "json too large",
    }
    assert len(samples) == 3
    assert any(t.startswith("brackets") for t in _texts(samples))


def test_the_depth_scan_reads_strings_as_json_does() -> None:
    assert safejson.nesting_depth(deep_json(100_000)) == 100_000
    assert safejson.nesting_depth(rb'{"a": "[[[\"]]]", "b": [1, {"c": "\\"}]}') == 3  # escaped quotes
    assert safejson.nesting_depth(b'["unterminated [[[[') == 1
    with pytest.raises(safejson.JsonBound, match="json too deep"):
        safejson.loads(b"[" * 65 + b"]" * 65, 64, None)
    with pytest.raises(safejson.JsonBound, match="json too large"):
        safejson.loads(b"[1, 2]", 64, 4)
    assert safejson.loads(json.dumps({"t": "[" * 1000}), 2, None) == {"t": "[" * 1000}


def test_shard_style_json_that_breaks_the_schema_is_a_reject(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    broken = {
        "nosegs": {k: v for k, v in _ours("a").items() if k != "segments"},
        "noid": {k: v for k, v in _ours("b").items() if k != "id"},
        "segstext": {**_ours("c"), "segments": "not a list"},
        "smell": {**_ours("d"), "segments": [{"modality": "smell"}]},
        "textint": {**_ours("e"), "segments": [{"modality": "text", "text": 5}]},
        "nomember": {**_ours("f"), "segments": [{"modality": "image", "member": "000.jpg"}]},
        "kind": {**_ours("g"), "kind": "nonsense"},
        "idint": {**_ours("h"), "id": 12},
        "reserved": {**_ours("i"), "columns": {"reason": "smuggled", "id": "x"}},
    }
    members = [m for key, doc in broken.items() for m in ours_members(key, doc)]
    members += [("notobj.json", b"[1, 2]"), *ours_members("good", _ours("kept", "claimed-7", "elsewhere"))]
    (wds / "ours.tar").write_bytes(tar_with(members))
    reasons, samples = _run(tmp_path, [{"name": "wds", "type": "webdataset", "path": str(wds)}])
    expected = {("wds", f"ours.tar#{k}"): "bad sample json" for k in broken}
    expected[("wds", "ours.tar#nomember")] = "missing member"
    expected[("wds", "ours.tar#notobj")] = "bad json member"
    assert reasons == expected
    (sample,) = samples
    meta = json.loads(sample["meta"])
    assert sample["id"] != "claimed-7" and sample["source"] == "wds", "the id and source are ours"
    assert meta["claimed_id"] == "claimed-7" and meta["claimed_source"] == "elsewhere"
    assert meta["locator"] == "ours.tar#good" and meta["claimed_locator"] == "orig.jsonl@0"


# ---------------------------------------------------------------- Parquet


def test_corrupt_truncated_and_oversized_parquet_are_ledgered_beside_a_good_file(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = pa.table({"text": [f"row {i} " + "x" * 40 for i in range(100)]})
    pq.write_table(rows.slice(0, 4), folder / "good.parquet", row_group_size=2)
    pq.write_table(rows.slice(0, 40), folder / "damaged.parquet", row_group_size=20)
    pq.write_table(rows.slice(0, 50), folder / "big.parquet")
    whole = (folder / "good.parquet").read_bytes()
    (folder / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (folder / "corrupt.parquet").write_bytes(random.Random(0).randbytes(3000))
    damaged = bytearray((folder / "damaged.parquet").read_bytes())
    damaged[10:250] = random.Random(1).randbytes(240)  # the first row group's pages; the footer is intact
    (folder / "damaged.parquet").write_bytes(bytes(damaged))
    (folder / "notes.txt").write_text("not a table")
    reasons, samples = _run(
        tmp_path, [{"name": "pq", "type": "parquet", "path": str(folder)}], limits={"max_row_group_rows": 30}
    )
    assert reasons[("pq", "corrupt.parquet")] == "unreadable parquet"
    assert reasons[("pq", "truncated.parquet")] == "unreadable parquet"
    assert reasons[("pq", "damaged.parquet#rg0")] == "unreadable parquet"
    assert reasons[("pq", "big.parquet#rg0")] == "row group too large"
    assert reasons[("pq", "notes.txt")] == "not read: unsupported file for parquet source"
    assert not [k for k in reasons if k[1].startswith("good.parquet")]
    assert sum(s["segments"][0]["text"].startswith("row ") for s in samples) >= 4


# ---------------------------------------------------------------- nothing skipped silently


def test_files_a_source_does_not_read_are_counted(tmp_path: Path) -> None:
    wds, docs = tmp_path / "wds", tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    wds.mkdir()
    (wds / "a.tar").write_bytes(tar_with([("k.txt", b"from a plain tar")]))
    (wds / "b.tgz").write_bytes(gzip.compress(tar_with([("k.txt", b"from a gzip tar")]), mtime=0))
    (wds / "c.tar.xz").write_bytes(lzma.compress(tar_with([("k.txt", b"from an xz tar")])))
    (wds / "d.tar.zst").write_bytes(zstandard.compress(tar_with([("k.txt", b"from a zstd tar")])))
    (wds / "readme.txt").write_text("notes")
    (wds / "bundle.zip").write_bytes(b"PK\x03\x04")
    (docs / "a.jsonl").write_text(json.dumps({"text": "line a"}) + "\n")
    (docs / "sub" / "b.ndjson").write_text(json.dumps({"text": "line b"}) + "\n")
    (docs / "notes.txt").write_text("notes")
    reasons, samples = _run(
        tmp_path,
        [
            {"name": "wds", "type": "webdataset", "path": str(wds)},
            {"name": "docs", "type": "jsonl", "path": str(docs)},
        ],
    )
    assert reasons == {
        ("wds", "readme.txt"): "not read: unsupported file for webdataset source",
        ("wds", "bundle.zip"): "not read: unsupported file for webdataset source",
        ("docs", "notes.txt"): "not read: unsupported file for jsonl source",
    }
    assert _texts(samples) == [
        "from a gzip tar",
        "from a plain tar",
        "from a zstd tar",
        "from an xz tar",
        "line a",
        "line b",
    ]


# ---------------------------------------------------------------- ids


def test_inputs_claiming_the_same_id_get_distinct_ids(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    same = ours_members("s", _ours("the same sample", "claimed-dup"))
    (wds / "twice.tar").write_bytes(tar_with([*same, ("other.txt", b"between"), *same]))
    (wds / "copy.tar").write_bytes(tar_with(same))
    reasons, samples = _run(tmp_path, [{"name": "wds", "type": "webdataset", "path": str(wds)}])
    assert reasons == {}
    dups = [s for s in samples if json.loads(s["meta"]).get("claimed_id") == "claimed-dup"]
    assert len(dups) == 3 and len({s["id"] for s in dups}) == 3
    assert sorted(json.loads(s["meta"])["locator"] for s in dups) == ["copy.tar#s", "twice.tar#s", "twice.tar#s~2"]


def test_a_second_row_with_a_seen_id_is_rejected_as_duplicate() -> None:
    row = make_sample("src", "text", [Segment("text", text="x")], "a@0")
    rejected = Reject("r1", "broken json line", "", "a@9")
    table = records_to_table("u", [Record(sample=row), Record(sample=dict(row)), Record(reject=rejected)] * 2)
    got = table.select(["id", REASON_COLUMN]).to_pylist()
    assert [r[REASON_COLUMN] for r in got] == [None, "duplicate id", "broken json line"] + ["duplicate id"] * 3
    assert len({r["id"] for r in got}) == 6, "every row keeps an id of its own, so the audit stays exact"
    assert got[0]["id"] == row["id"] and got[2]["id"] == "r1"


# ---------------------------------------------------------------- confinement


def test_local_sources_read_only_regular_files_under_their_root(tmp_path: Path) -> None:
    media = tmp_path / "media"
    (media / "real").mkdir(parents=True)
    (media / "real" / "notes.txt").write_text("inside the root")
    (media / "inside.txt").symlink_to(media / "real" / "notes.txt")
    (media / "passwd.txt").symlink_to("/etc/passwd")
    (media / "zero.wav").symlink_to("/dev/zero")
    (media / "etc").symlink_to("/etc")  # a folder outside: never walked
    (media / "loop").symlink_to(media)  # a loop: never walked round
    os.mkfifo(media / "pipe.txt")  # reading it would block forever
    (media / "ping.txt").symlink_to(media / "pong.txt")  # a file loop: ELOOP, never a hang
    (media / "pong.txt").symlink_to(media / "ping.txt")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text(json.dumps({"text": "a line"}) + "\n")
    (tmp_path / "docs" / "evil.jsonl").symlink_to("/etc/passwd")
    reasons, samples = _run(
        tmp_path,
        [
            {"name": "media", "type": "local", "path": str(media)},
            {"name": "devs", "type": "local", "path": str(media), "allow_paths": ["/dev"]},
            {"name": "docs", "type": "jsonl", "path": str(tmp_path / "docs")},
        ],
    )
    for source in ("media", "devs"):
        assert reasons[(source, "passwd")] == "path outside source root"
        assert reasons[(source, "etc")] == "path outside source root"
        assert reasons[(source, "loop")] == "not a regular file"
        assert reasons[(source, "pipe")] == "not a regular file"
        assert reasons[(source, "ping")] == reasons[(source, "pong")] == "unreadable file"
    assert reasons[("media", "zero")] == "path outside source root"
    assert reasons[("devs", "zero")] == "not a regular file", "allowed by allow_paths, still never read"
    assert reasons[("docs", "evil.jsonl")] == "path outside source root"
    assert len(reasons) == 15
    assert _texts(samples) == ["a line"] + ["inside the root"] * 4, "symlinks that stay inside are read"


def _hostile_records(outside: Path) -> list[dict[str, Any]]:
    """Records naming media outside the manifest's folder in every way a record can."""
    return [
        {"text": "good", "image": "img/ok.jpg"},
        {"text": "absolute", "image": "/etc/passwd"},
        {"text": "parent", "image": f"../{outside.name}/x.jpg"},
        {"text": "symlink", "image": "img/link.jpg"},
        {"segments": [{"modality": "text", "text": "file uri"}, {"modality": "image", "uri": "file:///etc/passwd"}]},
        {"segments": [{"modality": "text", "text": "ssrf"}, {"modality": "image", "uri": "http://127.0.0.1:9/x"}]},
        {"segments": [{"modality": "text", "text": "bucket"}, {"modality": "video", "uri": "s3://other-bucket/x"}]},
        {"segments": [{"modality": "text", "text": "allowed"}, {"modality": "video", "uri": "s3://our-bucket/ok/v"}]},
        {"text": "allowed path", "image": str(outside / "x.jpg")},
    ]


EXPECTED_RECORD_REASONS = [
    None,
    "path outside allowed roots",
    "path outside allowed roots",
    "path outside allowed roots",
    "uri not allowed",
    "uri not allowed",
    "uri not allowed",
    None,
    None,
]


def test_record_paths_and_uris_are_confined(tmp_path: Path) -> None:
    data, outside, allowed = tmp_path / "data", tmp_path / "outside", tmp_path / "allowed"
    for d in (data / "img", outside, allowed):
        d.mkdir(parents=True)
    (data / "img" / "ok.jpg").write_bytes(b"\xff\xd8\xff inside")
    (data / "img" / "link.jpg").symlink_to("/etc/passwd")
    (outside / "x.jpg").write_bytes(b"\xff\xd8\xff outside")
    (allowed / "x.jpg").write_bytes(b"\xff\xd8\xff allowed")
    records = _hostile_records(outside)
    records[-1]["image"] = str(allowed / "x.jpg")
    lines = [json.dumps(r) for r in records]
    (data / "docs.jsonl").write_text("\n".join(lines) + "\n")
    flat = [{"text": r.get("text"), "image": r.get("image"), "segments": r.get("segments")} for r in records]
    pq.write_table(pa.Table.from_pylist(flat), data / "rows.parquet")
    reasons, samples = _run(
        tmp_path,
        [
            {"name": "docs", "type": "jsonl", "path": str(data / "docs.jsonl"), "allow_paths": [str(allowed)]},
            {"name": "rows", "type": "parquet", "path": str(data / "rows.parquet"), "allow_paths": [str(allowed)]},
        ],
        storage={"allow_uris": ["s3://our-bucket/ok"]},
    )
    offsets = [0]
    for line in lines[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    for i, reason in enumerate(EXPECTED_RECORD_REASONS):
        assert reasons.get(("docs", f"docs.jsonl@{offsets[i]}")) == reason, records[i]
        assert reasons.get(("rows", f"rows.parquet#rg0/{i}")) == reason, records[i]
    assert len(reasons) == 12
    by_text = {seg["text"]: s for s in samples for seg in s["segments"] if seg["modality"] == "text"}
    assert set(by_text) == {"good", "allowed", "allowed path"}
    uris = [seg["uri"] for s in samples for seg in s["segments"] if seg["uri"]]
    assert uris == ["s3://our-bucket/ok/v"] * 2


def test_tar_samples_naming_uris_are_confined(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    (wds / "big.mp4").write_bytes(b"\0\0\0\x18ftypmp42")
    members = []
    for key, uri in {"inside": str(wds / "big.mp4"), "passwd": "/etc/passwd", "ssrf": "http://127.0.0.1:9/x"}.items():
        doc = _ours(f"video at {key}")
        doc["kind"], doc["segments"] = "video_caption", [*doc["segments"], {"modality": "video", "uri": uri}]
        members += ours_members(key, doc)
    (wds / "uris.tar").write_bytes(tar_with(members))
    reasons, samples = _run(tmp_path, [{"name": "wds", "type": "webdataset", "path": str(wds)}])
    assert reasons == {
        ("wds", "uris.tar#passwd"): "uri not allowed",
        ("wds", "uris.tar#ssrf"): "uri not allowed",
        ("wds", "big.mp4"): "not read: unsupported file for webdataset source",  # beside the tars: counted
    }
    assert [seg["uri"] for s in samples for seg in s["segments"] if seg["uri"]] == [str(wds / "big.mp4")]


# ---------------------------------------------------------------- tar memory bounds


def test_tar_keys_over_their_bounds_are_rejected(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    wds.mkdir()
    many = [(f"many.{i:04d}.txt", b"m") for i in range(50)]
    big = [(f"big.{i}.txt", bytes(30_000)) for i in range(5)]
    (wds / "keys.tar").write_bytes(tar_with([*many, *big, ("ok.txt", b"fine"), ("ok.json", b"{}")]))
    write_gzip_tar_of_zeros(wds / "zeros.tar.gz", "z", members=40, member_bytes=64 << 10)
    reasons, samples = _run(
        tmp_path,
        [{"name": "wds", "type": "webdataset", "path": str(wds)}],
        limits={"max_members_per_key": 20, "max_key_bytes": 100_000},
    )
    assert reasons == {
        ("wds", "keys.tar#many"): "too many members in sample",
        ("wds", "keys.tar#big"): "sample too large",
        ("wds", "zeros.tar.gz#z"): "sample too large",
    }
    assert _texts(samples) == ["fine"]


def test_a_gzip_bomb_under_one_key_stays_within_its_byte_bound(tmp_path: Path) -> None:
    """40 members of 8 MB zeros under one key (320 MB decompressed, ~0.3 MB on disk) with a 32 MB
    bound: the reader holds at most the bound, then skips the rest unread."""
    path = tmp_path / "bomb.tar.gz"
    write_gzip_tar_of_zeros(path, "bomb", members=40, member_bytes=8 << 20)
    assert path.stat().st_size < 2 << 20
    script = textwrap.dedent(
        f"""
        import json
        import resource
        from shards.reader import TarBounds, iter_records
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        bounds = TarBounds(max_member_bytes=16 << 20, max_key_bytes=32 << 20)
        reasons = [r.reject.reason for r in iter_records({str(path)!r}, "s", bounds=bounds, trust_id=False)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps([reasons, (peak - base) // 1024]))
        """
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    reasons, grown_mb = json.loads(out.stdout)
    assert reasons == ["sample too large"]
    assert grown_mb < 120, f"reading the bomb grew the reader by {grown_mb} MB (320 MB unbounded)"


# ---------------------------------------------------------------- names and text that are not unicode


def test_undecodable_names_lone_surrogates_and_huge_tar_names_are_rejects(tmp_path: Path) -> None:
    """A file or member name with bytes that are no UTF-8, a ``\\ud800`` escape in JSON, and a GNU
    long-name header claiming 600 MB (all zeros, a few hundred KB gzipped): each a counted reject,
    never a crash that every resume repeats."""
    media, wds = tmp_path / "media", tmp_path / "wds"
    media.mkdir()
    wds.mkdir()
    (media / "good.txt").write_text("a good caption")
    with open(os.fsencode(media) + b"/\xff\xfelatin.txt", "wb") as f:
        f.write(b"a caption under a latin-1 name")
    bad_member = b"\xff\xfe01.txt".decode("utf-8", "surrogateescape")
    (wds / "names.tar").write_bytes(tar_with([(bad_member, b"caption"), ("02.txt", b"a fine caption")]))
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 600 << 20
    with gzip.open(wds / "longname.tar.gz", "wb") as g:
        g.write(header.tobuf(tarfile.GNU_FORMAT)[:512])
        for _ in range(600):
            g.write(bytes(1 << 20))
    lines = '{"text": "a\\ud800b"}\n{"text": "emoji \\ud83d\\ude00 stays"}\n{"text": "ok", "note": "\\udcff"}\n'
    (tmp_path / "d.jsonl").write_text(lines + '{"text": "n", "n": ' + "9" * 5000 + "}\n")  # int() refuses it
    reasons, samples = _run(
        tmp_path,
        [
            {"name": "media", "type": "local", "path": str(media)},
            {"name": "wds", "type": "webdataset", "path": str(wds)},
            {"name": "docs", "type": "jsonl", "path": str(tmp_path / "d.jsonl")},
        ],
    )
    assert reasons == {
        ("media", "\\udcff\\udcfelatin.txt"): "file name is not utf-8",
        ("wds", "names.tar#\\udcff\\udcfe01.txt"): "unsafe tar member: name is not utf-8",
        ("wds", "longname.tar.gz#"): "unreadable tar",
        ("docs", "d.jsonl@0"): "json has invalid unicode",
        ("docs", "d.jsonl@58"): "json has invalid unicode",
        ("docs", f"d.jsonl@{len(lines)}"): "json number too large",
    }
    assert _texts(samples) == ["a fine caption", "a good caption", "emoji \U0001f600 stays"]
