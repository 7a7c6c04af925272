"""``text_quality``: the Gopher and C4 heuristics as separately switchable score rules, per language.

Each rule writes its columns (``q_*``); nothing is dropped here. ``keep`` with ``preset: gopher``
(or ``c4``) applies the published thresholds, or give your own. Definitions follow Rae et al. 2021
(Gopher, appendix A1) and Raffel et al. 2020 (C4) as implemented by DataTrove: fractions of
repeated lines/paragraphs and n-gram character fractions are relative to the text's length.

Language-aware, so that no preset rejects a whole language:

* **Units.** Text mostly in a script written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar,
  Tibetan) is measured in characters: each such character is one unit (``q_words`` counts them,
  like DataTrove's CJK word count by characters), runs of other letters stay words. Its mean word
  length is null (no words to measure; ``keep`` keeps nulls), and the repetition n-grams span
  ``2n`` units, as a Chinese word is about two characters. Hangul words are measured in jamo
  (the letters of the alphabet, NFD), so Korean's 3-syllable words meet Gopher's 3-10 letters.
* **Stop words** per language (``STOP_WORDS``: zh, ja, en, de, fr, es, ru, ko, ar, hi). With a
  ``lang`` column (run ``langid`` first) the text's own list counts; a language without a list
  gets a null (not judged); without a ``lang`` column the best list counts. zh and ja lists are
  single function characters (的, 了, の, は), matching the character units.
* Sentence ends include 。！？, the Devanagari danda and the Arabic question mark.

Rules (``rules: [...]``, default all): ``gopher_length``, ``gopher_symbols``, ``gopher_stopwords``,
``gopher_repetition``, ``c4``. Only samples of ``kinds`` (default: text and interleaved documents;
captions and transcripts are short by nature) are scored; others get nulls, which ``keep`` keeps.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from filters.segments import put_column, sample_texts
from pipelines.operator import Operator, Resources, register

# Gopher's English list, and lists of the same kind (the most frequent function words) for the others
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"}),
    "de": frozenset("der die das und ist zu den von mit sich des auf für nicht ein eine dem im am es".split()),
    "fr": frozenset("le la les de des du et est un une que qui dans pour pas sur au avec il elle".split()),
    "es": frozenset("el la los las de del y que en un una es por con para se su al lo".split()),
    "ru": frozenset("и в не на что с по как это он она к из за от то же для".split()),
    "ko": frozenset("그 이 저 것 수 등 및 또는 그리고 하지만 그러나 있다 없다 한다 위해 대한 더 또 때".split()),
    "ar": frozenset("في من على إلى عن أن هذا هذه التي الذي مع كان و أو ما لا ثم".split()),
    "hi": frozenset("का की के है में से को और पर यह वह था थी थे हैं भी ने कि".split()),
    "zh": frozenset("的了是在和有我不这也就都他她们个上说到会你对着而与为"),
    "ja": frozenset("のにはをがでとももたてしなかれ"),
}
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "‣", "⁃", "◦")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "।", "॥", "؟", "」", "』")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")
_SENTENCE = re.compile(r"[.!?؟]+(\s|$)|[。！？।॥]+")
_HAS_ALPHA = re.compile(r"[^\W\d_]")
_HAS_WORD_CHAR = re.compile(r"\w")
# scripts written without spaces between words: Han, kana, Thai, Lao, Tibetan, Myanmar, Khmer
_UNSPACED = "\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNIT = re.compile(f"[{_UNSPACED}]|[^\\s{_UNSPACED}]+")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
_HANGUL = re.compile("[\uac00-\ud7a3]")
_PUNCT = ".,;:!?\"'()「」『』、，。！？：；（）《》“”"

Metrics = dict[str, float | None]


@dataclass(frozen=True)
class Units:
    """A text cut into word units once, shared by every rule."""

    words: list[str]
    unspaced: bool  # mostly a script without spaces: units are characters
    lang: str | None  # from the ``lang`` column, when there is one


def units(text: str, lang: str | None = None) -> Units:
    """Words by spaces, or characters for texts mostly in a script written without spaces."""
    letters = sum(ch.isalpha() for ch in text)
    unspaced = len(_UNSPACED_CHAR.findall(text)) >= 0.5 * max(letters, 1) and letters > 0
    return Units(_UNIT.findall(text) if unspaced else text.split(), unspaced, lang)


def _word_len(word: str) -> int:
    """Letters of a word; Hangul syllables count their jamo (the alphabet's letters)."""
    return len(unicodedata.normalize("NFD", word)) if _HANGUL.search(word) else len(word)


def _as_units(text: str, u: Units | None) -> Units:
    return u if u is not None else units(text)


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


def gopher_length(text: str, u: Units | None = None) -> Metrics:
    u = _as_units(text, u)
    words = [w for w in u.words if _HAS_WORD_CHAR.search(w)]
    mean = sum(_word_len(w) for w in words) / len(words) if words else 0.0
    return {"q_words": float(len(words)), "q_mean_word_len": None if u.unspaced else mean}


def gopher_symbols(text: str, u: Units | None = None) -> Metrics:
    words = _as_units(text, u).words
    n = max(len(words), 1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [""]
    return {
        "q_hash_ratio": text.count("#") / n,
        "q_ellipsis_ratio": sum(text.count(e) for e in ELLIPSES) / n,
        "q_bullet_lines": sum(ln.startswith(BULLETS) for ln in lines) / len(lines),
        "q_ellipsis_lines": sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines),
        "q_alpha_words": sum(bool(_HAS_ALPHA.search(w)) for w in words) / n,
    }


def gopher_stopwords(text: str, u: Units | None = None) -> Metrics:
    """Stop words of the text's language; of the best list when the language is not known."""
    u = _as_units(text, u)
    if u.lang is not None and u.lang not in STOP_WORDS:
        return {"q_stop_words": None}  # no list for this language: not judged
    words = [w.lower().strip(_PUNCT) for w in u.words]
    lists = [STOP_WORDS[u.lang]] if u.lang is not None else list(STOP_WORDS.values())
    return {"q_stop_words": float(max(sum(w in stop for w in words) for stop in lists))}


def gopher_repetition(text: str, u: Units | None = None) -> Metrics:
    u = _as_units(text, u)
    length = max(len(text), 1)
    paragraphs = [p for p in _PARAGRAPHS.split(text.strip()) if p]
    lines = [ln for ln in _LINES.split(text) if ln]
    para_dups, para_chars = _duplicates(paragraphs)
    line_dups, line_chars = _duplicates(lines)
    words, scale = u.words, 2 if u.unspaced else 1  # a Chinese word is about two characters
    out: Metrics = {
        "q_dup_para_frac": para_dups / max(len(paragraphs), 1),
        "q_dup_para_char_frac": para_chars / length,
        "q_dup_line_frac": line_dups / max(len(lines), 1),
        "q_dup_line_char_frac": line_chars / length,
    }
    for n in (2, 3, 4):
        out[f"q_top_{n}gram_frac"] = _top_ngram_chars(words, n * scale) / length
    for n in range(5, 11):
        out[f"q_dup_{n}gram_frac"] = _dup_ngram_chars(words, n * scale) / length
    return out


def c4(text: str, u: Units | None = None) -> Metrics:
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


RULES: dict[str, Callable[[str, Units | None], Metrics]] = {
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
    """Score step: Gopher and C4 text-quality measures (``q_*`` columns), language-aware (CJK, Thai).

    Params:
        rules: the rule names to compute (default all).
        kinds: the sample kinds to score (null: all).
        lang_column: the language column ``langid`` writes; used when present.
    """

    name = "text_quality"
    resources = Resources(cpus=1)

    def __init__(
        self,
        rules: Sequence[str] | None = None,
        kinds: Sequence[str] | None = ("text", "interleaved_image_text"),
        lang_column: str | None = "lang",
    ):
        super().__init__(rules=rules, kinds=kinds, lang_column=lang_column)
        unknown = set(rules or ()) - set(RULES)
        if unknown:
            raise ValueError(f"unknown text_quality rule(s) {sorted(unknown)} (known: {', '.join(RULES)})")
        self.rules = [RULES[r] for r in (rules or RULES)]
        self.kinds = set(kinds) if kinds is not None else None
        self.lang_column = lang_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = sample_texts(batch, separator="\n\n")  # segments are paragraphs
        kinds = batch["kind"].to_pylist()
        has_lang = self.lang_column is not None and self.lang_column in batch.column_names
        langs = batch[self.lang_column].to_pylist() if has_lang else [None] * len(batch)
        rows: list[Metrics | None] = []
        for text, kind, lang in zip(texts, kinds, langs, strict=True):
            if text is None or (self.kinds is not None and kind not in self.kinds):
                rows.append(None)
                continue
            # langid's ``und`` says nothing about the language: judge as if there were no column
            u = units(text, None if lang in (None, "und") else lang)
            metrics: Metrics = {}
            for rule in self.rules:
                metrics.update(rule(text, u))
            rows.append(metrics)
        for name in self.score_columns():
            batch = put_column(batch, name, pa.array([r[name] if r else None for r in rows], pa.float64()))
        return batch

    def score_columns(self) -> list[str]:
        return [k for rule in self.rules for k in rule("x y", None)]
