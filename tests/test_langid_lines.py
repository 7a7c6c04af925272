"""The array paths of ``langid`` give exactly what the per-text Python paths they replace gave."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from filters.langid import _maybe_cjk, fasttext_lines, load_model, predict_lines, script_languages

TEXTS = [
    "A plain English sentence about the weather.",
    "Zeile eins\nZeile zwei\r\nZeile drei\r",
    "今天天气很好\n明天也是",
    "東京で会いましょう",
    "서울에서 만나요",
    "我哋去咗街市",
    "em — dash, “quotes” and ’apostrophes’",
    "ᄀᄁ jamo, ｶﾀｶﾅ halfwidth, 𠀀 extension B, 々 mark",
    "Кириллица и 漢字",
    "",
    "\n",
]


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_lines_predict_as_the_python_replace_did(model, type_: pa.DataType) -> None:
    texts = pa.array(["skipped"] + TEXTS, type_).slice(1)  # a sliced array: offsets do not start at 0
    lines = fasttext_lines(texts)
    assert lines == [(t.replace("\n", " ").replace("\r", " ") + "\n").encode() for t in TEXTS]
    ours = predict_lines(model, lines, 3)
    bare = model.predict([t.replace("\n", " ").replace("\r", " ") for t in TEXTS], k=3)
    assert ours[0] == bare[0]
    assert all(np.array_equal(a, b) for a, b in zip(ours[1], bare[1], strict=True))


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_cjk_prefilter_keeps_every_text_with_a_cjk_character(type_: pa.DataType) -> None:
    texts = pa.array(["skipped"] + TEXTS + [None], type_).slice(1)
    cjk = pc.count_substring_regex(texts, r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]").to_numpy(False) > 0
    maybe = _maybe_cjk(texts)
    assert not (cjk & ~maybe).any()
    assert maybe.tolist() == [any(ord(c) >= 0x1000 for c in t) if t is not None else False for t in TEXTS + [None]]
    fixed, share, has_letter = script_languages(texts)
    assert fixed[:6] == [None, None, "zh", "ja", "ko", "yue"]
    assert script_languages(pa.array(TEXTS + [None]))[0] == fixed
