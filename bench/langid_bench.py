"""The ``langid`` operator against calling fastText's ``predict`` directly, same texts, same model.

Ours takes an Arrow batch of samples and does everything a pipeline needs: flatten segments, find
the text ones, replace newlines, one batched ``predict``, per-sample language by characters, and
the per-segment list columns. Bare fastText gets the texts as a Python list and, as it must
(``predict`` refuses a newline), replaces newlines first; it builds no columns.
Repeats alternate between the two and the best of each counts.
"""

from __future__ import annotations

from bench.common import Row, best_time, main, result
from filters.dedup.planted import real_documents
from filters.langid import LangId, load_model
from pipelines.demo_data import MULTILINGUAL
from shards.schema import Segment, make_sample, samples_table


def texts(n: int) -> list[str]:
    """Real multilingual text: paragraphs of English docstrings and the ten-language sentences."""
    pool = [d[:600] for d in real_documents()] + [t for _, t in MULTILINGUAL] * 10
    return [pool[i % len(pool)] for i in range(n)]


def run(quick: bool = False) -> list[Row]:
    n, repeats = (5000, 3) if quick else (50_000, 5)
    docs = texts(n)
    table = samples_table(make_sample("bench", "text", [Segment("text", text=t)], f"b/{i}") for i, t in enumerate(docs))
    op = LangId()
    op.setup()
    model = load_model()
    op(table.slice(0, 100))  # warm-up
    t_ours = t_bare = float("inf")
    for _ in range(repeats):  # interleaved, so a busy machine slows both sides alike
        t_ours = min(t_ours, best_time(lambda: op(table), 1))
        t_bare = min(t_bare, best_time(lambda: model.predict([t.replace("\n", " ") for t in docs], k=1), 1))
    chars = sum(len(t) for t in docs) / n
    return [
        result(
            "langid",
            "texts/s",
            n / t_ours,
            n / t_bare,
            f"bare=fastText predict(list), newlines replaced; {chars:.0f} chars/text",
        )
    ]


if __name__ == "__main__":
    main(run)
