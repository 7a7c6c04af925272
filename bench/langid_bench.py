"""The ``langid`` operator against calling fastText's ``predict`` directly, same texts, same model.

Ours takes an Arrow batch of samples and does everything a pipeline needs: flatten segments, find
the text ones, replace newlines, one batched ``predict`` (top 3), the script rules (Arrow regex),
lingua on the short or unsure texts, per-sample language by characters, and the per-segment list
columns. Bare fastText gets the texts as a Python list and, as it must (``predict`` refuses a
newline), replaces newlines first; it builds no columns. Three rows, each on its own texts:
documents (few go to lingua), the same without the lingua pass (its cost), and short captions
(most go to lingua: the worst case). Each row's contenders run in turns, best of the same repeats,
pinned to one core (fastText's ``predict`` and lingua's sequential call are single-threaded anyway).
The notes give the share of texts lingua reads: that share, at ~300 us a text against fastText's
~35 us, is what the default row pays over bare fastText.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from bench.common import Row, best_times, main, pinned, result
from filters.dedup.planted import real_documents
from filters.langid import LangId, load_model
from pipelines.demo_data import MULTILINGUAL, PHOTOS
from shards.schema import Segment, make_sample, samples_table

CAPTIONS = ["今天天气很好", "東京で会いましょう", "서울에서 만나요", "A dog on the beach", "Ein Hund am Strand",
            "Un chien sur la plage", "Собака на пляже", "كلب على الشاطئ", "समुद्र तट पर कुत्ता"]  # fmt: skip


def texts(n: int) -> list[str]:
    """Real multilingual text: paragraphs of English docstrings and the ten-language sentences."""
    pool = [d[:600] for d in real_documents()] + [t for _, t in MULTILINGUAL] * 10
    return [pool[i % len(pool)] for i in range(n)]


def captions(n: int) -> list[str]:
    """Short captions: the demo's photo captions and snippets in nine languages."""
    pool = list(PHOTOS.values()) + CAPTIONS
    return [pool[i % len(pool)] for i in range(n)]


def _row(stage: str, op: LangId, model, docs: list[str], repeats: int, notes: str) -> Row:
    table = samples_table(make_sample("bench", "text", [Segment("text", text=t)], f"b/{i}") for i, t in enumerate(docs))
    op(table.slice(0, 100))  # warm-up: lingua loads the models of the scripts it meets
    times = best_times(
        {
            "ours": lambda: op(table),
            "bare": lambda: model.predict([t.replace("\n", " ") for t in docs], k=1),
        },
        repeats,
    )
    chars = sum(len(t) for t in docs) / len(docs)
    n = len(docs)
    changed = sum(b == ["lingua"] for b in op(table)["segment_lang_by"].to_pylist())
    notes = f"{notes}; {chars:.0f} chars/text; lingua read {_lingua_share(op, docs):.0%} of texts ({changed} changed)"
    return result(stage, "texts/s", n / times["ours"], n / times["bare"], notes, cores=1)


def _lingua_share(op: LangId, docs: list[str]) -> float:
    """Share of ``docs`` the op hands to lingua, either mode (counted by wrapping its detectors)."""
    if op.lingua is None:
        return 0.0
    real, count = {"lingua": op.lingua, "lingua_long": op.lingua_long}, [0]

    class Counting:
        def __init__(self, detector: Any) -> None:
            self.detector = detector

        def compute_language_confidence_values(self, text: str):
            count[0] += 1
            return self.detector.compute_language_confidence_values(text)

    for name, detector in real.items():
        setattr(op, name, Counting(detector))
    try:
        op.classify(pa.array(docs))
    finally:
        for name, detector in real.items():
            setattr(op, name, detector)
    return count[0] / max(len(docs), 1)


def run(quick: bool = False) -> list[Row]:
    n, repeats = (5000, 3) if quick else (50_000, 5)
    model = load_model()
    full, fast_only = LangId(), LangId(second_opinion=False)
    full.setup()
    fast_only.setup()
    docs, short = texts(n), captions(n // 5)
    with pinned(1):
        return [
            _row("langid.docs[1 core]", full, model, docs, repeats, "bare=fastText predict(list), newlines replaced"),
            _row("langid.no-lingua[1 core]", fast_only, model, docs, repeats, "same texts, fastText + script rules"),
            _row("langid.captions[1 core]", full, model, short, repeats, "short captions (CJK: script rules)"),
        ]


if __name__ == "__main__":
    main(run)
