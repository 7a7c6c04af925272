"""The ``conversations`` source (issue 16): ShareGPT, LLaVA and OpenAI chat records → SFT samples with
role/turn on every segment, through real local runs whose audit balances; every malformed record is a
reject with its reason. Media are real: skimage photographs, Asterisk's recorded prompts, espeak-ng."""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.audit import audit
from pipelines.conversations import ArrayBroken, array_items
from pipelines.demo_data import asterisk_prompts, espeak, photo_bytes
from pipelines.dryrun import describe_unit
from pipelines.executor import run_recipe
from pipelines.recipe import RecipeError, recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.sources import plan, read_unit
from shards.reader import iter_samples
from shards.schema import KINDS, SFT_KINDS


def _run(tmp_path: Path, sources: list[dict[str, Any]], steps: list[Any] | None = None, **doc: Any):
    """A local run (``validate`` by default); the ledger and the samples by locator, after checking the
    audit balances and every input is in exactly one of them."""
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        {"name": "sft", "output": str(out), "sources": sources, "pipeline": steps or ["validate"], **doc}
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


def _seg_meta(seg: dict) -> dict:
    return seg["meta"] if isinstance(seg["meta"], dict) else json.loads(seg["meta"] or "{}")


def _layout(sample: dict) -> list[tuple[str, int, str, str]]:
    """(role, turn, modality, text or uri or 'bytes') per segment."""
    out = []
    for seg in sample["segments"]:
        m = _seg_meta(seg)
        out.append((m["role"], m["turn"], seg["modality"], seg["text"] or seg["uri"] or "bytes"))
    return out


