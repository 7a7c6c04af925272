"""Others' data arrives compressed (issue 12): CSV/TSV/JSONL manifests as ``.gz``/``.bz2``/``.xz``/``.zst``
(img2dataset's ``part-00000.csv.gz``, ``docs.jsonl.zst``) read like their plain versions in folders,
single files and globs; headerless TSVs named by ``columns.names``; WebDataset members compressed
the same ways. Every row ends in a shard or in the ledger with a specific reason (a broken stream
is ``corrupt gzip``, a bomb stops at its bound), and the audit balances."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from PIL import Image

from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import RecipeError, recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.sources import plan_source, read_unit
from shards.codec import DecodeError, inflate_bounded
from shards.reader import iter_samples
from tests.hostile import tar_with

CDN = "https://cdn.example.com"
ALLOW = {"storage": {"allow_uris": [CDN + "/"]}}
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gz": lambda data: gzip.compress(data, mtime=0),
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "zst": lambda data: zstandard.ZstdCompressor().compress(data),
}
NAMES = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}
LIMIT = 200  # max_text_bytes in these runs
BOMB_BYTES = 200 << 20


def _run(tmp_path: Path, sources: list[dict[str, Any]], **doc: Any) -> tuple[dict[str, dict], dict[str, dict]]:
    """Run ``sources`` locally; the ledger and the samples, each by source/locator, after checking that
    the audit balances and that every input is one sample or one ledger row."""
    out = tmp_path / "run"
    recipe = recipe_from_dict({"name": "z", "output": str(out), "sources": sources, "pipeline": ["validate"], **doc})
    m = run_recipe(recipe, executor="local", progress=False)
    report = audit(str(out))
    assert report.balanced, report.summary()
    assert m["ingested"] == m["written"] + m["rejected"]
    ledger = RunDir(str(out)).read_ledger().to_pylist()
    rejects = {f"{r['source']}/{r['locator']}": r for r in ledger}
    samples = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for s in iter_samples(str(tar)):
            meta = json.loads(s["meta"] or "{}")
            samples[f"{s['source']}/{meta['locator']}"] = {**s, "meta": meta}
    assert len(rejects) == len(ledger) and len(samples) == m["written"], "one row per input"
    return rejects, samples


def _offsets(rows: list[bytes]) -> list[int]:
    out, pos = [], 0
    for row in rows:
        out.append(pos)
        pos += len(row)
    return out


def _shape(sample: dict) -> list[tuple[str, str]]:
    return [(s["modality"], s["text"] or s["uri"] or "bytes") for s in sample["segments"]]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    return buf.getvalue()


CSV_ROWS = [
    b"url,caption,width\n",
    f"{CDN}/1.jpg,一只红色的风筝 a red kite,640\n".encode(),
    f'{CDN}/2.jpg,"长城, the Great Wall\n在北京",800\n'.encode(),  # a quoted comma and newline
    f'{CDN}/3.jpg,"{"很长的标题 " * 20}",1\n'.encode(),  # over max_text_bytes
    ",没有网址 no url,1\n".encode(),
    f"{CDN}/4.jpg,short,2,extra\n".encode(),
]
TSV_ROWS = [b"caption\turl\n", f"制表符 tab-separated\t{CDN}/5.jpg\n".encode()]
JSONL_ROWS = [
    json.dumps({"text": "你好，世界 hello world"}, ensure_ascii=False).encode() + b"\n",
    json.dumps({"image": f"{CDN}/j.jpg", "text": "图片 a picture"}, ensure_ascii=False).encode() + b"\n",
    b"not json\n",
    json.dumps({"text": "长" * 100}, ensure_ascii=False).encode() + b"\n",  # 300 bytes: over max_text_bytes
    b"\n",
    json.dumps({"text": "last line, no newline"}).encode(),
]


def _expected(name: str, kind: str) -> tuple[dict[str, list], dict[str, str]]:
    """{locator: shape} and {locator: reason} of one manifest of CSV_ROWS, TSV_ROWS or JSONL_ROWS named ``name``."""
    if kind == "csv":
        at = _offsets(CSV_ROWS)
        return {
            f"{name}@{at[1]}": [("image", f"{CDN}/1.jpg"), ("text", "一只红色的风筝 a red kite")],
            f"{name}@{at[2]}": [("image", f"{CDN}/2.jpg"), ("text", "长城, the Great Wall\n在北京")],
        }, {
            f"{name}@{at[3]}": "csv row too long",
            f"{name}@{at[4]}": "empty media cell",
            f"{name}@{at[5]}": "malformed csv row",
        }
    if kind == "tsv":
        return {f"{name}@{len(TSV_ROWS[0])}": [("image", f"{CDN}/5.jpg"), ("text", "制表符 tab-separated")]}, {}
    at = _offsets(JSONL_ROWS)
    return {
        f"{name}@{at[0]}": [("text", "你好，世界 hello world")],
        f"{name}@{at[1]}": [("image", f"{CDN}/j.jpg"), ("text", "图片 a picture")],
        f"{name}@{at[5]}": [("text", "last line, no newline")],
    }, {f"{name}@{at[2]}": "broken json line", f"{name}@{at[3]}": "line too long"}


# ---------------------------------------------------------------- compressed manifests


def test_compressed_csv_tsv_and_jsonl_read_like_their_plain_versions(tmp_path: Path) -> None:
    folder, docs = tmp_path / "m", tmp_path / "j"
    folder.mkdir()
    docs.mkdir()
    (folder / "pairs.csv").write_bytes(b"".join(CSV_ROWS))
    (folder / "notes.txt.gz").write_bytes(COMPRESS["gz"](b"not a manifest"))
    (docs / "docs.jsonl").write_bytes(b"".join(JSONL_ROWS))
    for c, compress in COMPRESS.items():
        (folder / f"pairs.csv.{c}").write_bytes(compress(b"".join(CSV_ROWS)))
        (folder / f"clips.tsv.{c}").write_bytes(compress(b"".join(TSV_ROWS)))
        (docs / f"docs.jsonl.{c}").write_bytes(compress(b"".join(JSONL_ROWS)))
    sources = [
        {"name": "folder", "type": "csv", "path": str(folder), "unit_bytes": 16},
        {"name": "one", "type": "csv", "path": str(folder / "pairs.csv.zst")},
        {"name": "glob", "type": "jsonl", "path": str(docs / "docs.jsonl*"), "unit_bytes": 16},
    ]
    recipe = recipe_from_dict({"output": str(tmp_path / "o"), "sources": sources, **ALLOW})
    units = [u for spec in recipe.sources for u in plan_source(spec, recipe) if "unread" not in u]
    whole = sorted(Path(u["path"]).name for u in units if u["end"] is None)
    named = [f"{stem}.{c}" for stem in ("pairs.csv", "clips.tsv", "docs.jsonl") for c in COMPRESS]
    assert whole == sorted([*named, "pairs.csv.zst"])  # one unit per compressed file, whatever unit_bytes says
    assert all(u["start"] == 0 for u in units if u["end"] is None)
    assert sum(1 for u in units if Path(u["path"]).name == "pairs.csv") > 1  # a plain file still splits

    rejects, samples = _run(tmp_path, sources, limits={"max_text_bytes": LIMIT}, **ALLOW)
    want_samples: dict[str, list] = {}
    want_rejects: dict[str, str] = {"folder/notes.txt.gz": "not read: unsupported file for csv source"}
    manifests = [("folder", "pairs.csv", "csv"), ("one", "pairs.csv.zst", "csv"), ("glob", "docs.jsonl", "jsonl")]
    for c in COMPRESS:
        manifests += [("folder", f"pairs.csv.{c}", "csv"), ("folder", f"clips.tsv.{c}", "tsv")]
        manifests += [("glob", f"docs.jsonl.{c}", "jsonl")]
    for source, name, kind in manifests:
        good, bad = _expected(name, kind)
        want_samples |= {f"{source}/{loc}": shape for loc, shape in good.items()}
        want_rejects |= {f"{source}/{loc}": reason for loc, reason in bad.items()}
    assert {loc: _shape(s) for loc, s in samples.items()} == want_samples
    assert {loc: r["reason"] for loc, r in rejects.items()} == want_rejects
    assert len(samples) == 2 * 6 + 4 + 3 * 5 and len(rejects) == 3 * 6 + 2 * 5 + 1
    assert samples["folder/pairs.csv.xz@" + str(len(CSV_ROWS[0]))]["meta"]["width"] == "640"
    assert rejects[f"folder/pairs.csv.bz2@{_offsets(CSV_ROWS)[3]}"]["detail"] == f"over {LIMIT} bytes"


def test_a_compressed_manifest_runs_to_identical_shards_twice(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl.zst").write_bytes(COMPRESS["zst"]((b"".join(JSONL_ROWS) + b"\n") * 3))
    source = {"name": "d", "type": "jsonl", "path": str(tmp_path / "docs.jsonl.zst")}
    shards = []
    for run in ("a", "b"):
        _run(tmp_path / run, [source], limits={"max_text_bytes": LIMIT}, shards={"max_samples": 4}, **ALLOW)
        shards.append({p.name: p.read_bytes() for p in sorted((tmp_path / run / "run" / "shards").glob("*.tar"))})
    assert len(shards[0]) == 3 and shards[0] == shards[1]


def test_headerless_tsv_takes_its_column_names_from_the_recipe(tmp_path: Path) -> None:
    rows = [
        f"{CDN}/v/1.mp4\t航拍城市 aerial view of a city\n".encode(),
        f"{CDN}/v/2.mp4\t海边的狗 a dog on the beach\n".encode(),
        f"{CDN}/v/3.mp4\n".encode(),  # one field: not the two the names give
        f"{CDN}/v/4.mp4\t日落 sunset\n".encode(),
    ]
    raw = b"".join(rows)
    for folder in ("plain", "gz", "auto", "header"):
        (tmp_path / folder).mkdir()
    (tmp_path / "plain" / "webvid.tsv").write_bytes(raw)
    (tmp_path / "gz" / "webvid.tsv.gz").write_bytes(COMPRESS["gz"](raw))
    (tmp_path / "auto" / "with_header.tsv").write_bytes(b"contentUrl\tname\n" + raw)
    (tmp_path / "auto" / "without.tsv").write_bytes(raw)
    (tmp_path / "header" / "renamed.tsv").write_bytes(b"link\ttitle\n" + raw)
    cols = {"names": ["contentUrl", "name"], "modality": "video"}
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "plain", "type": "csv", "path": str(tmp_path / "plain"), "header": False, "columns": cols},
            {"name": "gz", "type": "csv", "path": str(tmp_path / "gz"), "header": False, "columns": cols},
            {
                "name": "small",
                "type": "csv",
                "path": str(tmp_path / "plain"),
                "header": False,
                "columns": cols,
                "unit_bytes": 10,
            },
            {"name": "auto", "type": "csv", "path": str(tmp_path / "auto"), "columns": cols},
            {"name": "header", "type": "csv", "path": str(tmp_path / "header"), "header": True, "columns": cols},
        ],
        **ALLOW,
    )
    at = _offsets(rows)
    shapes = {
        at[0]: [("video", f"{CDN}/v/1.mp4"), ("text", "航拍城市 aerial view of a city")],
        at[1]: [("video", f"{CDN}/v/2.mp4"), ("text", "海边的狗 a dog on the beach")],
        at[3]: [("video", f"{CDN}/v/4.mp4"), ("text", "日落 sunset")],
    }
    skip = len(b"contentUrl\tname\n")
    want = {}
    for source, name, shift in [
        ("plain", "webvid.tsv", 0),
        ("gz", "webvid.tsv.gz", 0),
        ("small", "webvid.tsv", 0),
        ("auto", "without.tsv", 0),
        ("auto", "with_header.tsv", skip),  # auto: a first row holding exactly the names is the header
        ("header", "renamed.tsv", len(b"link\ttitle\n")),
    ]:
        want |= {f"{source}/{name}@{o + shift}": shape for o, shape in shapes.items()}
    assert {loc: _shape(s) for loc, s in samples.items()} == want
    assert samples["plain/webvid.tsv@0"]["kind"] == "video_caption"
    assert {loc: r["reason"] for loc, r in rejects.items()} == {
        f"{loc}@{at[2] + shift}": "malformed csv row"
        for loc, shift in [
            ("plain/webvid.tsv", 0),
            ("gz/webvid.tsv.gz", 0),
            ("small/webvid.tsv", 0),
            ("auto/without.tsv", 0),
            ("auto/with_header.tsv", skip),
            ("header/renamed.tsv", len(b"link\ttitle\n")),
        ]
    }
    assert rejects[f"plain/webvid.tsv@{at[2]}"]["detail"] == "1 fields, the header has 2"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"header": "no"}, "sources[0].header: unknown header 'no' (one of auto, True, False)"),
        ({"columns": {"names": "url"}}, "sources[0].columns.names: expected a list, got 'url'"),
        ({"columns": {"name": ["url"]}}, "sources[0].columns: unknown key 'name' (did you mean 'names'?)"),
    ],
)
def test_header_and_column_names_are_schema_checked(source: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"output": "x", "sources": [{"type": "csv", "path": "m.tsv", **source}]})
    assert str(e.value) == message


def test_header_false_without_column_names_fails_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_text(f"{CDN}/1.jpg\tcaption\n")
    recipe = recipe_from_dict(
        {"output": str(tmp_path / "o"), "sources": [{"type": "csv", "path": str(tmp_path / "m.tsv"), "header": False}]}
    )
    with pytest.raises(RecipeError, match=r"source 'csv0': header: false needs columns.names"):
        plan_source(recipe.sources[0], recipe)


def test_a_corrupt_compressed_manifest_is_a_reject_and_the_rest_of_the_source_runs(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    rows = [b"url,caption\n"] + [f"{CDN}/{i}.jpg,第{i}张图 picture {i}\n".encode() for i in range(400)]
    raw = b"".join(rows)
    (folder / "good.csv.gz").write_bytes(COMPRESS["gz"](raw))
    (folder / "garbage.csv.gz").write_bytes(b"\x1f\x8b\x08\x00 this is no deflate stream at all")
    (folder / "plain_text.csv.gz").write_bytes(raw)  # named .gz, never compressed
    for c, compress in COMPRESS.items():
        packed = compress(raw)
        (folder / f"cut.csv.{c}").write_bytes(packed[: len(packed) * 2 // 3])
    (folder / "docs.jsonl.xz").write_bytes(b"")  # a jsonl file in a csv source: unread, counted
    lines = [json.dumps({"text": f"第{i}行 line {i}"}, ensure_ascii=False).encode() + b"\n" for i in range(300)]
    (folder / "docs.jsonl.gz").write_bytes(COMPRESS["gz"](b"".join(lines))[:-100])
    docs = {"name": "j", "type": "jsonl", "path": str(folder / "docs.jsonl.gz")}
    rejects, samples = _run(tmp_path, [{"name": "m", "type": "csv", "path": str(folder)}, docs], **ALLOW)

    at = _offsets(rows)
    assert sorted(loc for loc in samples if loc.startswith("m/good.csv.gz@")) == sorted(
        f"m/good.csv.gz@{o}" for o in at[1:]
    )
    reasons = {loc: r["reason"] for loc, r in rejects.items()}
    assert reasons.pop("m/garbage.csv.gz@0") == "corrupt gzip"
    assert reasons.pop("m/plain_text.csv.gz@0") == "corrupt gzip"
    assert "Not a gzipped file" in rejects["m/plain_text.csv.gz@0"]["detail"]
    assert reasons.pop("m/docs.jsonl.xz") == "not read: unsupported file for csv source"
    assert reasons.pop("m/docs.jsonl.gz") == "not read: unsupported file for csv source"
    (cut_at,) = [int(loc.rsplit("@", 1)[1]) for loc in reasons if loc.startswith("j/")]
    assert reasons.pop(f"j/docs.jsonl.gz@{cut_at}") == "corrupt gzip" and cut_at in _offsets(lines), cut_at
    assert sorted(int(loc.rsplit("@", 1)[1]) for loc in samples if loc.startswith("j/")) == [
        o for o in _offsets(lines) if o < cut_at
    ]
    assert cut_at > len(b"".join(lines)) // 2  # only the end of the stream was lost
    for c, name in NAMES.items():
        # rows are read until the stream breaks, then one reject at the row being read stands for the rest
        broken = [loc for loc in reasons if loc.startswith(f"m/cut.csv.{c}@")]
        assert len(broken) == 1 and reasons.pop(broken[0]) == f"corrupt {name}", c
        offset = int(broken[0].rsplit("@", 1)[1])
        assert offset in at and (offset > 0 or c in ("bz2", "zst")), (c, offset)  # a cut bzip2/zstd block gives nothing
        read = sorted(int(loc.rsplit("@", 1)[1]) for loc in samples if loc.startswith(f"m/cut.csv.{c}@"))
        assert read == [o for o in at[1:] if o < offset], c
        detail = rejects[broken[0]]["detail"]
        assert detail.startswith(("EOFError: ", "ZstdError: ")), detail
    assert not reasons
    assert len(samples) == 400 + sum(1 for loc in samples if loc.startswith(("m/cut.", "j/"))) and len(rejects) == 9


def test_a_bomb_line_in_a_compressed_manifest_is_read_past_without_holding_it(tmp_path: Path) -> None:
    zc = zstandard.ZstdCompressor().compressobj()
    first = json.dumps({"text": "炸弹之前 before the bomb"}, ensure_ascii=False).encode() + b"\n"
    last = json.dumps({"text": "after the bomb 之后"}, ensure_ascii=False).encode() + b"\n"
    parts = [zc.compress(first)] + [zc.compress(b"\0" * (1 << 20)) for _ in range(BOMB_BYTES >> 20)]
    (tmp_path / "bomb.jsonl.zst").write_bytes(b"".join([*parts, zc.compress(b"\n" + last), zc.flush()]))
    source = {"name": "b", "type": "jsonl", "path": str(tmp_path / "bomb.jsonl.zst")}
    recipe = recipe_from_dict({"output": str(tmp_path / "o"), "sources": [source], "limits": {"max_text_bytes": "1MB"}})
    (unit,) = plan_source(recipe.sources[0], recipe)
    tracemalloc.start()
    try:
        records = list(read_unit(unit, recipe))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"held {peak >> 20} MiB"
    assert [r.sample["segments"][0]["text"] for r in records if r.sample] == [
        "炸弹之前 before the bomb",
        "after the bomb 之后",
    ]
    (bad,) = [r.reject for r in records if r.reject]
    assert (bad.locator, bad.reason) == (f"bomb.jsonl.zst@{len(first)}", "line too long")


# ---------------------------------------------------------------- compressed WebDataset members


def _stream(c: str, zeros: int) -> bytes:
    """``zeros`` zero bytes compressed as ``c``, fed a MiB at a time (the input is never held whole)."""
    chunk, n = b"\0" * (1 << 20), zeros >> 20
    if c == "gz":
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        return b"".join(z.compress(chunk) for _ in range(n)) + z.flush()
    if c == "zst":
        zc = zstandard.ZstdCompressor().compressobj()
        return b"".join(zc.compress(chunk) for _ in range(n)) + zc.flush()
    comp = bz2.BZ2Compressor(1) if c == "bz2" else lzma.LZMACompressor(preset=0)
    return b"".join(comp.compress(chunk) for _ in range(n)) + comp.flush()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """200 MiB of zeros in each compression: from under 1 KiB (bzip2) to 200 KiB (gzip)."""
    return {c: _stream(c, BOMB_BYTES) for c in COMPRESS}


def test_members_of_each_compression_are_inflated_under_the_member_bound(
    tmp_path: Path, bombs: dict[str, bytes]
) -> None:
    jpg = _jpeg()
    members: list[tuple[str, bytes]] = []
    for c, compress in COMPRESS.items():
        members += [(f"ok_{c}.jpg", jpg), (f"ok_{c}.txt.{c}", compress(f"压缩的标题 caption in {c}".encode()))]
        members += [(f"ok_{c}.json.{c}", compress(json.dumps({"key": f"ok_{c}", "width": 8}).encode()))]
        packed = compress(b"a caption that will be cut " * 20)
        members += [(f"cut_{c}.jpg", jpg), (f"cut_{c}.txt.{c}", packed[: len(packed) // 2])]
        members += [(f"bad_{c}.jpg", jpg), (f"bad_{c}.txt.{c}", b"\x00\x01 not a compressed stream")]
        members += [(f"bomb_{c}.jpg", jpg), (f"bomb_{c}.txt.{c}", bombs[c])]
    members += [(f"twice.txt.{c}", COMPRESS[c](b"same member, four ways")) for c in ("gz", "zst")]
    tar = tmp_path / "in" / "raw.tar"
    tar.parent.mkdir()
    tar.write_bytes(tar_with(members))
    source = {"name": "wds", "type": "webdataset", "path": str(tar.parent), "max_member_bytes": "1MB"}
    rejects, samples = _run(tmp_path, [source])

    assert sorted(samples) == sorted(f"wds/raw.tar#ok_{c}" for c in COMPRESS)
    for c in COMPRESS:
        sample = samples[f"wds/raw.tar#ok_{c}"]
        assert [s["modality"] for s in sample["segments"]] == ["image", "text"]
        assert sample["segments"][1]["text"] == f"压缩的标题 caption in {c}"
        assert sample["meta"]["foreign"] == {"key": f"ok_{c}", "width": 8}
        assert json.loads(sample["segments"][0]["meta"])["ext"] == "jpg"
    reasons = {loc.split("#", 1)[1]: (r["reason"], r["detail"]) for loc, r in rejects.items()}
    assert reasons.pop("twice") == ("duplicate member in sample", "twice.txt.zst and twice.txt")
    for c, name in NAMES.items():
        assert reasons.pop(f"bomb_{c}") == (
            "member too large after decompression",
            f"bomb_{c}.txt.{c}: over {1 << 20} bytes",
        )
        for kind in ("cut", "bad"):
            reason, detail = reasons.pop(f"{kind}_{c}")
            assert reason == "undecodable member" and detail.startswith(f"{kind}_{c}.txt.{c}: corrupt {name}: "), detail
    assert not reasons


@pytest.mark.parametrize("c", list(COMPRESS))
def test_inflate_stops_at_its_bound_without_inflating_the_bomb(c: str, bombs: dict[str, bytes]) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as e:
            inflate_bounded(bombs[c], 1 << 20, f"k.txt.{c}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (e.value.reason, e.value.detail) == (
        "member too large after decompression",
        f"k.txt.{c}: over 1048576 bytes",
    )
    assert peak < 40 << 20, f"{c}: held {peak >> 20} MiB"
    two = COMPRESS[c]("一".encode()) + COMPRESS[c](b"two streams")  # concatenated streams read as one
    assert inflate_bounded(two, 100, f"k.txt.{c}") == "一two streams".encode()
    with pytest.raises(DecodeError, match="member too large"):
        inflate_bounded(two, len("一two streams".encode()) - 1, f"k.txt.{c}")
