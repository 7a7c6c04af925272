"""``text_quality`` (Gopher/C4 rules), ``media_quality`` and the ``keep`` presets on real content."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from filters.dedup.planted import real_documents
from filters.integrity import Validate
from filters.text_quality import RULES
from pipelines.demo_data import asterisk_prompts, photo_bytes
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, make_sample, samples_table

PROSE = " ".join(real_documents()[:3])  # real English paragraphs, several hundred words


def texts_table(texts: dict[str, str], kind: str = "text") -> pa.Table:
    return samples_table(make_sample("t", kind, [Segment("text", text=t)], locator=k) for k, t in texts.items())


def reasons(out: pa.Table) -> dict[str, str | None]:
    import json

    return {
        json.loads(m)["locator"]: r for m, r in zip(out["meta"].to_pylist(), out["reason"].to_pylist(), strict=True)
    }


def test_gopher_preset_keeps_prose_and_drops_junk() -> None:
    cases = {
        "prose": PROSE,
        "short": "Buy now. Best prices.",
        "repeated_lines": "\n".join(["Click here to subscribe to our newsletter today!"] * 30),
        "bullets": "\n".join(f"- item number {i} of the list and some more words here" for i in range(40)),
        "symbols": " ".join(["#tag"] * 80),
        "no_stop_words": " ".join(["lorem", "ipsum", "dolor", "sit", "amet", "consectetur"] * 15),
    }
    scored = get_operator("text_quality")()(texts_table(cases))
    got = reasons(get_operator("keep")(preset="gopher")(scored))
    assert got["prose"] is None
    assert got["short"] == "gopher: word count"
    assert got["repeated_lines"] in ("gopher: repeated paragraphs", "gopher: repeated lines")
    assert got["bullets"] == "gopher: bullet lines"
    assert got["symbols"] == "gopher: symbol ratio"
    assert got["no_stop_words"] in ("gopher: stop words", "gopher: repeated n-grams")


def test_rules_are_switchable_and_kinds_limit_scoring() -> None:
    op = get_operator("text_quality")(rules=["gopher_length", "c4"])
    out = op(texts_table({"a": PROSE, "b": "Lorem ipsum dolor sit amet. {x} Two. Three."}))
    q = [c for c in out.column_names if c.startswith("q_")]
    assert set(q) == set(RULES["gopher_length"]("x")) | set(RULES["c4"]("x"))
    got = reasons(get_operator("keep")(preset="c4")(out))
    assert got == {"a": None, "b": "c4: lorem ipsum"}
    captions = op(texts_table({"cap": "A cat."}, kind="image_caption"))
    assert captions["q_words"].to_pylist() == [None]  # not a scored kind: null, and keep keeps it
    unscored = texts_table({"cap": "A cat."}, kind="image_caption")
    assert reasons(get_operator("keep")(preset="gopher")(get_operator("text_quality")()(unscored))) == {"cap": None}
    with pytest.raises(ValueError, match="unknown text_quality rule"):
        get_operator("text_quality")(rules=["gopher_lenght"])


def test_repetition_metrics() -> None:
    out = get_operator("text_quality")(rules=["gopher_repetition"])(
        texts_table({"prose": PROSE, "loop": "the same sentence again. " * 50})
    ).to_pylist()
    prose, loop = out
    assert prose["q_dup_line_frac"] == 0 and prose["q_top_2gram_frac"] < 0.2
    assert loop["q_top_2gram_frac"] > 0.2 and loop["q_dup_5gram_frac"] > 0.5


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d: Path = tmp_path_factory.mktemp("media_quality")
    wav, _ = asterisk_prompts(limit=1)[0]
    silent = d / "silence.wav"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "3", str(silent)], check=True
    )
    low = d / "low.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-ar", "4000", str(low)], check=True)
    return {
        "photo": photo_bytes("astronaut"),
        "thumb": photo_bytes("astronaut", size=(32, 32)),
        "strip": photo_bytes("coffee", size=(1000, 100)),
        "speech": wav.read_bytes(),
        "silence": silent.read_bytes(),
        "low_rate": low.read_bytes(),
    }


def test_media_rules_on_real_media(media: dict[str, bytes]) -> None:
    cases = {
        "photo": Segment("image", bytes=media["photo"]),
        "thumb": Segment("image", bytes=media["thumb"]),
        "strip": Segment("image", bytes=media["strip"]),
        "speech": Segment("audio", bytes=media["speech"]),
        "silence": Segment("audio", bytes=media["silence"]),
        "low_rate": Segment("audio", bytes=media["low_rate"]),
    }
    batch = samples_table(make_sample("t", s.modality, [s], locator=k) for k, s in cases.items())
    batch = Validate(threads=1)(batch).drop_columns(["reason", "detail"])  # sizes and rates into segment meta
    scored = get_operator("media_quality")()(batch)
    rows = {r["id"]: r for r in scored.to_pylist()}
    by_name = {k: rows[i] for k, i in zip(cases, scored["id"].to_pylist(), strict=True)}
    assert by_name["photo"]["image_min_side"] == 512 and by_name["photo"]["image_aspect"] == 1.0
    assert by_name["strip"]["image_aspect"] == pytest.approx(10.0)
    assert by_name["speech"]["audio_sample_rate"] == 8000 and by_name["speech"]["audio_silence"] < 0.6
    assert by_name["silence"]["audio_silence"] == 1.0 and by_name["silence"]["audio_duration"] == pytest.approx(3.0)
    assert by_name["low_rate"]["audio_sample_rate"] == 4000
    kept, rejected = split_rejected(get_operator("keep")(preset="media")(scored))
    got = reasons(rejected)
    assert got == {
        "thumb": "image too small",
        "strip": "extreme aspect ratio",
        "silence": "mostly silent audio",
        "low_rate": "audio sample rate too low",
    }
    assert len(kept) == 2


def test_media_rules_without_validate_metadata(media: dict[str, bytes]) -> None:
    batch = samples_table(
        [make_sample("t", "image_caption", [Segment("image", bytes=media["thumb"]), Segment("text", text="x")], "a")]
    )
    out = get_operator("media_quality")(silence=False)(batch).to_pylist()[0]
    assert out["image_min_side"] == 32 and out["audio_duration"] is None
