"""Builders for the paper's data types, and the two end-to-end paths the issue asks for:
a real image-text document → speech-text interleaved, and a narrated video → video-audio-text."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.demo_data import NARRATION, PHOTOS, asterisk_prompts, photo_bytes, piper_speech, slideshow
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.interleave import spoken_indices
from synth.media import decode_audio
from synth.openclip_models import save_tiny_model
from synth.text import split_sentences, word_error_rate

# A real image-text document: scikit-image photographs with prose about them (8 sentences).
DOCUMENT = [
    Segment("text", text="Two photographs from the scikit-image collection. " + PHOTOS["astronaut"]),
    Segment("image", bytes=photo_bytes("astronaut", size=(128, 128))),
    Segment("text", text="She flew on the space shuttle. The photograph was taken before her flight."),
    Segment("image", bytes=photo_bytes("coffee", size=(128, 128))),
    Segment("text", text=PHOTOS["coffee"] + " The cup is white. The saucer has a spoon. Nobody has drunk it yet."),
]


def _run(ops: list, table: pa.Table) -> pa.Table:
    for op in ops:
        op.setup()
        table, _ = split_rejected(op(table))
    return table


def _doc_sentences() -> list[str]:
    return [s for seg in DOCUMENT if seg.modality == "text" for s in split_sentences(seg.text)]


def test_spoken_indices_fraction_and_placement() -> None:
    assert spoken_indices(8, 0.25, "prefix", "k") == {0, 1}
    assert spoken_indices(2, 0.25, "prefix", "k") == {0}  # at least one spoken ...
    assert spoken_indices(3, 0.9, "prefix", "k") == {0, 1}  # ... and at least one left as text
    randomly = spoken_indices(40, 0.25, "random", "doc-1")
    assert len(randomly) == 10 and randomly == spoken_indices(40, 0.25, "random", "doc-1") != set(range(10))


def test_document_becomes_speech_text_interleaved() -> None:
    doc = make_sample("docs", "interleaved_image_text", DOCUMENT, "doc")
    ops = [
        get_operator("build_speech_text_interleaved")(fraction=0.25),
        get_operator("tts")(voices=["piper:joe"]),
        get_operator("tts_backcheck")(max_wer=0.2),
    ]
    out = _run(ops, samples_table([doc]))
    assert len(out) == 1 and out["kind"].to_pylist() == ["speech_text_interleaved"]
    sentences = _doc_sentences()
    segs = out["segments"].to_pylist()[0]
    metas = [loads_meta(s["meta"]) for s in segs]
    # order: the spoken prefix quarter first, then the rest as text, nothing reordered or lost
    assert [s["modality"] for s in segs] == ["audio", "text"]
    spoken = sum(m["sentences"] for m, s in zip(metas, segs, strict=True) if s["modality"] == "audio")
    assert spoken == 2 and sum(m["sentences"] for m in metas) == len(sentences) == 8
    said = [m["tts"]["text"] if s["modality"] == "audio" else s["text"] for m, s in zip(metas, segs, strict=True)]
    assert " ".join(said) == " ".join(sentences)
    sample_meta = loads_meta(out["meta"].to_pylist()[0])
    assert sample_meta["spoken_sentences"] / sample_meta["sentences"] == 0.25
    for seg, meta in zip(segs, metas, strict=True):
        if seg["modality"] == "audio":
            audio = decode_audio(seg["bytes"])
            assert abs(len(audio) / 16000 - meta["duration"]) < 0.05 and meta["duration"] > 1.0
            assert meta["tts"]["backcheck"]["wer"] <= 0.2


def test_keep_images_and_random_placement_keep_reading_order() -> None:
    doc = make_sample("docs", "interleaved_image_text", DOCUMENT, "doc")
    build = get_operator("build_speech_text_interleaved")(fraction=0.25, placement="random", keep_images=True)
    out = build(samples_table([doc]))
    segs = out["segments"].to_pylist()[0]
    assert out["kind"].to_pylist() == ["image_audio_text"]
    assert [s["bytes"] for s in segs if s["modality"] == "image"] == [
        s.bytes for s in DOCUMENT if s.modality == "image"
    ]
    assert " ".join(s["text"] for s in segs if s["modality"] == "text") == " ".join(_doc_sentences())
    spoken = [loads_meta(s["meta"])["sentences"] for s in segs if loads_meta(s["meta"]).get("speak")]
    assert sum(spoken) == 2
    # images stay between the sentences they stood between
    first_image = next(i for i, s in enumerate(segs) if s["modality"] == "image")
    assert " ".join(s["text"] for s in segs[:first_image]) == " ".join(split_sentences(DOCUMENT[0].text))


def test_builders_select_pass_through_and_reject() -> None:
    photo = photo_bytes("coffee", size=(64, 64))
    image_caption = make_sample(
        "p", "image_caption", [Segment("image", bytes=photo), Segment("text", text="A cup.")], "a"
    )
    bare_image = make_sample("p", "image", [Segment("image", bytes=photo)], "b")
    captioned = make_sample("p", "image", [Segment("image", bytes=photo, meta={"caption": "a white cup"})], "c")
    text = make_sample("t", "text", [Segment("text", text="One sentence only.")], "d")
    out = get_operator("build_image_caption")()(samples_table([image_caption, bare_image, captioned, text]))
    rows = {loads_meta(r["meta"])["locator"]: r for r in out.to_pylist()}
    assert rows["a"]["segments"][1]["text"] == "A cup." and rows["a"]["kind"] == "image_caption"
    assert rows["c"]["segments"][1]["text"] == "a white cup" and loads_meta(rows["c"]["meta"])["built_by"]
    assert rows["b"]["reason"] == "no caption"
    assert rows["d"]["reason"] is None and rows["d"]["segments"] == out.to_pylist()[3]["segments"]  # untouched
    # a one-sentence text cannot be interleaved: it passes through as text, not into the ledger
    passed = get_operator("build_speech_text_interleaved")()(samples_table([text]))
    assert passed["reason"].to_pylist() == [None] and passed["kind"].to_pylist() == ["text"]
    # share picks a stable subset; a built sample is left alone by later builders
    many = samples_table(
        [
            make_sample(
                "p",
                "image_caption",
                [Segment("image", bytes=photo), Segment("text", text=f"Cup {i}. It is white.")],
                f"x{i}",
            )
            for i in range(40)
        ]
    )  # noqa: E501
    half = get_operator("build_image_audio_text")(share=0.5)(many)
    picked = half["kind"].to_pylist().count("image_audio_text")
    assert (
        10 <= picked <= 30
        and half["kind"].to_pylist() == get_operator("build_image_audio_text")(share=0.5)(many)["kind"].to_pylist()
    )  # noqa: E501
    rest = get_operator("build_image_caption")()(half.drop_columns(["reason", "detail"]))
    assert rest["kind"].to_pylist() == half["kind"].to_pylist()
    assert sum(loads_meta(m)["built_by"] == "build_image_caption" for m in rest["meta"].to_pylist()) == 40 - picked


def test_image_audio_text_question_and_prefix_modes() -> None:
    photo = photo_bytes("chelsea", size=(64, 64))
    caption = "A ginger cat looks to the side. Its eyes are green. It sits on a rug. The rug is red."
    sample = make_sample("p", "image_caption", [Segment("image", bytes=photo), Segment("text", text=caption)], "cat")
    q = get_operator("build_image_audio_text")()(samples_table([sample]))["segments"].to_pylist()[0]
    assert [s["modality"] for s in q] == ["image", "text", "text"]
    assert loads_meta(q[1]["meta"])["speak"] and q[1]["text"].endswith("?") and q[2]["text"] == caption
    p = get_operator("build_image_audio_text")(mode="prefix")(samples_table([sample]))["segments"].to_pylist()[0]
    assert [s["modality"] for s in p] == ["image", "text", "text"] and loads_meta(p[1]["meta"]) == {
        "sentences": 1,
        "speak": True,
    }
    assert p[1]["text"] == "A ginger cat looks to the side."


@pytest.mark.slow
def test_asr_pairs_from_human_speech() -> None:
    (wav, ref), (wav2, ref2) = asterisk_prompts(limit=2)
    table = samples_table(
        [
            make_sample("m", "asr", [Segment("audio", bytes=wav.read_bytes()), Segment("text", text=ref)], "with-ref"),
            make_sample("m", "audio", [Segment("audio", bytes=wav2.read_bytes())], "no-ref"),
        ]
    )
    out = _run([get_operator("transcribe")(), get_operator("build_asr")(max_ref_wer=0.3)], table)
    rows = {loads_meta(r["meta"])["locator"]: r for r in out.to_pylist()}
    assert rows["with-ref"]["segments"][1]["text"] == ref and loads_meta(rows["with-ref"]["meta"])["asr_ref_wer"] <= 0.3
    assert rows["no-ref"]["kind"] == "asr" and word_error_rate(ref2, rows["no-ref"]["segments"][1]["text"]) <= 0.2
    assert loads_meta(rows["no-ref"]["segments"][1]["meta"]) == {"transcript_from": "asr"}


@pytest.mark.slow
def test_narrated_video_becomes_video_audio_text(tmp_path: Path) -> None:
    names = ("astronaut", "coffee", "chelsea")
    for name in names:
        (tmp_path / f"{name}.jpg").write_bytes(photo_bytes(name))
    narration = piper_speech(NARRATION, tmp_path / "narration.wav")
    video = slideshow([tmp_path / f"{n}.jpg" for n in names], narration, tmp_path / "tour.mp4", 2.5).read_bytes()
    coca = save_tiny_model(tmp_path / "coca", coca=True)
    table = samples_table([make_sample("v", "video", [Segment("video", bytes=video)], "tour")])
    ops = [
        get_operator("probe")(),
        get_operator("keyframes")(),
        get_operator("transcribe")(),
        get_operator("caption")(config=coca[0], checkpoint=coca[1], generation_type="top_k", seq_len=10),
        get_operator("build_video_audio_text")(),
    ]
    out = _run(ops, table)
    assert out["kind"].to_pylist() == ["video_audio_text"]
    segs = out["segments"].to_pylist()[0]
    metas = [loads_meta(s["meta"]) for s in segs]
    frames = [m for m in metas if m.get("role") == "keyframe"]
    duration = float(metas[len(frames)]["duration"])
    assert [s["modality"] for s in segs] == ["image"] * len(frames) + ["audio", "text", "text"]
    assert len(frames) == int(duration) + (duration % 1 > 0.5) or abs(len(frames) - duration) <= 1  # 1 fps
    assert [f["t"] for f in frames] == sorted(f["t"] for f in frames) and all(f["caption"] for f in frames)
    audio = decode_audio(segs[len(frames)]["bytes"])  # the video's own sound, stream-copied
    assert abs(len(audio) / 16000 - duration) < 0.3
    transcript, caption = segs[-2], segs[-1]
    assert metas[-2]["role"] == "transcript" and word_error_rate(NARRATION, transcript["text"]) <= 0.2
    assert all(0 <= s["start"] < s["end"] <= duration + 0.05 for s in metas[-2]["segments"])
    assert metas[-1] == {"role": "caption", "caption_from": "model"} and caption["text"]
