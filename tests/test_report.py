"""``omni report``: tokens by language, thresholds of every thresholded step (not only ``keep``),
readable units, score plots grouped by step, example samples per data type escaped, CJK and
Devanagari labels drawn with real glyphs."""

from __future__ import annotations

import warnings
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.demo_data import MULTILINGUAL
from pipelines.executor import run_recipe
from pipelines.operator import Operator, Threshold, register
from pipelines.recipe import recipe_from_dict
from pipelines.report import (
    _bar,
    font_families,
    human_bytes,
    human_count,
    human_duration,
    recipe_steps,
    small_multiples,
    write_report,
)
from tests.conftest import demo_recipe_dict

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=2">'
PAYLOAD = f"{SCRIPT} {IMG} & </td></table>"
SCORE_KEY = 'q"><img src=x onerror=alert(5)>'


@register
class ReportHostileScores(Operator):
    """A score column named with markup: 0.5 for texts that say "plain", 0.9 for the others."""

    name = "test_report_hostile_scores"

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [" ".join(s["text"] or "" for s in segs) for segs in batch["segments"].to_pylist()]
        return batch.append_column(SCORE_KEY, pa.array([0.5 if "plain" in t else 0.9 for t in texts]))


@pytest.fixture(scope="module")
def scored_run(demo_sources: dict[str, str], text_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo sources through text_quality, langid, a keep rule and count_tokens."""
    recipe = demo_recipe_dict(demo_sources, tmp_path_factory.mktemp("report") / "run")
    recipe["pipeline"] += [
        {"op": "text_quality"},
        {"op": "langid", "params": {"second_opinion": False}},
        {"op": "keep", "params": {"column": "q_words", "min": 1, "reason": "no words"}},
        {"op": "count_tokens", "params": {"tokenizer": text_tokenizer_dir}},
    ]
    run_recipe(recipe_from_dict(recipe), progress=False)
    return Path(recipe["output"])


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import json

    root = tmp_path_factory.mktemp("report_hostile")
    lines = [
        {"text": f"caption {PAYLOAD}", "lang": IMG, "title": PAYLOAD},
        {"text": f"plain {SCRIPT}"},
    ]
    (root / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    recipe = {
        "name": f"hostile {SCRIPT}",
        "output": str(root / "run"),
        "sources": [{"name": "docs", "type": "jsonl", "path": str(root / "docs.jsonl")}],
        "imports": ["tests.test_report"],
        "pipeline": [
            {"op": "test_report_hostile_scores"},
            {"op": "keep", "params": {"column": SCORE_KEY, "min": 0.6, "reason": PAYLOAD}},
        ],
        "executor": {"type": "local"},
    }
    run_recipe(recipe_from_dict(recipe), progress=False)
    return root / "run"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self.style = False

    def handle_data(self, data: str) -> None:
        if not self.style:
            self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_readable_units() -> None:
    assert [human_bytes(n) for n in (512, 1536, 10 << 20, 5 << 30, 1023.9 * 1024)] == [
        "512 B",
        "1.5 KiB",
        "10 MiB",
        "5 GiB",
        "1024 KiB",
    ]
    assert [human_count(n) for n in (7, 999, 1234, 4_500_000, 2e9, 0.714285)] == [
        "7",
        "999",
        "1.23k",
        "4.5M",
        "2B",
        "0.714",
    ]
    assert [human_duration(s) for s in (0.0123, 42.5, 185, 7384)] == ["12.3 ms", "42.5 s", "3 min 5 s", "2 h 3 min"]


def test_every_thresholded_step_declares_its_cuts() -> None:
    steps = recipe_steps(
        {
            "steps": [
                {"op": "text_quality", "params": {}},
                {"op": "langid", "params": {"und_below": 0.3}},
                {"op": "keep", "params": {"preset": "gopher", "rules": [{"column": "lang_score", "min": 0.65}]}},
                {"op": "tts_backcheck", "params": {"max_wer": 0.2}},
                {"op": "not_registered_here", "params": {"column": "x", "max": 3}},
            ]
        }
    )
    assert [s.stage for s in steps] == [
        "00-text_quality",
        "01-langid",
        "02-keep",
        "03-tts_backcheck",
        "04-not_registered_here",
    ]
    assert "q_words" in steps[0].columns and len(steps[0].columns) > 20 and steps[0].thresholds == []
    assert steps[1].columns == ["lang_score"] and steps[1].thresholds == [
        Threshold("lang_score", "min", 0.3, "und below")
    ]
    keep = {(t.column, t.side): t.value for t in steps[2].thresholds}
    assert keep[("q_words", "min")] == 50 and keep[("q_words", "max")] == 100_000, "a preset's rules count"
    assert keep[("lang_score", "min")] == 0.65
    assert steps[3].thresholds == [Threshold("tts_wer", "max", 0.2, "tts back-check failed")]
    assert steps[4].thresholds == [Threshold("x", "max", 3.0, "")], "an unknown step's params are still read"

    series = {"lang_score": [0.1, 0.5, 0.9], "tts_wer": [0.0, 0.3], "q_words": [3.0, 80.0]}
    by_column: dict[str, list[Threshold]] = {}
    for s in steps:
        for t in s.thresholds:
            by_column.setdefault(t.column, []).append(t)
    drawn = small_multiples("/dev/null", "scores", series, by_column)
    assert sorted(drawn["lang_score"]) == [0.3, 0.65], "langid's und line and keep's line, on one histogram"
    assert drawn["tts_wer"] == [0.2] and sorted(drawn["q_words"]) == [50, 100_000]


def test_cjk_and_devanagari_labels_have_glyphs(tmp_path: Path) -> None:
    families = font_families()
    assert "Noto Sans CJK SC" in families and "Noto Sans Devanagari" in families, "make installs the Noto fonts"
    labels = {text[:12]: n for n, (_, text) in enumerate(MULTILINGUAL, 1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _bar(str(tmp_path / "langs.png"), "日本語 中文 हिन्दी", labels, "tokens")
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert missing == [], missing[:3]


def test_report_of_a_scored_run(scored_run: Path, tmp_path: Path) -> None:
    path = Path(write_report(str(scored_run), str(tmp_path / "report")))
    page = _parse(path)
    text = " ".join(page.text)
    pngs = {p.name for p in path.parent.glob("*.png")}
    assert {"tokens_by_lang.png", "tokens_by_kind.png", "tokens_by_modality.png", "bytes_by_modality.png"} <= pngs
    assert "zh 中文" in text and "hi हिन्दी" in text, "the language table names languages"
    scores = sorted(p for p in pngs if p.startswith("scores_"))
    assert scores == ["scores_01-text_quality.png", "scores_02-langid.png"], "one figure per scoring step"
    imgs = [a["src"] for tag, a in page.tags if tag == "img"]
    assert set(imgs) == pngs, "every plot is on the page"
    assert "lang_score ≥ 0.2" in text and "und below" in text, "langid's threshold: not a keep step"
    assert "q_words ≥ 1" in text and "no words" in text
    assert "MiB" in text or "KiB" in text, "sizes in binary units"
    assert " ms" in text or " s" in text, "durations with units"
    for kind in ("asr", "image_caption", "text", "video_caption", "interleaved_image_text"):
        assert kind in text
    shown = [t for _, t in MULTILINGUAL if t in text]
    assert len(shown) == 3, "three examples of the text kind, with their text"


def test_hostile_fields_stay_text(hostile_run: Path, tmp_path: Path) -> None:
    path = Path(write_report(str(hostile_run), str(tmp_path / "report")))
    page = _parse(path)
    allowed = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td"}
    assert {tag for tag, _ in page.tags} <= allowed | {"img", "code"}
    assert not [n for _, attrs in page.tags for n in attrs if n.startswith("on")], "no handler from sample markup"
    pngs = {p.name for p in path.parent.glob("*.png")}
    assert {a["src"] for tag, a in page.tags if tag == "img"} == pngs
    text = "".join(page.text)
    assert f"caption {PAYLOAD}" in text, "the example's text is shown as text"
    assert IMG in text, "the hostile language is shown as text"
    assert PAYLOAD in text and f"{SCORE_KEY} ≥ 0.6" in text, "the ledger's and the recipe's strings too"
    assert f"hostile {SCRIPT}" in text
    assert "scores_other_score_columns.png" in pngs, "an undeclared score column is still plotted"
