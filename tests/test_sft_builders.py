"""The SFT builders (synth/sft.py, issue 16): spoken questions in many voices, spoken answers, voice
control through the system prompt (the tts step speaks the target in THAT voice), AQA and S2TT from ASR
pairs, the TTS back-check on the new kinds, and conf/recipes/sft-example.yaml end to end. Real data:
Asterisk's recorded prompts, piper and espeak-ng through the real ``tts`` step, whisper listening back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from pipelines.audit import audit
from pipelines.conversations import VOICE_IN_PROMPT
from pipelines.demo_data import asterisk_prompts
from pipelines.executor import run_recipe
from pipelines.operator import get_operator, split_rejected
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from pipelines.sources import plan, read_unit
from shards.reader import iter_samples
from shards.schema import loads_meta, samples_table

REPO = Path(__file__).resolve().parents[1]
VOICES = ["piper:joe", "espeak:en-us", "espeak:en-gb+f3"]
PASSWORD = "Please enter your password followed by the pound key."
PASSWORD_ZH = "请输入您的密码，然后按井号键。"


@pytest.fixture(scope="module")
def tts() -> Any:
    op = get_operator("tts")(voices=["piper:joe"], fallback="espeak:en-us")
    op.setup()
    return op


@pytest.fixture(scope="module")
def backcheck() -> Any:
    op = get_operator("tts_backcheck")(max_wer=None)  # score only: the assertions read the scores
    op.setup()
    return op


def _read(tmp_path: Path, records: list[dict[str, Any]], source: dict[str, Any]) -> pa.Table:
    """Records → sample rows through the real source reader (no rejects expected)."""
    path = tmp_path / f"{source['name']}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    recipe = recipe_from_dict({"output": str(tmp_path / "x"), "sources": [{**source, "path": str(path)}]})
    recs = [rec for unit in plan(recipe) for rec in read_unit(unit, recipe)]
    assert all(r.sample is not None for r in recs), [r.reject for r in recs if r.reject]
    return samples_table([r.sample for r in recs])


def _chat(tmp_path: Path, records: list[dict[str, Any]], fmt: str = "sharegpt") -> pa.Table:
    return _read(tmp_path, records, {"name": "chat", "type": "conversations", "format": fmt})


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for row in rows:
        row["meta"] = loads_meta(row["meta"])
        for seg in row["segments"]:
            seg["meta"] = loads_meta(seg["meta"])
    return rows


def _layout(row: dict[str, Any]) -> list[tuple[str, int, str, bool]]:
    return [
        (s["meta"]["role"], s["meta"]["turn"], s["modality"], bool(s["meta"].get("speak"))) for s in row["segments"]
    ]


def _qa(q: str, a: str, **extra: Any) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}


QUESTIONS = [
    _qa("What is the capital of France?", "The capital of France is Paris."),
    _qa("How many days are there in a week?", "There are seven days in a week."),
    _qa("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    _qa("Which animal says moo?", "A cow says moo."),
    _qa("What do bees make?", "Bees make honey."),
    _qa("Where does the sun rise?", "The sun rises in the east."),
]


def test_spoken_questions_in_many_voices_then_spoken_by_tts(tmp_path: Path, tts: Any, backcheck: Any) -> None:
    table = _chat(tmp_path, QUESTIONS)
    built = get_operator("build_spoken_questions")(voices=VOICES)(table)
    rows = _rows(built)
    assert all(r["reason"] is None for r in rows)
    voices = [r["meta"]["question_voice"] for r in rows]
    assert set(voices) <= set(VOICES) and len(set(voices)) >= 2, voices  # many voices, one per sample
    again = [r["meta"]["question_voice"] for r in _rows(get_operator("build_spoken_questions")(voices=VOICES)(table))]
    assert again == voices  # drawn by a stable hash: the same every run
    for row in rows:
        assert row["kind"] == "sft_audio" and row["meta"]["built_by"] == "build_spoken_questions"
        assert _layout(row) == [("user", 0, "text", True), ("assistant", 1, "text", False)]
        assert row["segments"][0]["meta"]["voice"] == row["meta"]["question_voice"]
    spoken, rejected = split_rejected(tts(built.drop_columns(["reason", "detail"])))
    assert rejected is None
    checked, rejected = split_rejected(backcheck(spoken))
    assert rejected is None
    for row, question in zip(_rows(checked), QUESTIONS, strict=True):
        audio, answer = row["segments"]
        assert (audio["modality"], audio["meta"]["role"], audio["meta"]["turn"]) == ("audio", "user", 0)
        assert "speak" not in audio["meta"] and "voice" not in audio["meta"]
        assert audio["meta"]["tts"]["voice"] == row["meta"]["question_voice"]  # the builder's voice spoke it
        assert audio["meta"]["tts"]["text"] == question["conversations"][0]["value"]
        assert 0 <= audio["meta"]["tts"]["backcheck"]["wer"] <= 1 and row["tts_wer"] is not None
        assert answer["text"] == question["conversations"][1]["value"] and answer["meta"]["role"] == "assistant"
    # whisper understands some clips nearly word for word; short espeak-ng questions it often mishears,
    # which is what the back-check is for (a recipe's max_wer rejects those samples)
    wers = checked["tts_wer"].to_pylist()
    assert sum(w <= 0.25 for w in wers) >= 2, wers


def test_spoken_answers_are_audio_generation_and_media_stays(tmp_path: Path, tts: Any) -> None:
    (tmp_path / "cat.jpg").write_bytes((REPO / "conf/recipes/sft-example/images/chelsea.jpg").read_bytes())
    records = [
        _qa("<image>\nWhat animal is this?", "It is a ginger cat.", image="cat.jpg"),
        {
            "conversations": [
                {"from": "human", "value": "Name a fruit."},
                {"from": "gpt", "value": "An apple."},
                {"from": "human", "value": "Another one?"},
                {"from": "gpt", "value": "A banana."},
            ]
        },
        _qa("你好吗？", "我很好，谢谢。" * 200),  # an answer too long to speak: left as it is
    ]
    table = _chat(tmp_path, records)
    built = get_operator("build_spoken_questions")(voices=["espeak:en-us"], spoken_answers=True)(table)
    image, fruit, long = _rows(built)
    assert image["kind"] == "sft_audio_generation" and image["meta"]["spoken"] == "questions_and_answers"
    assert _layout(image) == [
        ("user", 0, "image", False),
        ("user", 0, "text", True),
        ("assistant", 1, "text", False),
        ("assistant", 1, "text", True),
    ]
    assert _layout(fruit) == [
        ("user", 0, "text", True),
        ("assistant", 1, "text", False),
        ("assistant", 1, "text", True),
        ("user", 2, "text", True),
        ("assistant", 3, "text", False),
        ("assistant", 3, "text", True),
    ]
    assert long["kind"] == "sft_text" and "built_by" not in long["meta"] and long["reason"] is None
    spoken, rejected = split_rejected(tts(built.drop_columns(["reason", "detail"])))
    assert rejected is None
    fruit = _rows(spoken)[1]
    said = [(s["meta"]["role"], s["meta"]["tts"]["text"]) for s in fruit["segments"] if s["modality"] == "audio"]
    assert said == [
        ("user", "Name a fruit."),
        ("assistant", "An apple."),
        ("user", "Another one?"),
        ("assistant", "A banana."),
    ]


def test_voice_control_speaks_the_target_in_the_system_prompts_voice(tmp_path: Path, tts: Any, backcheck: Any) -> None:
    """A voice named in the system prompt (or assigned and written into it) is the voice of every spoken
    answer: the tts step's own list (piper:joe) and its fallback are not used for it."""
    sharegpt = _chat(
        tmp_path,
        [
            _qa(
                "What is the capital of Italy?",
                "The capital of Italy is Rome.",
                system="Be brief. voice: espeak:en-gb+f3",
            ),
            _qa("What do cows drink?", "Cows drink water."),  # no voice named: one is assigned
            _qa("What is two plus two?", "Two plus two is four."),
            _qa("Say hello.", "Hello, nice to meet you.", voice="piper:joe"),  # the record's field names it
        ],
    )
    openai = _chat(
        tmp_path,
        [
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant.\nvoice: espeak:en-us+m3"},
                    {"role": "user", "content": "Say good morning."},
                    {"role": "assistant", "content": "Good morning to you."},
                ]
            }
        ],
        fmt="openai",
    )
    table = pa.concat_tables([sharegpt, openai])
    plain = _rows(get_operator("build_voice_control")()(table))
    assert [r["kind"] for r in plain] == ["sft_audio_generation", "sft_text", "sft_text"] + ["sft_audio_generation"] * 2
    assert plain[3]["segments"][0]["text"] == "Answer in speech. voice: piper:joe"  # written into a new prompt
    built = get_operator("build_voice_control")(voices=["espeak:en-us+f2"])(table)
    rows = _rows(built)
    named, assigned = rows[0], rows[1]
    assert named["meta"]["voice"] == "espeak:en-gb+f3" and assigned["meta"]["voice"] == "espeak:en-us+f2"
    assert _layout(assigned) == [
        ("system", 0, "text", False),
        ("user", 1, "text", False),
        ("assistant", 2, "text", False),
        ("assistant", 2, "text", True),
    ]
    assert (
        assigned["segments"][0]["text"] == "Answer in speech. voice: espeak:en-us+f2" and assigned["meta"]["turns"] == 3
    )
    spoken, rejected = split_rejected(tts(built.drop_columns(["reason", "detail"])))
    assert rejected is None
    checked, rejected = split_rejected(backcheck(spoken))
    assert rejected is None
    for row in _rows(checked):
        assert row["kind"] == "sft_audio_generation"
        prompt = next(s["text"] for s in row["segments"] if s["meta"]["role"] == "system")
        voice = VOICE_IN_PROMPT.search(prompt)[1]
        answers = [s for s in row["segments"] if s["modality"] == "audio"]
        assert answers and all(s["meta"]["role"] == "assistant" for s in answers)
        for audio in answers:
            assert audio["meta"]["tts"]["voice"] == voice == row["meta"]["voice"]
            words = [s["text"] for s in row["segments"] if s["modality"] == "text" and s["meta"]["role"] == "assistant"]
            assert audio["meta"]["tts"]["text"] == words[0] and "backcheck" in audio["meta"]["tts"]
        assert row["tts_wer"] is not None
    # a voice that cannot speak is a reject, never the fallback voice in its place
    broken = _chat(tmp_path, [_qa("Hello?", "Hello there.", system="voice: piper:no-such-voice")])
    built = get_operator("build_voice_control")()(broken).drop_columns(["reason", "detail"])
    kept, rejected = split_rejected(tts(built))
    assert kept.num_rows == 0 and rejected is not None and rejected["reason"].to_pylist() == ["tts failed"]
    assert "piper:no-such-voice" in rejected["detail"][0].as_py()