def _jsonl(path: Path, records: list[Any]) -> list[int]:
    """Write records as JSON lines; their byte offsets (the locators' ``@N``)."""
    lines = [(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode() + b"\n" for r in records]
    path.write_bytes(b"".join(lines))
    offsets, pos = [], 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    return offsets


def _source(path: Path, fmt: str, **kw: Any) -> dict[str, Any]:
    return {"name": "chat", "type": "conversations", "path": str(path), "format": fmt, **kw}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A recorded prompt (with its transcript) and an espeak-ng question, as WAV files."""
    d = tmp_path_factory.mktemp("speech")
    wav, words = asterisk_prompts(1)[0]
    shutil.copy(wav, d / "answer.wav")
    espeak("What animal is in the picture?", "en-us", d / "question.wav")
    return {"answer": d / "answer.wav", "words": words, "question": d / "question.wav"}


def test_sft_kinds_are_kinds() -> None:
    assert set(SFT_KINDS) <= set(KINDS)
    assert SFT_KINDS == ("sft_text", "sft_image", "sft_video", "sft_audio", "sft_image_audio", "sft_audio_generation")


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_multi_turn_system_voice_spoken_answer_and_chinese(tmp_path: Path, speech: dict) -> None:
    src = tmp_path / "chat"
    (src / "img").mkdir(parents=True)
    (src / "img" / "cat.jpg").write_bytes(photo_bytes("chelsea"))
    shutil.copy(speech["answer"], src / "answer.wav")
    shutil.copy(speech["question"], src / "question.wav")
    records = [
        {  # system prompt naming a voice, an image without a placeholder, a spoken last answer
            "id": "a1",
            "category": "General QA",
            "source_dataset": "demo",
            "image": "img/cat.jpg",
            "conversations": [
                {"from": "system", "value": "You are a helpful assistant. voice: espeak:en-gb+f3."},
                {"from": "human", "value": "这是什么动物？"},
                {"from": "gpt", "value": "这是一只猫。"},
                {"from": "human", "value": "Now say something."},
                {"from": "gpt", "value": speech["words"], "audio": "answer.wav"},
            ],
        },
        {  # a record-level system prompt, text only
            "system": "Answer in one word.",
            "category": "math",
            "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "Four."}],
        },
        {  # a spoken question by placeholder, a text answer
            "audio": ["question.wav"],
            "conversations": [{"from": "human", "value": "Listen: <audio>"}, {"from": "gpt", "value": "A cat."}],
        },
        {  # image and audio: the question is spoken, the picture shown
            "image": "img/cat.jpg",
            "audio": "question.wav",
            "category": "Diagram",
            "conversations": [{"from": "human", "value": "<image><audio>"}, {"from": "gpt", "value": "A cat."}],
        },
    ]
    at = _jsonl(src / "chat.jsonl", records)
    rejects, samples = _run(tmp_path, [_source(src / "chat.jsonl", "sharegpt")])
    assert rejects == {}
    first = samples[f"chat.jsonl@{at[0]}"]
    assert first["kind"] == "sft_audio_generation"
    assert _layout(first) == [
        ("system", 0, "text", "You are a helpful assistant. voice: espeak:en-gb+f3."),
        ("user", 1, "image", "bytes"),
        ("user", 1, "text", "这是什么动物？"),
        ("assistant", 2, "text", "这是一只猫。"),
        ("user", 3, "text", "Now say something."),
        ("assistant", 4, "text", speech["words"]),
        ("assistant", 4, "audio", "bytes"),
    ]
    spoken = first["segments"][-1]
    assert spoken["bytes"] == speech["answer"].read_bytes()
    assert _seg_meta(spoken)["tts"] == {"text": speech["words"], "voice": "espeak:en-gb+f3"}
    assert _seg_meta(spoken)["duration"] > 1  # validate probed the real recording
    assert first["meta"]["voice"] == "espeak:en-gb+f3"
    assert first["meta"]["category"] == "general_qa"
    assert first["meta"]["format"] == "sharegpt" and first["meta"]["turns"] == 5
    assert first["meta"]["claimed_id"] == "a1" and first["meta"]["source_dataset"] == "demo"

    second = samples[f"chat.jsonl@{at[1]}"]
    assert second["kind"] == "sft_text" and second["meta"]["turns"] == 3
    assert second["meta"]["category"] == "mathematics" and "voice" not in second["meta"]
    assert _layout(second) == [
        ("system", 0, "text", "Answer in one word."),
        ("user", 1, "text", "2+2?"),
        ("assistant", 2, "text", "Four."),
    ]
    third = samples[f"chat.jsonl@{at[2]}"]
    assert third["kind"] == "sft_audio"
    assert _layout(third) == [
        ("user", 0, "text", "Listen:"),
        ("user", 0, "audio", "bytes"),
        ("assistant", 1, "text", "A cat."),
    ]
    fourth = samples[f"chat.jsonl@{at[3]}"]
    assert fourth["kind"] == "sft_image_audio" and fourth["meta"]["category"] == "graphical"
    assert [m for _, _, m, _ in _layout(fourth)] == ["image", "audio", "text"]


def test_an_assistant_audio_placeholder_is_a_spoken_turn(tmp_path: Path, speech: dict) -> None:
    shutil.copy(speech["question"], tmp_path / "q.wav")
    shutil.copy(speech["answer"], tmp_path / "a.wav")
    record = {
        "audio": ["q.wav", "a.wav"],
        "conversations": [
            {"from": "system", "value": "Speak warmly. VOICE = piper:joe"},
            {"from": "human", "value": "<audio>"},
            {"from": "gpt", "value": "Sure. <audio>"},
        ],
    }
    _jsonl(tmp_path / "c.jsonl", [record])
    recipe = recipe_from_dict({"output": str(tmp_path / "x"), "sources": [_source(tmp_path / "c.jsonl", "sharegpt")]})
    ((unit,),) = [plan(recipe)]
    (rec,) = list(read_unit(unit, recipe))
    sample = rec.sample
    assert sample["kind"] == "sft_audio_generation" and json.loads(sample["meta"])["voice"] == "piper:joe"
    assert _layout(sample) == [
        ("system", 0, "text", "Speak warmly. VOICE = piper:joe"),
        ("user", 1, "audio", "bytes"),
        ("assistant", 2, "text", "Sure."),
        ("assistant", 2, "audio", "bytes"),
    ]
    assert sample["segments"][3]["bytes"] == speech["answer"].read_bytes()
    assert _seg_meta(sample["segments"][3])["tts"] == {"text": "Sure.", "voice": "piper:joe"}
    assert "tts" not in _seg_meta(sample["segments"][1])  # the user's audio is a question, not speech to learn


def test_sharegpt_parquet_with_image_bytes(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["p0", "p1", "p2"],
            "image": [{"bytes": photo_bytes("astronaut", "PNG", (32, 32)), "path": "x.png"}, None, None],
            "conversations": [
                [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "An astronaut."}],
                [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
                [{"from": "human", "value": "长" * 2000}, {"from": "gpt", "value": "Too long."}],  # 6000 bytes
            ],
        }
    )
    pq.write_table(table, tmp_path / "chat.parquet", row_group_size=1)
    source = _source(tmp_path / "chat.parquet", "sharegpt")
    rejects, samples = _run(tmp_path, [source], limits={"max_text_bytes": 4096})
    assert {k: r["reason"] for k, r in rejects.items()} == {"chat.parquet#rg2/0": "text too large"}
    assert [samples[k]["kind"] for k in sorted(samples)] == ["sft_image", "sft_text"]
    img = samples["chat.parquet#rg0/0"]
    assert _layout(img) == [
        ("user", 0, "image", "bytes"),
        ("user", 0, "text", "Describe."),
        ("assistant", 1, "text", "An astronaut."),
    ]
    assert _seg_meta(img["segments"][0])["width"] == 32  # validate read the image bytes


# ---------------------------------------------------------------- LLaVA (a JSON array, as released)


def test_llava_json_array_image_placement_and_media_root(tmp_path: Path) -> None:
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    for name in ("coffee", "rocket"):
        (images / f"{name}.jpg").write_bytes(photo_bytes(name))
    data = tmp_path / "data"
    data.mkdir()
    records = [
        {
            "id": "000000033471",
            "image": "coco/coffee.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the cup?"},
                {"from": "gpt", "value": "Coffee."},
                {"from": "human", "value": "Is it hot?"},
                {"from": "gpt", "value": "It looks warm."},
            ],
        },
        {
            "id": "two",
            "image": ["coco/coffee.jpg", "coco/rocket.jpg"],
            "conversations": [
                {"from": "human", "value": "Compare <image> and <image> please."},
                {"from": "gpt", "value": "A drink and a rocket."},
            ],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi!"}]},
        {
            "id": "no-placeholder",
            "image": "coco/coffee.jpg",
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "too-many",
            "image": "coco/coffee.jpg",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "escape",
            "image": "../../data/../../etc/passwd",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
        {
            "id": "gone",
            "image": "coco/missing.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
    ]
    raw = ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode()
    (data / "llava_mix.json").write_bytes(raw)
    offsets = [raw.index(json.dumps(r).encode()) for r in records]
    source = _source(data / "llava_mix.json", "llava", media_root=str(tmp_path / "images"))
    recipe = recipe_from_dict({"output": str(tmp_path / "x"), "sources": [source]})
    (unit,) = plan(recipe)
    assert unit["array"] and "one json array" in describe_unit(unit)
    rejects, samples = _run(tmp_path, [source])
    loc = [f"llava_mix.json@{o}" for o in offsets]
    assert _layout(samples[loc[0]]) == [
        ("user", 0, "image", "bytes"),
        ("user", 0, "text", "What is in the cup?"),
        ("assistant", 1, "text", "Coffee."),
        ("user", 2, "text", "Is it hot?"),
        ("assistant", 3, "text", "It looks warm."),
    ]
    assert samples[loc[0]]["meta"]["claimed_id"] == "000000033471" and samples[loc[0]]["meta"]["format"] == "llava"
    two = samples[loc[1]]
    assert _layout(two) == [
        ("user", 0, "text", "Compare"),
        ("user", 0, "image", "bytes"),
        ("user", 0, "text", "and"),
        ("user", 0, "image", "bytes"),
        ("user", 0, "text", "please."),
        ("assistant", 1, "text", "A drink and a rocket."),
    ]
    assert two["segments"][1]["bytes"] == (images / "coffee.jpg").read_bytes()
    assert two["segments"][3]["bytes"] == (images / "rocket.jpg").read_bytes()
    assert samples[loc[2]]["kind"] == "sft_text" and samples[loc[0]]["kind"] == "sft_image"
    assert {k: r["reason"] for k, r in rejects.items()} == {
        loc[3]: "placeholder mismatch",
        loc[4]: "placeholder mismatch",
        loc[5]: "path outside allowed roots",
        loc[6]: "missing media file",
    }


# ---------------------------------------------------------------- OpenAI messages


def test_openai_content_parts_base64_audio_and_spoken_answer(tmp_path: Path, speech: dict) -> None:
    (tmp_path / "cat.jpg").write_bytes(photo_bytes("chelsea"))
    png = base64.b64encode(photo_bytes("coffee", "PNG", (40, 30))).decode()
    question = base64.b64encode(speech["question"].read_bytes()).decode()
    answer = base64.b64encode(speech["answer"].read_bytes()).decode()
    records = [
        {
            "category": "OCR",
            "messages": [
                {"role": "developer", "content": "Be concise."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare these:"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                        {"type": "image_url", "image_url": {"url": "cat.jpg"}},
                        {"type": "input_audio", "input_audio": {"data": question, "format": "wav"}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A drink and a cat."}]},
            ],
        },
        {
            "voice": "piper:joe",
            "messages": [
                {"role": "user", "content": "Please say the prompt."},
                {"role": "assistant", "content": None, "audio": {"data": answer, "transcript": speech["words"]}},
            ],
        },
        {
            "messages": [
                {"role": "system", "content": "Reply in speech. Voice: piper:joe"},
                {"role": "user", "content": "Describe it."},
                {"role": "assistant", "content": "It is a cat."},
            ]
        },
    ]
    at = _jsonl(tmp_path / "chat.jsonl", records)
    rejects, samples = _run(tmp_path, [_source(tmp_path / "chat.jsonl", "openai")])
    assert rejects == {}
    first = samples[f"chat.jsonl@{at[0]}"]
    assert first["kind"] == "sft_image_audio" and first["meta"]["category"] == "ocr"
    assert _layout(first) == [
        ("system", 0, "text", "Be concise."),
        ("user", 1, "text", "Compare these:"),
        ("user", 1, "image", "bytes"),
        ("user", 1, "image", "bytes"),
        ("user", 1, "audio", "bytes"),
        ("assistant", 2, "text", "A drink and a cat."),
    ]
    segs = first["segments"]
    assert (_seg_meta(segs[2])["width"], _seg_meta(segs[2])["height"]) == (40, 30)
    assert segs[3]["bytes"] == (tmp_path / "cat.jpg").read_bytes()
    assert segs[4]["bytes"] == speech["question"].read_bytes() and _seg_meta(segs[4])["duration"] > 1
    spoken = samples[f"chat.jsonl@{at[1]}"]
    assert spoken["kind"] == "sft_audio_generation" and spoken["meta"]["voice"] == "piper:joe"
    assert _layout(spoken) == [("user", 0, "text", "Please say the prompt."), ("assistant", 1, "audio", "bytes")]
    assert _seg_meta(spoken["segments"][1])["tts"] == {"text": speech["words"], "voice": "piper:joe"}
    voiced = samples[f"chat.jsonl@{at[2]}"]
    assert voiced["kind"] == "sft_text" and voiced["meta"]["voice"] == "piper:joe"
    assert voiced["meta"]["category"] is None


class _Photos(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = photo_bytes("rocket") if self.path == "/rocket.jpg" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Photos)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/"
    finally:
        srv.shutdown()
        srv.server_close()


def test_urls_stay_uris_at_ingest_and_download_fetches_them(tmp_path: Path, web: str) -> None:
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"{web}rocket.jpg"}},
                        {"type": "text", "text": "What is this?"},
                    ],
                },
                {"role": "assistant", "content": "A rocket."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{web}gone.jpg"}}]},
                {"role": "assistant", "content": "?"},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://elsewhere.example/x.jpg"}}],
                },
                {"role": "assistant", "content": "?"},
            ]
        },
    ]
    at = _jsonl(tmp_path / "chat.jsonl", records)
    source = _source(tmp_path / "chat.jsonl", "openai")
    recipe = recipe_from_dict({"output": str(tmp_path / "x"), "sources": [source], "storage": {"allow_uris": [web]}})
    read = [rec for u in plan(recipe) for rec in read_unit(u, recipe)]
    assert read[0].sample["segments"][0]["uri"] == f"{web}rocket.jpg" and read[0].sample["segments"][0]["bytes"] is None
    steps = [{"op": "download", "params": {"allow_uris": [web], "timeout_s": 2.0, "retries": 0}}, "validate"]
    rejects, samples = _run(tmp_path, [source], steps, storage={"allow_uris": [web]})
    got = samples[f"chat.jsonl@{at[0]}"]
    assert got["segments"][0]["bytes"] == photo_bytes("rocket") and got["segments"][0]["uri"] is None
    assert _seg_meta(got["segments"][0])["role"] == "user" and _seg_meta(got["segments"][0])["turn"] == 0
    assert {k: r["reason"] for k, r in rejects.items()} == {
        f"chat.jsonl@{at[1]}": "download failed",
        f"chat.jsonl@{at[2]}": "uri not allowed",
    }


def test_count_tokens_accounts_sft_kinds(tmp_path: Path, speech: dict, text_tokenizer_dir: str) -> None:
    """``validate`` + ``count_tokens`` over conversations: the manifests count tokens per SFT kind."""
    from pipelines.stats import collect, token_sums
    from shards.manifest import read_shardset_manifest

    (tmp_path / "cat.jpg").write_bytes(photo_bytes("chelsea", size=(64, 48)))
    shutil.copy(speech["answer"], tmp_path / "a.wav")
    records = [
        {
            "image": "cat.jpg",
            "conversations": [{"from": "human", "value": "<image>猫？"}, {"from": "gpt", "value": "是的。"}],
        },
        {"conversations": [{"from": "human", "value": "Say it"}, {"from": "gpt", "value": "Okay", "audio": "a.wav"}]},
        {"conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi!"}]},
    ]
    _jsonl(tmp_path / "c.jsonl", records)
    steps = ["validate", {"op": "count_tokens", "params": {"tokenizer": text_tokenizer_dir}}]
    rejects, samples = _run(tmp_path, [_source(tmp_path / "c.jsonl", "sharegpt")], steps)
    assert rejects == {}
    by_kind = token_sums(collect([str(tmp_path / "run")]), "kind")
    assert set(by_kind) == {"sft_image", "sft_audio_generation", "sft_text"} and min(by_kind.values()) > 0
    totals = read_shardset_manifest(str(tmp_path / "run" / "shards"))["totals"]["tokens"]
    assert sum(by_kind.values()) == sum(totals.values()) and totals["image"] > 0 and totals["audio"] > 0


# ---------------------------------------------------------------- hostile records


def test_hostile_records_are_each_a_counted_reject(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(photo_bytes("coffee"))
    ok = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    cases = [
        ('["not", "an", "object"]', "record is not an object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "missing conversations"),
        ({"conversations": "hello"}, "missing conversations"),
        ({"conversations": []}, "empty conversation"),
        ({"conversations": ["just a string"]}, "bad turn"),
        ({"conversations": [{"from": "narrator", "value": "x"}, *ok]}, "unknown role"),
        ({"conversations": [{"from": 7, "value": "x"}, *ok]}, "unknown role"),
        ({"conversations": [{"from": "human", "value": {"text": "x"}}, ok[1]]}, "bad turn"),
        ({"conversations": [{"from": "human", "value": ["x"]}, ok[1]]}, "bad turn"),
        ({"conversations": [ok[0], {"from": "human", "value": "again"}]}, "no assistant turn"),
        ({"conversations": [ok[0], {"from": "gpt", "value": "   "}]}, "empty turn"),
        (
            {"image": "ok.jpg", "conversations": [{"from": "human", "value": "<image> <image>"}, ok[1]]},
            "placeholder mismatch",
        ),
        (
            {"image": "/etc/passwd", "conversations": [{"from": "human", "value": "<image>"}, ok[1]]},
            "path outside allowed roots",
        ),
        ({"image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>"}, ok[1]]}, "missing media file"),
        (
            {"image": "http://10.0.0.1/x.jpg", "conversations": [{"from": "human", "value": "<image>"}, ok[1]]},
            "uri not allowed",
        ),
        ({"image": 42, "conversations": [{"from": "human", "value": "<image>"}, ok[1]]}, "bad media"),
        (
            {"image": "data:image/png;base64,@@@", "conversations": [{"from": "human", "value": "<image>"}, ok[1]]},
            "bad base64",
        ),
        ({"category": ["ocr"], "conversations": ok}, "bad category"),
        ({"voice": "alice; rm -rf /", "conversations": ok}, "bad voice"),
        ({"voice": "piper:/etc/passwd", "conversations": ok}, "bad voice"),
        ("[" * 200 + "]" * 200, "json too deep"),
        ('{"conversations": [' + '{"a":' * 100 + "1" + "}" * 100 + "]}", "json too deep"),
        ('{"conversations": [{"from": "human", "value": "x"}', "broken json line"),
        ("x" * 9000, "line too long"),
    ]
    at = _jsonl(tmp_path / "bad.jsonl", [c for c, _ in cases] + [{"id": "dup", "conversations": ok}] * 2)
    source = _source(tmp_path / "bad.jsonl", "sharegpt", unit_bytes=700)
    rejects, samples = _run(tmp_path, [source], limits={"max_text_bytes": 4096, "max_json_depth": 64})
    got = {k: r["reason"] for k, r in rejects.items()}
    assert got == {f"bad.jsonl@{at[i]}": reason for i, (_, reason) in enumerate(cases)}
    assert "is the source's format right?" in rejects[f"bad.jsonl@{at[1]}"]["detail"]
    # two records claiming one id are two samples (ids are ours; duplicates are dedup's job)
    dups = [samples[f"bad.jsonl@{at[-2]}"], samples[f"bad.jsonl@{at[-1]}"]]
    assert [d["meta"]["claimed_id"] for d in dups] == ["dup", "dup"] and dups[0]["id"] != dups[1]["id"]


def test_hostile_openai_records_are_each_a_counted_reject(tmp_path: Path) -> None:
    ok = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    bad_openai = [
        ({"conversations": ok}, "missing messages"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "bad turn"),
        (
            {"messages": [{"role": "user", "content": [{"type": "hologram"}]}, {"role": "assistant", "content": "y"}]},
            "bad turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": None}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "bad turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!"}}]},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "bad base64",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x", "audio": {"data": "AAAA"}},
                    {"role": "assistant", "content": "y"},
                ]
            },
            "bad turn",
        ),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "empty turn"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ]
    at = _jsonl(tmp_path / "bad.jsonl", [c for c, _ in bad_openai])
    rejects, samples = _run(tmp_path, [_source(tmp_path / "bad.jsonl", "openai")])
    assert samples == {}
    assert {k: r["reason"] for k, r in rejects.items()} == {
        f"bad.jsonl@{at[i]}": reason for i, (_, reason) in enumerate(bad_openai)
    }


def test_broken_and_compressed_json_arrays(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]}
    body = json.dumps(good, ensure_ascii=False).encode()
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf[" + body + b"," + body + b"]"))
    (tmp_path / "b.json").write_bytes(b"[" + body + b', {"conversations": [1,]}, 5, ' + body + b', {"x": 1')
    (tmp_path / "c.json").write_bytes(b"[" + body + b"] trailing")
    (tmp_path / "d.json").write_bytes(body + b"\n" + body + b"\n")  # a .json of JSON lines
    rng = random.Random(5)
    many = [{**good, "noise": "".join(rng.choice("abcdefgh") for _ in range(300))} for _ in range(40)]
    cut = gzip.compress(json.dumps(many, ensure_ascii=False).encode())
    (tmp_path / "e.json.gz").write_bytes(cut[: len(cut) // 2])  # the stream breaks halfway
    rejects, samples = _run(tmp_path, [_source(tmp_path / "*.json*", "sharegpt")])
    texts = {loc: s["segments"][1]["text"] for loc, s in samples.items()}
    assert set(texts.values()) == {"你好！"}
    from_e = sum(loc.startswith("e.json.gz") for loc in texts)
    assert 5 < from_e < 40  # the records before the break
    texts = {loc: t for loc, t in texts.items() if not loc.startswith("e.json.gz")}
    assert sorted(loc.split("@")[0] for loc in texts) == ["a.json.gz"] * 2 + ["b.json"] * 2 + [
        "c.json",
        "d.json",
        "d.json",
    ]
    reasons = sorted((loc.split("@")[0], r["reason"]) for loc, r in rejects.items())
    assert reasons == [
        ("b.json", "broken json array"),
        ("b.json", "broken json record"),
        ("b.json", "record is not an object"),
        ("c.json", "broken json array"),
        ("e.json.gz", "corrupt gzip"),
    ]


def test_array_items_match_json_loads_across_chunk_boundaries() -> None:
    rng = random.Random(16)
    items = [
        {"conversations": [{"from": "human", "value": 'quote " bracket ] brace } comma , backslash \\ 你好'}]},
        "a string with [ and {",
        [1, [2, [3, {"k": "v"}]]],
        12.5,
        None,
        {"value": '\\\\"' * 40},
    ]
    items += [{"n": i, "text": "".join(rng.choice('ab"\\[]{},') for _ in range(rng.randint(0, 30)))} for i in range(30)]
    raw = ("  [\n" + " ,\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n").encode()
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        got = list(array_items(io.BytesIO(raw), 1 << 20, chunk=chunk))
        assert [json.loads(b) for _, b in got] == items, chunk
        assert [raw[o : o + len(b)] for o, b in got] == [b for _, b in got]
    # an element over the limit is skipped without being held; the ones around it are read
    big = b'[{"a": 1}, {"big": "' + b"x" * 5000 + b'"}, {"b": 2}]'
    for chunk in (3, 100, 1 << 20):
        got = list(array_items(io.BytesIO(big), 1000, chunk=chunk))
        assert [b for _, b in got] == [b'{"a": 1}', None, b'{"b": 2}']
    assert list(array_items(io.BytesIO(b"  \n"), 10)) == []
    assert list(array_items(io.BytesIO(b"[]"), 10)) == []
    for broken in (b"{}", b"[1, 2", b'[{"a": "open', b"[1]]", b"[1} "):
        with pytest.raises(ArrayBroken):
            list(array_items(io.BytesIO(broken), 100, chunk=2))


def test_recipe_needs_a_format_for_conversations_only(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="needs format: sharegpt | llava | openai"):
        recipe_from_dict({"output": "o", "sources": [{"type": "conversations", "path": "x.jsonl"}]})
    with pytest.raises(RecipeError, match="only a conversations source has a format"):
        recipe_from_dict({"output": "o", "sources": [{"type": "jsonl", "path": "x.jsonl", "format": "openai"}]})
    with pytest.raises(RecipeError, match="unknown|not one of|expected"):
        recipe_from_dict({"output": "o", "sources": [{"type": "conversations", "path": "x", "format": "alpaca"}]})
