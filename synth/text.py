"""Sentences and word error rate: what the speech builders and the ASR back-check measure with.

The sentence splitter is rule-based (punctuation, CJK full stops, common abbreviations, decimals),
which is what the paper's INTLV data means by "segmented by punctuation marks". The WER normaliser
lowercases, drops punctuation and spells out numbers, because whisper writes "press 1" for a
transcript that says "press one" and neither is an error.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr vs etc e.g i.e fig no vol approx dept est inc ltd co jan feb mar apr jun jul aug sep "
    "sept oct nov dec".split()
)
# A sentence ends at . ! ? … (plus closing quotes/brackets) followed by space, or at a CJK stop.
_BOUNDARY = re.compile(r"(?<=[.!?…])([\"'”’)\]]*)\s+|(?<=[。！？])()")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` in order, whitespace-trimmed; never splits after an abbreviation or initial."""
    text = " ".join(text.split())
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.start() + len(m.group(1) or m.group(2) or "")
        candidate = text[start:end].strip()
        if not candidate:
            continue
        last = candidate.rsplit(" ", 1)[-1].rstrip(".").lower()
        if candidate.endswith(".") and (last in ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue  # "Dr. Smith", "J. Doe": not a boundary
        out.append(candidate)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1_000, "thousand"), (100, "hundred"))


def number_words(n: int) -> str:
    """English words for a non-negative integer (what a speaker says for the digits)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for value, word in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{number_words(head)} {word}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NON_WORD = re.compile(r"[^\w\s']|_")


def _spell_number(m: re.Match[str]) -> str:
    token = m.group(0)
    if "." in token and token.count(".") == 1:  # a decimal: "28.8" -> "twenty eight point eight"
        whole, frac = token.split(".")
        return f" {_spell_number_int(whole)} point {' '.join(_ONES[int(d)] for d in frac)} "
    return f" {_spell_number_int(token.replace(',', '').replace('.', ''))} "


def _spell_number_int(digits: str) -> str:
    return number_words(int(digits)) if len(digits) <= 12 else " ".join(_ONES[int(d)] for d in digits)


def normalize_words(text: str) -> list[str]:
    """Words as spoken: NFKC, lowercase, numbers spelled out, punctuation and hyphens dropped."""
    text = unicodedata.normalize("NFKC", text).lower().replace("&", " and ").replace("%", " percent ")
    text = _NUMBER.sub(_spell_number, text)
    text = _NON_WORD.sub(" ", text.replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edit distance over the reference's word count, both sides normalised; 0 for two empty texts."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else float(len(hyp))
    return edit_distance(ref, hyp) / len(ref)
