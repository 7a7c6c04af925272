"""Ingest readers: planning into units and reading every input exactly once, bad input as rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.demo_data import PHOTOS, photo_bytes
from pipelines.recipe import RecipeError, load_recipe, recipe_from_dict
from pipelines.sources import plan, read_unit


def _recipe(tmp_path: Path, **source) -> object:
    return recipe_from_dict({"output": str(tmp_path / "run"), "sources": [{"name": "s", **source}]})


def _read_all(recipe) -> tuple[list[dict], list]:
    samples, rejects = [], []
    for unit in plan(recipe):
        for rec in read_unit(unit, recipe):
            (samples.append(rec.sample) if rec.sample else rejects.append(rec.reject))
    return samples, rejects


def test_jsonl_byte_ranges_read_each_line_once(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 17), "lang": "en"}) for i in range(200)]
    lines.insert(57, "{broken")
    lines.insert(120, "")
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    recipe = _recipe(tmp_path, type="jsonl", path=str(tmp_path / "a.jsonl"), unit_bytes=300)
    units = plan(recipe)
    assert len(units) > 10
    samples, rejects = _read_all(recipe)
    assert sorted(s["segments"][0]["text"] for s in samples) == sorted(
        json.loads(line)["text"] for line in lines if line and line != "{broken"
    )
    assert [r.reason for r in rejects] == ["broken json line"]
    assert len({s["id"] for s in samples}) == 200
    assert json.loads(samples[0]["meta"])["lang"] == "en"


def test_jsonl_segments_and_media_paths(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.jpg").write_bytes(photo_bytes("rocket"))
    records = [
        {"segments": [{"modality": "text", "text": "see:"}, {"modality": "image", "path": "img/r.jpg"}]},
        {"image": "img/r.jpg", "text": PHOTOS["rocket"]},
        {"image": "img/missing.jpg", "text": "gone"},
        {"kind": "nonsense", "text": "x"},
        {"segments": [{"modality": "smell"}]},
        {"video": {"not": "a path"}},
        ["not", "an", "object"],
        {"nothing": True},
    ]
    raw = "\n".join(json.dumps(r) for r in records).encode() + b"\n" + "caf\xe9\n".encode("latin-1")
    (tmp_path / "m.jsonl").write_bytes(raw)
    samples, rejects = _read_all(_recipe(tmp_path, type="jsonl", path=str(tmp_path / "m.jsonl")))
    assert [s["kind"] for s in samples] == ["image_caption", "image_caption"]
    assert samples[0]["segments"][1]["bytes"] == (tmp_path / "img" / "r.jpg").read_bytes()
    assert [r.reason for r in rejects] == [
        "missing media file",
        "unknown kind",
        "bad segment",
        "bad segment",
        "record is not an object",
        "empty record",
        "text is not utf-8",
    ]


def test_large_media_stay_as_uris(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo_bytes("astronaut"))
    (tmp_path / "a.txt").write_text("an astronaut")
    recipe = recipe_from_dict(
        {
            "output": str(tmp_path / "run"),
            "sources": [{"name": "s", "type": "local", "path": str(tmp_path)}],
            "shards": {"max_inline_bytes": 1000},
        }
    )
    (sample,), _ = _read_all(recipe)
    img = sample["segments"][0]
    assert img["bytes"] is None and img["uri"] == str(tmp_path / "a.jpg")


def test_local_folder_groups_by_stem(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cat.jpg").write_bytes(photo_bytes("chelsea"))
    (tmp_path / "sub" / "cat.txt").write_text("a cat")
    (tmp_path / "sub" / "cat.json").write_text('{"license": "cc0"}')
    (tmp_path / "notes.txt").write_text("plain text")
    (tmp_path / "weird.xyz").write_bytes(b"??")
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "empty.txt").write_bytes(b"")
    samples, rejects = _read_all(_recipe(tmp_path, type="local", path=str(tmp_path), unit_size=2))
    by_kind = {s["kind"]: s for s in samples}
    assert set(by_kind) == {"image_caption", "text"}
    assert json.loads(by_kind["image_caption"]["meta"])["sidecar"] == {"license": "cc0"}
    assert sorted(r.reason for r in rejects) == ["bad json sidecar", "empty text", "unsupported file type"]
    assert json.loads(by_kind["text"]["meta"])["locator"] == "notes"


def test_parquet_row_groups(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": [photo_bytes(n, "PNG", (16, 16)) for n in ("coffee", "rocket", "moon")] + [b""],
            "text": ["a", "b", "c", "d"],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    recipe = _recipe(tmp_path, type="parquet", path=str(tmp_path / "p.parquet"))
    assert len(plan(recipe)) == 2
    samples, rejects = _read_all(recipe)
    assert [s["segments"][1]["text"] for s in samples] == ["a", "b", "c"]
    assert [r.reason for r in rejects] == ["empty file"]


def test_recipe_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(str(tmp_path / "nope.yaml"))
    (tmp_path / "r.yaml").write_text("sources: [{type: ftp, path: x}]\noutput: o\n")
    with pytest.raises(RecipeError, match="unknown type 'ftp'"):
        load_recipe(str(tmp_path / "r.yaml"))
    (tmp_path / "r.yaml").write_text("sources: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(tmp_path / "r.yaml"))
