"""``text_quality``: the Gopher and C4 heuristics as separately switchable score rules.

Each rule writes its columns (``q_*``); nothing is dropped here. ``keep`` with ``preset: gopher``
(or ``c4``) applies the published thresholds, or give your own. Definitions follow Rae et al. 2021
(Gopher, appendix A1) and Raffel et al. 2020 (C4) as implemented by DataTrove: fractions of
repeated lines/paragraphs and n-gram character fractions are relative to the text's length.

Rules (``rules: [...]``, default all): ``gopher_length``, ``gopher_symbols``, ``gopher_stopwords``,
``gopher_repetition``, ``c4``. Only samples of ``kinds`` (default: text and interleaved documents;
captions and transcripts are short by nature) are scored; others get nulls, which ``keep`` keeps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from filters.segments import put_column, sample_texts
from pipelines.operator import Operator, Resources, register

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "‣", "⁃", "◦")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_SENTENCE = re.compile(r"[.!?。！？]+(\s|$)")
_HAS_ALPHA = re.compile(r"[^\W\d_]")
_HAS_WORD_CHAR = re.compile(r"\w")

Metrics = dict[str, float]


def _words(text: str) -> list[str]:
    return text.split()


def _duplicates(parts: Sequence[str]) -> tuple[int, int]:
    """(repeated elements, characters in repeated elements): first occurrences do not count."""
    seen: set[str] = set()
    count = chars = 0
    for p in parts:
        if p in seen:
            count += 1
            chars += len(p)
        else:
            seen.add(p)
    return count, chars


def _top_ngram_chars(words: Sequence[str], n: int) -> int:
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _dup_ngram_chars(words: Sequence[str], n: int) -> int:
    """Characters of words inside n-grams seen before, each word counted once (DataTrove's walk)."""
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_length(text: str) -> Metrics:
    words = [w for w in _words(text) if _HAS_WORD_CHAR.search(w)]
    return {
        "q_words": float(len(words)),
        "q_mean_word_len": sum(len(w) for w in words) / len(words) if words else 0.0,
    }


def gopher_symbols(text: str) -> Metrics:
    words = _words(text)
    n = max(len(words), 1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    return {
        "q_hash_ratio": text.count("#") / n,
        "q_ellipsis_ratio": sum(text.count(e) for e in ELLIPSES) / n,
        "q_bullet_lines": sum(ln.startswith(BULLETS) for ln in lines) / len(lines),
        "q_ellipsis_lines": sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines),
        "q_alpha_words": sum(bool(_HAS_ALPHA.search(w)) for w in words) / n,
    }


def gopher_stopwords(text: str) -> Metrics:
    return {"q_stop_words": float(sum(w.lower().strip(".,;:!?\"'()") in STOP_WORDS for w in _words(text)))}


def gopher_repetition(text: str) -> Metrics:
    length = max(len(text), 1)
    paragraphs = [p for p in _PARAGRAPHS.split(text.strip()) if p]
    lines = [ln for ln in _LINES.split(text) if ln]
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    words = _words(text)
    out = {
        "q_dup_para_frac": para_dups / max(len(paragraphs), 1),
        "q_dup_para_char_frac": para_chars / length,
        "q_dup_line_frac": line_dups / max(len(lines), 1),
        "q_dup_line_char_frac": line_chars / length,
    }
    for n in (2, 3, 4):
        out[f"q_top_{n}gram_frac"] = _top_ngram_chars(words, n) / length
    for n in range(5, 11):
        out[f"q_dup_{n}gram_frac"] = _dup_ngram_chars(words, n) / length
    return out


def c4(text: str) -> Metrics:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    lower = text.lower()
    return {
        "q_c4_lorem_ipsum": float("lorem ipsum" in lower),
        "q_c4_curly_bracket": float("{" in text),
        "q_c4_javascript_lines": float(sum("javascript" in ln.lower() for ln in lines)),
        "q_c4_policy_lines": float(
            sum(any(p in ln.lower() for p in ("terms of use", "privacy policy", "cookie policy")) for ln in lines)
        ),
        "q_c4_terminal_punct_lines": sum(ln.endswith(TERMINAL) for ln in lines) / len(lines),
        "q_c4_sentences": float(len(_SENTENCE.findall(text))),
    }


RULES: dict[str, Callable[[str], Metrics]] = {
    "gopher_length": gopher_length,
    "gopher_symbols": gopher_symbols,
    "gopher_stopwords": gopher_stopwords,
    "gopher_repetition": gopher_repetition,
    "c4": c4,
}

# Thresholds from the Gopher paper (as in DataTrove's GopherQualityFilter / GopherRepetitionFilter).
GOPHER_THRESHOLDS: list[dict[str, Any]] = [
    {"column": "q_words", "min": 50, "max": 100_000, "reason": "gopher: word count"},
    {"column": "q_mean_word_len", "min": 3, "max": 10, "reason": "gopher: mean word length"},
    {"column": "q_hash_ratio", "max": 0.1, "reason": "gopher: symbol ratio"},
    {"column": "q_ellipsis_ratio", "max": 0.1, "reason": "gopher: symbol ratio"},
    {"column": "q_bullet_lines", "max": 0.9, "reason": "gopher: bullet lines"},
    {"column": "q_ellipsis_lines", "max": 0.3, "reason": "gopher: ellipsis lines"},
    {"column": "q_alpha_words", "min": 0.8, "reason": "gopher: non-alphabetic words"},
    {"column": "q_stop_words", "min": 2, "reason": "gopher: stop words"},
    {"column": "q_dup_para_frac", "max": 0.3, "reason": "gopher: repeated paragraphs"},
    {"column": "q_dup_para_char_frac", "max": 0.2, "reason": "gopher: repeated paragraphs"},
    {"column": "q_dup_line_frac", "max": 0.3, "reason": "gopher: repeated lines"},
    {"column": "q_dup_line_char_frac", "max": 0.2, "reason": "gopher: repeated lines"},
    {"column": "q_top_2gram_frac", "max": 0.20, "reason": "gopher: repeated n-grams"},
    {"column": "q_top_3gram_frac", "max": 0.18, "reason": "gopher: repeated n-grams"},
    {"column": "q_top_4gram_frac", "max": 0.16, "reason": "gopher: repeated n-grams"},
    *(
        {"column": f"q_dup_{n}gram_frac", "max": round(0.15 - 0.01 * (n - 5), 2), "reason": "gopher: repeated n-grams"}
        for n in range(5, 11)
    ),
]
C4_THRESHOLDS: list[dict[str, Any]] = [
    {"column": "q_c4_lorem_ipsum", "max": 0, "reason": "c4: lorem ipsum"},
    {"column": "q_c4_curly_bracket", "max": 0, "reason": "c4: curly bracket"},
    {"column": "q_c4_sentences", "min": 3, "reason": "c4: fewer than 3 sentences"},
]


@register
class TextQuality(Operator):
    """Params: ``rules`` (names, default all), ``kinds`` (sample kinds to score; null for all)."""

    name = "text_quality"
    resources = Resources(cpus=1)

    def __init__(
        self, rules: Sequence[str] | None = None, kinds: Sequence[str] | None = ("text", "interleaved_image_text")
    ):
        super().__init__(rules=rules, kinds=kinds)
        unknown = set(rules or ()) - set(RULES)
        if unknown:
            raise ValueError(f"unknown text_quality rule(s) {sorted(unknown)} (known: {', '.join(RULES)})")
        self.rules = [RULES[r] for r in (rules or RULES)]
        self.kinds = set(kinds) if kinds is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = sample_texts(batch, separator="\n\n")  # segments are paragraphs
        kinds = batch["kind"].to_pylist()
        rows: list[Metrics | None] = []
        for text, kind in zip(texts, kinds, strict=True):
            if text is None or (self.kinds is not None and kind not in self.kinds):
                rows.append(None)
                continue
            metrics: Metrics = {}
            for rule in self.rules:
                metrics.update(rule(text))
            rows.append(metrics)
        names = [k for rule in self.rules for k in rule("x y")]
        for name in names:
            batch = put_column(batch, name, pa.array([r[name] if r else None for r in rows], pa.float64()))
        return batch