@pytest.fixture(scope="module")
def asr_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Asterisk's recorded prompts with their published transcripts; one with a Chinese translation."""
    d = tmp_path_factory.mktemp("asr")
    records = []
    for wav, text in asterisk_prompts(limit=4):
        shutil.copy(wav, d / wav.name)
        record: dict[str, Any] = {"audio": wav.name, "text": text, "lang": "en"}
        if text == PASSWORD:
            record["translation"] = {"zh": PASSWORD_ZH}
        records.append(record)
    assert sum("translation" in r for r in records) == 1
    return d, records


def test_s2tt_needs_a_translation_and_aqa_answers_with_the_transcript(asr_pairs: tuple[Path, list]) -> None:
    d, records = asr_pairs
    table = _read(d, records, {"name": "speech", "type": "jsonl"})
    assert set(table["kind"].to_pylist()) == {"asr"}
    # no translation in the language asked for: every sample is left as it is (none is made up)
    same = _rows(get_operator("build_s2tt")(target="de")(table))
    assert [r["kind"] for r in same] == ["asr"] * 4 and all("built_by" not in r["meta"] for r in same)
    s2tt = get_operator("build_s2tt")()(table)
    rows = _rows(s2tt)
    built = [r for r in rows if r["meta"].get("built_by") == "build_s2tt"]
    assert len(built) == 1 and all(r["reason"] is None for r in rows)
    (pair,) = built
    assert pair["kind"] == "sft_audio" and pair["meta"]["sft_task"] == "s2tt" and pair["meta"]["target_lang"] == "zh"
    assert _layout(pair) == [("user", 0, "audio", False), ("user", 0, "text", False), ("assistant", 1, "text", False)]
    assert "Chinese" in pair["segments"][1]["text"] and pair["segments"][2]["text"] == PASSWORD_ZH
    assert pair["meta"]["transcript"] == PASSWORD
    rest = [r for r in rows if r is not pair]
    assert all(r["kind"] == "asr" and "built_by" not in r["meta"] for r in rest)  # NotApplicable: unchanged
    aqa = _rows(get_operator("build_aqa")()(s2tt.drop_columns(["reason", "detail"])))
    assert [r["meta"]["built_by"] for r in aqa].count("build_aqa") == 3  # the S2TT pair is not re-built
    for row, record in zip(aqa, records, strict=True):
        if row["meta"]["built_by"] != "build_aqa":
            continue
        audio, question, answer = row["segments"]
        assert row["kind"] == "sft_audio" and row["meta"]["sft_task"] == "aqa"
        assert audio["modality"] == "audio" and audio["bytes"] == (d / record["audio"]).read_bytes()
        assert question["text"] in get_operator("build_aqa")().questions
        assert answer["text"] == record["text"] and answer["meta"] == {
            "role": "assistant",
            "turn": 1,
            "answer_from": "transcript",
        }
    # build_asr's pairs are ASR samples too; other builders' output is left alone
    after_asr = table.set_column(
        table.schema.get_field_index("meta"),
        "meta",
        pa.array(
            [
                json.dumps({**loads_meta(m), "built_by": b})
                for m, b in zip(
                    table["meta"].to_pylist(), ["build_asr", "build_tts", "build_asr", "build_asr"], strict=True
                )
            ]
        ),
    )
    rebuilt = _rows(get_operator("build_aqa")()(after_asr))
    assert [r["meta"]["built_by"] for r in rebuilt] == ["build_aqa", "build_tts", "build_aqa", "build_aqa"]


