"""Sentence splitting and WER: the measures the speech builders and the ASR back-check rely on."""

from __future__ import annotations

import pytest

from synth.text import normalize_words, number_words, split_sentences, word_error_rate


def test_split_sentences_keeps_abbreviations_decimals_and_cjk() -> None:
    text = "Dr. Smith paid $3.50 for tea. Was it good?  Yes!  J. R. R. Tolkien wrote it (mostly.) Then he left"
    assert split_sentences(text) == [
        "Dr. Smith paid $3.50 for tea.",
        "Was it good?",
        "Yes!",
        "J. R. R. Tolkien wrote it (mostly.)",
        "Then he left",
    ]
    assert split_sentences("敏捷的狐狸。懒狗睡觉！好吗？") == ["敏捷的狐狸。", "懒狗睡觉！", "好吗？"]
    assert split_sentences('He said "stop." She stopped.') == ['He said "stop."', "She stopped."]
    assert split_sentences("   ") == []


def test_numbers_are_spelled_as_spoken() -> None:
    assert number_words(0) == "zero"
    assert number_words(42) == "forty two"
    assert number_words(1234) == "one thousand two hundred thirty four"
    assert number_words(2_000_005) == "two million five"
    assert normalize_words("Press 1, then dial 28.8!") == "press one then dial twenty eight point eight".split()
    assert normalize_words("Call-Forward on No Answer") == "call forward on no answer".split()


@pytest.mark.parametrize(
    ("ref", "hyp", "wer"),
    [
        ("Please press one.", "please press 1", 0.0),
        ("the cat sat down", "the cat sat", 0.25),  # one deletion
        ("the cat sat down", "the bat sat down now", 0.5),  # one substitution + one insertion
        ("", "", 0.0),
        ("", "noise", 1.0),
        ("Every sample ends in a shard.", "Every sample ends in a chart.", 1 / 6),
    ],
)
def test_word_error_rate(ref: str, hyp: str, wer: float) -> None:
    assert word_error_rate(ref, hyp) == pytest.approx(wer)
