"""Real-world manifests (issue 12): CSV/TSV (img2dataset, WebVid) and interleaved documents (mmc4,
OBELICS) through real runs; every row or document ends in a shard or in the ledger with a specific
reason, web URLs are never fetched at ingest, and the audit balances."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import sources
from pipelines.audit import audit
from pipelines.executor import run_recipe
from pipelines.recipe import RecipeError, recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.sources import plan_source, read_unit
from shards.reader import iter_samples
from tests.hostile import tar_with

CDN = "https://cdn.example.com"
ALLOW = {"storage": {"allow_uris": [CDN + "/"]}}


def _jpeg(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "JPEG")
    return buf.getvalue()


def _run(tmp_path: Path, sources: list[dict[str, Any]], **doc: Any) -> tuple[dict[str, dict], dict[str, dict]]:
    """Run ``sources`` locally (with ``validate``); returns the ledger and the samples, each by locator,
    after checking the audit balances and that no input is counted twice."""
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        {"name": "formats", "output": str(out), "sources": sources, "pipeline": ["validate"], **doc}
    )
    m = run_recipe(recipe, executor="local", progress=False)
    report = audit(str(out))
    assert report.balanced, report.summary()
    assert m["ingested"] == m["written"] + m["rejected"]
    ledger = RunDir(str(out)).read_ledger().to_pylist()
    rejects = {r["locator"]: r for r in ledger}
    samples = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for s in iter_samples(str(tar)):
            meta = s["meta"] if isinstance(s["meta"], dict) else json.loads(s["meta"] or "{}")
            samples[meta["locator"]] = {**s, "meta": meta}
    assert len(rejects) == len(ledger) and len(samples) == m["written"], "one row per input"
    assert not set(rejects) & set(samples)
    return rejects, samples


def _offsets(raw: bytes, rows: list[bytes]) -> list[int]:
    """Where each of ``rows`` (exact byte strings, in order) starts in ``raw``."""
    out, pos = [], 0
    for row in rows:
        pos = raw.index(row, pos)
        out.append(pos)
        pos += len(row)
    return out


def _shape(sample: dict) -> list[tuple[str, str]]:
    """Segments as (modality, what): the text, the uri, or ``bytes``."""
    return [(s["modality"], s["text"] or s["uri"] or "bytes") for s in sample["segments"]]


# ---------------------------------------------------------------- CSV / TSV


def test_img2dataset_csv_and_tsv_rows_become_samples_or_specific_rejects(tmp_path: Path) -> None:
    src = tmp_path / "pairs"
    (src / "img").mkdir(parents=True)
    (src / "img" / "a.jpg").write_bytes(_jpeg())
    csv_rows = [
        b"url,caption,width\n",
        f"{CDN}/1.jpg,a red kite,640\n".encode(),
        b'img/a.jpg,"a local photo, with a comma",8\n',
        b"http://10.0.0.1/2.jpg,an internal address,1\n",
        b"img/missing.jpg,gone,1\n",
        b"../../etc/passwd,escape,1\n",
        b"just,three,fields,four\n",
        b",no url at all,1\n",
        b"img/a.jpg,caf\xe9 in latin-1,1\n",
        b"\n",
    ]
    (src / "pairs.csv").write_bytes(b"".join(csv_rows))
    tsv_rows = [b"caption\turl\n", f"a tab-separated kite\t{CDN}/3.jpg\n".encode(), b"no url\t\n"]
    (src / "more.tsv").write_bytes(b"".join(tsv_rows))
    (src / "notes.txt").write_text("not a manifest")
    rejects, samples = _run(tmp_path, [{"name": "pairs", "type": "csv", "path": str(src), "unit_bytes": 40}], **ALLOW)

    at = _offsets(b"".join(csv_rows), csv_rows)
    tsv_at = _offsets(b"".join(tsv_rows), tsv_rows)
    assert _shape(samples[f"pairs.csv@{at[1]}"]) == [("image", f"{CDN}/1.jpg"), ("text", "a red kite")]
    assert samples[f"pairs.csv@{at[1]}"]["kind"] == "image_caption"
    assert samples[f"pairs.csv@{at[1]}"]["meta"]["width"] == "640"  # other columns are metadata
    assert _shape(samples[f"pairs.csv@{at[2]}"]) == [("image", "bytes"), ("text", "a local photo, with a comma")]
    assert _shape(samples[f"more.tsv@{tsv_at[1]}"]) == [("image", f"{CDN}/3.jpg"), ("text", "a tab-separated kite")]
    assert len(samples) == 3
    reasons = {loc: r["reason"] for loc, r in rejects.items()}
    assert reasons == {
        f"pairs.csv@{at[3]}": "uri not allowed",
        f"pairs.csv@{at[4]}": "missing media file",
        f"pairs.csv@{at[5]}": "path outside allowed roots",
        f"pairs.csv@{at[6]}": "malformed csv row",
        f"pairs.csv@{at[7]}": "empty media cell",
        f"pairs.csv@{at[8]}": "text is not utf-8",
        f"more.tsv@{tsv_at[2]}": "empty media cell",
        "notes.txt": "not read: unsupported file for csv source",
        "img/a.jpg": "not read: unsupported file for csv source",  # a folder source reads only its manifests
    }
    assert "storage.allow_uris" in rejects[f"pairs.csv@{at[3]}"]["detail"]
    assert "4 fields, the header has 3" in rejects[f"pairs.csv@{at[6]}"]["detail"]


def _webvid(rows: int, seed: int = 0) -> bytes:
    """A WebVid-style CSV whose captions hold commas, quotes and newlines."""
    rng = random.Random(seed)
    out = ["videoid,contentUrl,duration,page_dir,name\n"]
    for i in range(rows):
        words = [rng.choice(["a", "dog", "runs,", "on", "the", '"beach"', "\n", "at\r\ndusk", "ÿ"]) for _ in range(6)]
        caption = " ".join(words).replace('"', '""')
        out.append(f'{1000 + i},{CDN}/v/{i}.mp4,PT00H00M{i % 60:02d}S,041/{i},"{caption}"\n')
    return "".join(out).encode()


@pytest.mark.parametrize("chunk", [3, 4 << 20])
def test_webvid_csv_with_quoted_newlines_reads_every_row_once_at_any_unit_size(
    tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "CSV_CHUNK", chunk)  # the planner's scan across chunk edges too
    raw = _webvid(40)
    (tmp_path / "webvid.csv").write_bytes(raw)
    expected = None
    for unit_bytes in (1, 7, 64, 333, 1 << 20):
        recipe = recipe_from_dict(
            {
                "output": str(tmp_path / "out"),
                "sources": [
                    {"name": "wv", "type": "csv", "path": str(tmp_path / "webvid.csv"), "unit_bytes": unit_bytes}
                ],
                **ALLOW,
            }
        )
        units = plan_source(recipe.sources[0], recipe)
        assert len(units) > 1 or unit_bytes > len(raw)
        records = [r for u in units for r in read_unit(u, recipe)]
        assert all(r.sample is not None for r in records), [r.reject for r in records if r.reject]
        got = [(r.sample["segments"][-1]["text"], r.sample["segments"][0]["uri"]) for r in records]
        if expected is None:
            expected = got
            assert len(got) == 40 and got[0][1] == f"{CDN}/v/0.mp4"
        assert got == expected, f"unit_bytes={unit_bytes}"
    assert any("\n" in text and "," in text and '"' in text for text, _ in expected)


def test_webvid_columns_option_and_header_detection(tmp_path: Path) -> None:
    rows = [
        b"videoid,contentUrl,duration,page_dir,name\n",
        f'1,{CDN}/1.mp4,PT00H00M11S,006/1,"Aerial view, over\nthe ""old"" town"\n'.encode(),
        f'2,{CDN}/2.mp4,PT00H00M05S,006/2,a 5" tall cup,\n'.encode(),  # a stray quote runs to the end
    ]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "webvid.csv").write_bytes(b"".join(rows))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "clips.csv").write_bytes(b"id,link,title\n7,%s/7.mp4,a cat\n" % CDN.encode())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "other.csv").write_bytes(b"id,link,title\n7,%s/7.mp4,a cat\n" % CDN.encode())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "dup.csv").write_bytes(b"url,url\na,b\nc,d\n\ne,f\n")
    cols = {"url": "contentUrl", "text": "name", "modality": "video"}
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "wv", "type": "csv", "path": str(tmp_path / "a" / "webvid.csv"), "columns": cols},
            {"name": "cl", "type": "csv", "path": str(tmp_path / "b"), "columns": {"url": "link", "text": "title"}},
            {"name": "missing", "type": "csv", "path": str(tmp_path / "d"), "columns": {"url": "contentUrl"}},
            {"name": "dup", "type": "csv", "path": str(tmp_path / "e"), "unit_bytes": 8},
        ],
        **ALLOW,
    )
    first = samples["webvid.csv@" + str(len(rows[0]))]
    assert first["kind"] == "video_caption"
    assert _shape(first) == [("video", f"{CDN}/1.mp4"), ("text", 'Aerial view, over\nthe "old" town')]
    assert first["meta"]["videoid"] == "1" and first["meta"]["duration"] == "PT00H00M11S"
    assert rejects[f"webvid.csv@{len(rows[0]) + len(rows[1])}"]["reason"] == "malformed csv row"
    clip = samples["clips.csv@14"]
    assert _shape(clip) == [("image", f"{CDN}/7.mp4"), ("text", "a cat")] and clip["meta"]["claimed_id"] == "7"
    # a header no row can be read by: every row is counted, with the header's reason
    assert rejects["other.csv@14"]["reason"] == "column not found"
    assert "'contentUrl' is not in ['id', 'link', 'title']" in rejects["other.csv@14"]["detail"]
    assert {rejects[f"dup.csv@{o}"]["reason"] for o in (8, 12, 17)} == {"bad csv header"}
    assert "dup.csv@16" not in rejects  # a blank line is no input
    # without `columns`, a WebVid header is detected: contentUrl as video, name as caption
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "webvid.csv").write_bytes(b"".join(rows[:2]))
    _, auto = _run(tmp_path / "c", [{"name": "wv", "type": "csv", "path": str(tmp_path / "c")}], **ALLOW)
    assert [_shape(s) for s in auto.values()] == [_shape(first)]


def test_web_urls_are_refused_without_allow_uris_and_never_fetched(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text(f"url,caption\n{CDN}/1.jpg,a kite\nhttp://127.0.0.1:9/x.jpg,local\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"image": f"{CDN}/2.jpg", "text": "shorthand url"}) + "\n")
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "pairs", "type": "csv", "path": str(tmp_path / "pairs.csv")},
            {"name": "docs", "type": "jsonl", "path": str(tmp_path / "docs.jsonl")},
        ],
    )
    assert not samples
    assert {loc: r["reason"] for loc, r in rejects.items()} == {
        "pairs.csv@12": "uri not allowed",
        f"pairs.csv@{12 + len(CDN) + 14}": "uri not allowed",
        "docs.jsonl@0": "uri not allowed",
    }
    assert all("add its prefix to storage.allow_uris" in r["detail"] for r in rejects.values())


# ---------------------------------------------------------------- interleaved documents


def _mmc4_docs() -> list[dict[str, Any]]:
    good = {
        "url": "https://blog.example.org/post",
        "text_list": ["First.", "Second.", "Third.", "", "Fourth."],
        "image_info": [
            {"raw_url": f"{CDN}/a.jpg", "matched_text_index": 2, "matched_sim": 0.31},
            {"image_name": "img/b.jpg", "raw_url": f"{CDN}/b.jpg", "matched_text_index": 0, "matched_sim": 0.28},
            {"image_name": "img/not-here.jpg", "raw_url": f"{CDN}/c.jpg", "matched_text_index": 4},
        ],
        "similarity_matrix": [[0.1, 0.2, 0.3, 0.0, 0.1]] * 3,
    }
    return [
        good,
        {"text_list": ["one", "two"], "image_info": [{"raw_url": f"{CDN}/x.jpg", "matched_text_index": 2}]},
        {"text_list": ["one"], "image_info": [{"matched_text_index": 0}]},
        {"text_list": ["one", None], "image_info": []},
        {"text_list": ["only text", "no images"], "image_info": None},
        {"text_list": ["one"], "image_info": [{"raw_url": "https://elsewhere.example/x.jpg", "matched_text_index": 0}]},
    ]


def _obelics_docs() -> list[dict[str, Any]]:
    return [
        {
            "texts": ["Intro paragraph.", None, "Middle paragraph.", None, ""],
            "images": [None, f"{CDN}/o1.jpg", None, "img/b.jpg", None],
            "metadata": '[{"document_url": "https://news.example/1"}]',
        },
        {"texts": ["a", None], "images": [None, f"{CDN}/o2.jpg", None]},
        {"texts": ["a", "b"], "images": [None, f"{CDN}/o3.jpg"]},
        {"texts": ["a", None], "images": [None, None]},
    ]


def test_mmc4_and_obelics_documents_in_jsonl_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.jpg").write_bytes(_jpeg("blue"))
    mmc4 = [json.dumps(d) + "\n" for d in _mmc4_docs()]
    (tmp_path / "mmc4.jsonl").write_text("".join(mmc4))
    obelics = [json.dumps(d) + "\n" for d in _obelics_docs()]
    (tmp_path / "obelics.jsonl").write_text("".join(obelics))
    rows = [_obelics_docs()[0], {"texts": [None, "caption after"], "images": [f"{CDN}/p.jpg", None]}]
    table = pa.Table.from_pylist([{k: r[k] for k in ("texts", "images")} for r in rows])
    pq.write_table(table, tmp_path / "obelics.parquet")
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "mmc4", "type": "jsonl", "path": str(tmp_path / "mmc4.jsonl")},
            {"name": "obelics", "type": "jsonl", "path": str(tmp_path / "obelics.jsonl"), "layout": "obelics"},
            {"name": "obpq", "type": "parquet", "path": str(tmp_path / "obelics.parquet")},
        ],
        **ALLOW,
    )
    m_at = _offsets("".join(mmc4).encode(), [d.encode() for d in mmc4])
    o_at = _offsets("".join(obelics).encode(), [d.encode() for d in obelics])

    doc = samples[f"mmc4.jsonl@{m_at[0]}"]
    assert doc["kind"] == "interleaved_image_text"
    # images go before their matched sentence; the blank sentence is dropped, image c keeps its place
    assert _shape(doc) == [
        ("image", "bytes"),  # img/b.jpg exists beside the manifest: read locally
        ("text", "First. Second."),
        ("image", f"{CDN}/a.jpg"),
        ("text", "Third."),
        ("image", f"{CDN}/c.jpg"),  # img/not-here.jpg does not: its raw_url stays a uri
        ("text", "Fourth."),
    ]
    seg_meta = [json.loads(s["meta"]) if isinstance(s["meta"], str) else s["meta"] for s in doc["segments"]]
    assert seg_meta[0]["raw_url"] == f"{CDN}/b.jpg" and seg_meta[2]["matched_sim"] == 0.31
    assert seg_meta[4]["image_name"] == "img/not-here.jpg"
    assert doc["meta"]["url"] == "https://blog.example.org/post" and "similarity_matrix" in doc["meta"]
    assert samples[f"mmc4.jsonl@{m_at[4]}"]["kind"] == "text"

    for key in (f"obelics.jsonl@{o_at[0]}", "obelics.parquet#rg0/0"):
        assert samples[key]["kind"] == "interleaved_image_text"
        assert _shape(samples[key]) == [
            ("text", "Intro paragraph."),
            ("image", f"{CDN}/o1.jpg"),
            ("text", "Middle paragraph."),
            ("image", "bytes"),
        ]
    assert _shape(samples["obelics.parquet#rg0/1"]) == [("image", f"{CDN}/p.jpg"), ("text", "caption after")]
    assert samples["obelics.parquet#rg0/1"]["kind"] == "interleaved_image_text"

    assert {loc: r["reason"] for loc, r in rejects.items()} == {
        f"mmc4.jsonl@{m_at[1]}": "image index out of range",
        f"mmc4.jsonl@{m_at[2]}": "bad interleaved document",
        f"mmc4.jsonl@{m_at[3]}": "bad interleaved document",
        f"mmc4.jsonl@{m_at[5]}": "uri not allowed",
        f"obelics.jsonl@{o_at[1]}": "interleaved lists differ in length",
        f"obelics.jsonl@{o_at[2]}": "interleaved pair not exactly one",
        f"obelics.jsonl@{o_at[3]}": "interleaved pair not exactly one",
    }
    assert "has both" in rejects[f"obelics.jsonl@{o_at[2]}"]["detail"]
    assert "has neither" in rejects[f"obelics.jsonl@{o_at[3]}"]["detail"]
    assert "no image_name, raw_url or url" in rejects[f"mmc4.jsonl@{m_at[2]}"]["detail"]


def test_a_forced_layout_rejects_records_of_another_layout(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "plain record"}) + "\n")
    rejects, samples = _run(
        tmp_path, [{"name": "d", "type": "jsonl", "path": str(tmp_path / "d.jsonl"), "layout": "mmc4"}]
    )
    assert not samples and rejects["d.jsonl@0"]["reason"] == "bad interleaved document"


# ---------------------------------------------------------------- the schema


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"layout": "mmc5"}, "sources[0].layout: unknown layout 'mmc5' (did you mean 'mmc4'?)"),
        ({"columns": {"caption": "name"}}, "sources[0].columns: unknown key 'caption'"),
        ({"columns": {"modality": "photo"}}, "sources[0].columns.modality: unknown modality 'photo'"),
        ({"delimiter": ":"}, "sources[0].delimiter: unknown delimiter ':'"),
        ({"type": "tsv"}, "sources[0].type: unknown type 'tsv'"),
    ],
)
def test_new_source_keys_are_schema_checked(source: dict[str, Any], message: str) -> None:
    doc = {"output": "x", "sources": [{"type": "csv", "path": "m.csv", **source}]}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(doc)
    assert str(e.value).startswith(message)


def test_a_csv_row_over_max_text_bytes_is_a_reject_and_the_next_row_still_reads(tmp_path: Path) -> None:
    rows = [b"url,caption\n", f'{CDN}/1.jpg,"{"long, " * 40}\nstill long"\n'.encode(), f"{CDN}/2.jpg,short\n".encode()]
    (tmp_path / "p.csv").write_bytes(b"".join(rows))
    source = {"name": "p", "type": "csv", "path": str(tmp_path / "p.csv")}
    rejects, samples = _run(tmp_path, [source], limits={"max_text_bytes": 100}, **ALLOW)
    at = _offsets(b"".join(rows), rows)
    assert rejects[f"p.csv@{at[1]}"]["reason"] == "csv row too long"
    assert _shape(samples[f"p.csv@{at[2]}"]) == [("image", f"{CDN}/2.jpg"), ("text", "short")]


# ---------------------------------------------------------------- path patterns


def test_glob_and_brace_paths_read_what_they_match_inside_their_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    (data / "more" / "b.jsonl").write_text(json.dumps({"text": "from b"}) + "\n")
    (data / "skip.txt").write_text("not matched, not an input")
    (tmp_path / "outside.jsonl").write_text(json.dumps({"text": "outside"}) + "\n")
    (data / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in (0, 2):
        (shards / f"{i:03d}.tar").write_bytes(tar_with([(f"k{i}.txt", f"caption {i}".encode())]))
    (shards / "009.tar").write_bytes(tar_with([("k9.txt", b"not named by the range")]))
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "docs", "type": "jsonl", "path": str(data / "**" / "*.jsonl")},
            {"name": "wds", "type": "webdataset", "path": str(shards / "{000..002}.tar")},
        ],
    )
    assert {loc: s["segments"][0]["text"] for loc, s in samples.items()} == {
        "a.jsonl@0": "from a",
        "more/b.jsonl@0": "from b",
        "000.tar#k0": "caption 0",
        "002.tar#k2": "caption 2",
    }
    assert {loc: r["reason"] for loc, r in rejects.items()} == {
        "link.jsonl": "path outside source root",  # the pattern's folder confines what it matches
        "001.tar": "missing file",  # a name the range gives that is not there is counted, not skipped
    }
    with pytest.raises(FileNotFoundError, match="matches no file"):
        plan_source(
            recipe_from_dict({"output": "o", "sources": [{"type": "jsonl", "path": str(data / "*.csv")}]}).sources[0]
        )


def test_laion_parquet_and_img2dataset_jsonl_rows_map_like_csv_rows(tmp_path: Path) -> None:
    laion = [
        {"URL": f"{CDN}/l1.jpg", "TEXT": "a laion caption", "WIDTH": 640.0, "similarity": 0.33, "kind": "photo"},
        {"URL": f"{CDN}/l2.jpg", "TEXT": None, "WIDTH": 320.0, "similarity": 0.30, "kind": None},
        {"URL": None, "TEXT": "no url", "WIDTH": None, "similarity": 0.2, "kind": None},
    ]
    pq.write_table(pa.Table.from_pylist(laion), tmp_path / "laion.parquet")
    lines = [{"url": f"{CDN}/j.jpg", "caption": "jsonl pair"}, {"name": "Bob", "age": 3}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "clips.jsonl").write_text(json.dumps({"link": f"{CDN}/c.mp4", "title": "a clip"}) + "\n")
    cols = {"url": "link", "text": "title", "modality": "video"}
    rejects, samples = _run(
        tmp_path,
        [
            {"name": "laion", "type": "parquet", "path": str(tmp_path / "laion.parquet")},
            {"name": "pairs", "type": "jsonl", "path": str(tmp_path / "pairs.jsonl")},
            {"name": "clips", "type": "jsonl", "path": str(tmp_path / "clips.jsonl"), "columns": cols},
        ],
        **ALLOW,
    )
    first = samples["laion.parquet#rg0/0"]
    assert _shape(first) == [("image", f"{CDN}/l1.jpg"), ("text", "a laion caption")]
    assert first["meta"]["similarity"] == 0.33 and first["meta"]["kind_column"] == "photo"
    assert _shape(samples["laion.parquet#rg0/1"]) == [("image", f"{CDN}/l2.jpg")]  # no caption: an image alone
    assert _shape(samples["pairs.jsonl@0"]) == [("image", f"{CDN}/j.jpg"), ("text", "jsonl pair")]
    assert _shape(samples["clips.jsonl@0"]) == [("video", f"{CDN}/c.mp4"), ("text", "a clip")]
    assert {loc: r["reason"] for loc, r in rejects.items()} == {
        "laion.parquet#rg0/2": "empty media cell",
        # no url column and no `columns`: a plain record as before, not a caption named "Bob"
        f"pairs.jsonl@{len(json.dumps(lines[0])) + 1}": "empty record",
    }