def test_the_sft_example_recipe_end_to_end(tmp_path: Path) -> None:
    """conf/recipes/sft-example.yaml on the local executor: every input is in a shard or the ledger, the
    audit balances, and every SFT kind the recipe's data allows comes out with token counts."""
    from pipelines.stats import collect, token_sums

    path = REPO / "conf" / "recipes" / "sft-example.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["output"] = str(tmp_path / "run")
    for source in doc["sources"]:
        source["path"] = str(path.parent / source["path"])
    for step in doc["pipeline"]:
        if step["op"] == "count_tokens":
            step["params"]["tokenizer"] = str(REPO / step["params"]["tokenizer"])
    manifest = run_recipe(recipe_from_dict(doc), executor="local", progress=False)
    report = audit(str(tmp_path / "run"))
    assert report.balanced, report.summary()
    data = path.parent / "sft-example"
    inputs = sum(
        1 for f in ("sharegpt.jsonl", "openai.jsonl", "speech.jsonl") for _ in open(data / f, encoding="utf-8")
    )
    inputs += len(json.loads((data / "llava.json").read_text(encoding="utf-8")))
    ledger = RunDir(str(tmp_path / "run")).read_ledger().to_pylist()
    samples = [s for t in sorted((tmp_path / "run" / "shards").glob("*.tar")) for s in iter_samples(str(t))]
    metas = [s["meta"] if isinstance(s["meta"], dict) else json.loads(s["meta"]) for s in samples]
    locators = [m["locator"] for m in metas] + [r["locator"] for r in ledger]
    assert len(locators) == len(set(locators)) == inputs == manifest["ingested"]
    assert all(r["reason"] == "tts back-check failed" for r in ledger), ledger
    kinds = {s["kind"] for s in samples}
    assert {"sft_text", "sft_image", "sft_audio", "sft_audio_generation"} <= kinds, kinds
    for s, m in zip(samples, metas, strict=True):
        segs = [(seg["modality"], loads_meta(seg["meta"])) for seg in s["segments"]]
        assert all(sm["role"] in ("system", "user", "assistant") and isinstance(sm["turn"], int) for _, sm in segs)
        for modality, sm in segs:
            if modality == "audio" and sm["role"] == "assistant":  # voice control: the prompt's voice spoke
                assert sm["tts"]["voice"] == m["voice"] and "backcheck" in sm["tts"]
        if s["kind"] == "sft_audio" and m.get("sft_task") == "s2tt":
            assert segs[-1][1]["answer_from"] == "translation.zh"
    by_kind = token_sums(collect([str(tmp_path / "run")]), "kind")
    assert set(by_kind) == kinds and min(by_kind.values()) > 0
    counts = {k: sum(s["kind"] == k for s in samples) for k in sorted(kinds)}
    print("sft-example kinds (samples, tokens):", {k: (counts[k], by_kind[k]) for k in sorted(kinds)})
