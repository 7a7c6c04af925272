"""``omni report``: one HTML page (plus PNG plots) that says what a run made and what it cost.

Token mix by modality, data type and language; payload bytes by modality; length, duration and
resolution histograms; one figure per scoring step with a small histogram for each of its columns and
every threshold a step of the recipe cuts at (``keep`` rules and presets, ``langid``'s ``und_below``,
``tts_backcheck``'s ``max_wer``: whatever ``Operator.thresholds`` declares); a few example samples per
data type; rejects by stage and reason; throughput per stage. Sizes, token counts and durations are
written in readable units (MiB, 1.2M tokens, 3 min 5 s).

Samples are read from the shards (up to ``max_samples``), never re-decoded. Every string that comes
from a shard, the ledger or the recipe is hostile: the page escapes it, and the plots draw it as plain
text (no mathtext), with Noto fallbacks so CJK and Devanagari labels are glyphs, not boxes.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from pipelines.operator import Threshold  # noqa: E402
from pipelines.rundir import LEDGER_SCHEMA, RunDir  # noqa: E402
from pipelines.stats import collect, token_sums  # noqa: E402
from shards import storage  # noqa: E402
from shards.manifest import read_shardset_manifest  # noqa: E402
from shards.schema import SAMPLE_SCHEMA, loads_meta  # noqa: E402
from shards.verify import ShardScan  # noqa: E402

log = logging.getLogger(__name__)

EXAMPLES_PER_KIND = 3
EXCERPT_CHARS = 300
MAX_BARS = 20  # the rest of a bar chart's categories are summed into "other"
LABEL_CHARS = 32

# ---------------------------------------------------------------------------------------------- units


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{_sig3(n)} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """1234 -> '1.23k', 4_500_000 -> '4.5M', 2e9 -> '2B'; under 1000 as is."""
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{_sig3(n / scale)}{unit}"
    return f"{int(n)}" if n == int(n) else _sig3(n)


def human_duration(seconds: float) -> str:
    """0.0123 -> '12.3 ms', 42.5 -> '42.5 s', 185 -> '3 min 5 s', 7384 -> '2 h 3 min'."""
    s = float(seconds)
    if s < 1:
        return f"{_sig3(s * 1000)} ms"
    if s < 60:
        return f"{_sig3(s)} s"
    if s < 3600:
        m, rest = divmod(round(s), 60)
        return f"{m} min {rest} s" if rest else f"{m} min"
    h, rest = divmod(round(s / 60), 60)
    return f"{h} h {rest} min" if rest else f"{h} h"


def _sig3(x: float) -> str:
    """Three significant digits, no exponent, no trailing zeros; whole digits stay (1.50 -> 1.5, 1023.7 -> 1024)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    text = f"{round(x, digits):.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---------------------------------------------------------------------------------------------- fonts

# Fallbacks after matplotlib's DejaVu Sans (Latin, Greek, Cyrillic, Arabic), in Debian's
# fonts-noto-cjk and fonts-noto-core. Han text takes the SC face, kana the JP one.
FALLBACK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Noto Sans Devanagari",
    "Noto Sans Bengali",
    "Noto Sans Thai",
    "Noto Sans Hebrew",
    "Noto Sans Arabic",
)
_FONT_FILES = re.compile(r"NotoSans(CJK|Devanagari|Bengali|Thai|Hebrew|Arabic)[-A-Za-z]*-Regular\.(ttf|otf|ttc)$")
_families: list[str] | None = None


def font_families() -> list[str]:
    """The plot font list: DejaVu Sans, then every Noto fallback this machine has.

    matplotlib caches its font list on first use and never rescans, so fonts installed later (``make``
    installs them) are added from their files here."""
    global _families
    if _families is None:
        known = {f.name for f in font_manager.fontManager.ttflist}
        if not all(name in known for name in FALLBACK_FAMILIES):
            for path in font_manager.findSystemFonts():
                if _FONT_FILES.search(os.path.basename(path)):
                    try:
                        font_manager.fontManager.addfont(path)
                    except (OSError, RuntimeError, ValueError) as e:  # a broken font file: skip it
                        log.debug("font %s not usable: %s", path, e)
            known = {f.name for f in font_manager.fontManager.ttflist}
        _families = ["DejaVu Sans", *(name for name in FALLBACK_FAMILIES if name in known)]
        missing = [name for name in ("Noto Sans CJK SC", "Noto Sans Devanagari") if name not in known]
        if missing:
            log.warning(
                "no %s font: CJK/Devanagari labels will show as boxes (install fonts-noto-cjk fonts-noto-core)",
                " or ".join(missing),
            )
    return _families


@contextmanager
def plot_style() -> Iterator[None]:
    """Fonts with fallbacks; labels from data drawn as plain text (a ``$`` in a source name is not TeX)."""
    with plt.rc_context({"font.family": font_families(), "text.parse_math": False, "axes.titlesize": 10}):
        yield


def _label(value: Any) -> str:
    text = str(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


# Language codes as the page and the charts name them: code and autonym.
LANGUAGE_NAMES = {
    "ar": "العربية",
    "bn": "বাংলা",
    "de": "Deutsch",
    "en": "English",
    "es": "Español",
    "fr": "Français",
    "hi": "हिन्दी",
    "it": "Italiano",
    "ja": "日本語",
    "ko": "한국어",
    "nl": "Nederlands",
    "pt": "Português",
    "ru": "Русский",
    "th": "ไทย",
    "tr": "Türkçe",
    "vi": "Tiếng Việt",
    "zh": "中文",
    "und": "undetermined",
}


def language_label(code: str) -> str:
    name = LANGUAGE_NAMES.get(code)
    return f"{code} {name}" if name else code


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass
class StepInfo:
    stage: str  # "03-text_quality", as the ledger and the throughput table name it
    op: str
    columns: list[str] = field(default_factory=list)
    thresholds: list[Threshold] = field(default_factory=list)


def _params_thresholds(params: Mapping[str, Any]) -> list[Threshold]:
    """Thresholds of a step whose operator cannot be built here (a user module not imported): any
    ``column`` with ``min``/``max``, alone or in ``rules``."""
    out = []
    for rule in [params, *(params.get("rules") or [])]:
        if isinstance(rule, Mapping) and isinstance(rule.get("column"), str):
            for side in ("min", "max"):
                if isinstance(rule.get(side), int | float) and not isinstance(rule.get(side), bool):
                    out.append(Threshold(rule["column"], side, float(rule[side]), str(rule.get("reason") or "")))
    return out


def recipe_steps(run_info: Mapping[str, Any]) -> list[StepInfo]:
    """Each recipe step's score columns and thresholds, as its operator declares them."""
    from pipelines.operator import get_operator

    steps = []
    for i, step in enumerate(run_info.get("steps") or []):
        if not isinstance(step, Mapping):
            continue
        op, params = str(step.get("op")), step.get("params") or {}
        info = StepInfo(f"{i:02d}-{op}", op)
        try:
            operator = get_operator(op)(**params)  # __init__ is cheap by contract: no model loads
            info.columns = list(operator.score_columns())
            info.thresholds = list(operator.thresholds())
        except Exception as e:  # noqa: BLE001 - an operator we cannot build still gets its params read
            log.debug("step %s: operator not built (%s); reading thresholds from its params", info.stage, e)
            info.thresholds = _params_thresholds(params) if isinstance(params, Mapping) else []
        steps.append(info)
    return steps


# ---------------------------------------------------------------------------------------------- samples


@dataclass
class Collected:
    dist: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # media: name -> values
    scores: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # column -> values
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))  # kind -> few
    damaged: dict[str, str] = field(default_factory=dict)
    samples: int = 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _example(sample: Mapping[str, Any], metas: list[dict[str, Any]]) -> dict[str, Any]:
    texts = [seg["text"] for seg in sample["segments"] if seg["modality"] == "text" and seg["text"]]
    excerpt = " ⏎ ".join(texts)
    tokens = [m["tokens"] for m in metas if _number(m.get("tokens"))]
    lang = sample.get("lang") or loads_meta(sample.get("meta")).get("lang") or "und"
    return {
        "id": str(sample["id"]),
        "source": str(sample["source"]),
        "lang": str(lang),
        "segments": " ".join(str(seg["modality"]) for seg in sample["segments"]),
        "tokens": sum(tokens) if tokens else None,
        "text": excerpt[:EXCERPT_CHARS] + ("…" if len(excerpt) > EXCERPT_CHARS else ""),
    }


def collect_samples(root: str, max_samples: int) -> Collected:
    """Histogram values, score columns and a few examples per data type from up to ``max_samples``
    samples; shards that disagree with the manifest are left out and listed (checked as they are read,
    so a truncated shard is a line, not a crash)."""
    out = Collected()
    shards_dir = storage.join(root, "shards")
    for entry in read_shardset_manifest(shards_dir)["shards"]:
        scan = ShardScan(storage.join(shards_dir, entry["path"]), entry, name=entry["path"])
        for rec in scan.records():
            if rec.sample is None:
                continue
            sample = rec.sample
            metas = [loads_meta(seg["meta"]) for seg in sample["segments"]]
            for seg, meta in zip(sample["segments"], metas, strict=True):
                m = seg["modality"]
                if m == "text":
                    out.dist["text length (chars)"].append(len(seg["text"] or ""))
                elif m == "image" and _number(meta.get("width")) and _number(meta.get("height")):
                    out.dist["image megapixels"].append(meta["width"] * meta["height"] / 1e6)
                elif m in ("audio", "video") and _number(meta.get("duration")):
                    out.dist[f"{m} duration (s)"].append(float(meta["duration"]))
            for column, value in sample.items():
                if column not in SAMPLE_SCHEMA.names and _number(value):
                    out.scores[column].append(float(value))
            if len(out.examples[sample["kind"]]) < EXAMPLES_PER_KIND:
                out.examples[sample["kind"]].append(_example(sample, metas))
            out.samples += 1
            if out.samples >= max_samples:
                break
        if scan.damage is not None:
            out.damaged[entry["path"]] = scan.damage
        if out.samples >= max_samples:
            break
    return out


# ---------------------------------------------------------------------------------------------- plots


def _top(counts: Mapping[str, float]) -> dict[str, float]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    top = dict(ranked[:MAX_BARS])
    rest = sum(v for _, v in ranked[MAX_BARS:])
    if rest:
        top["other"] = top.get("other", 0) + rest
    return top


def _bar(path: str, title: str, counts: Mapping[str, float], unit: str, label=_label) -> None:
    """A bar chart with readable values on the axis and on each bar; ``unit`` is 'bytes' or a count noun."""
    fmt = human_bytes if unit == "bytes" else human_count
    counts = _top(counts)
    names = list(counts)
    values = [counts[k] for k in names]
    with plot_style():
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        bars = ax.bar(range(len(names)), values, color="#4a7fb5")
        ax.set_xticks(range(len(names)), [label(n) for n in names], rotation=30, ha="right")
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return (n + cols - 1) // cols, cols


def small_multiples(
    path: str, title: str, series: Mapping[str, list[float]], thresholds: Mapping[str, list[Threshold]] | None = None
) -> dict[str, list[float]]:
    """One figure, one small histogram per series, each threshold of a column drawn as a dashed line
    with its side and label. Returns the x of the lines drawn per series (for tests and the page)."""
    names = sorted(series)
    rows, cols = _grid(len(names))
    drawn: dict[str, list[float]] = {}
    with plot_style():
        height = 2.4 * rows + 0.6
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
        # fixed margins: a layout engine measures every tick label of every panel, seconds per figure
        fig.subplots_adjust(left=0.08, right=0.97, bottom=0.35 / height, top=1 - 0.8 / height, wspace=0.3, hspace=0.55)
        for ax in axes.flat[len(names) :]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, names, strict=False):
            values = series[name]
            ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#5b9a68")
            ax.set_title(f"{_label(name)} (n={human_count(len(values))})", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.yaxis.set_major_locator(MaxNLocator(4, integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_count(v)))
            lines = []
            for t in (thresholds or {}).get(name, []):
                sign = "≥" if t.side == "min" else "≤"
                what = f"{sign} {human_count(t.value)}" + (f" ({_label(t.label)})" if t.label else "")
                ax.axvline(t.value, color="#c0392b", linestyle="--", linewidth=1.2, label=what)
                lines.append(t.value)
            if lines:
                ax.legend(fontsize=6, loc="best")
            drawn[name] = lines
        fig.suptitle(_label(title), fontsize=11, y=1 - 0.2 / height)
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return drawn


# ---------------------------------------------------------------------------------------------- page


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _img(name: str, alt: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", text)[:60]


STYLE = (
    "body{font-family:'DejaVu Sans','Noto Sans','Noto Sans CJK SC','Noto Sans Devanagari',sans-serif;margin:2em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
    "td{max-width:40em;overflow-wrap:anywhere}img{max-width:100%}.num{text-align:right}"
    ".examples td:last-child{white-space:pre-wrap}"
)


def write_report(root: str, out_dir: str | None = None, max_samples: int = 50_000) -> str:
    """Write ``report.html`` and its plots into ``out_dir`` (default RUN/report); returns the HTML path."""
    out_dir = out_dir or os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    run = RunDir(root)
    manifest = json.loads(storage.read_bytes(run.path("manifest.json")))
    info = json.loads(storage.read_bytes(run.path("run.json")))
    stats = collect([root])
    total_tokens = sum(stats.tokens.values())
    shardset = manifest["shardset"]
    sections = [
        f"<h1>Run report: {html.escape(str(manifest['name']))}</h1>",
        "<p>"
        + html.escape(
            f"config {manifest['config_hash']} · code {manifest['code_version']} · finished {manifest['finished']}"
        )
        + "</p>",
        _table(
            ["ingested", "written", "rejected", "shards", "size", "tokens"],
            [
                [
                    f"{manifest['ingested']:,}",
                    f"{manifest['written']:,}",
                    f"{manifest['rejected']:,}",
                    f"{shardset['shards']:,}",
                    human_bytes(shardset["bytes"]),
                    human_count(total_tokens) if stats.tokens else "not counted",
                ]
            ],
        ),
    ]

    sections.append("<h2>Token mix</h2>")
    _bar(os.path.join(out_dir, "samples_by_kind.png"), "samples by data type", dict(stats.kinds), "samples")
    if stats.tokens:
        charts = (
            ("tokens_by_modality.png", "tokens by modality", token_sums(stats, "modality"), _label),
            ("tokens_by_kind.png", "tokens by data type", token_sums(stats, "kind"), _label),
            (
                "tokens_by_lang.png",
                "tokens by language",
                token_sums(stats, "lang"),
                lambda c: _label(language_label(c)),
            ),
        )
        for png, title, counts, label in charts:
            _bar(os.path.join(out_dir, png), title, dict(counts), "tokens", label)
            sections.append(_img(png, title))
        by_lang = token_sums(stats, "lang").most_common()
        sections.append(
            _table(
                ["language", "tokens", "share"],
                [[language_label(k), human_count(n), f"{100 * n / total_tokens:.1f}%"] for k, n in by_lang],
            )
        )
    else:
        sections.append("<p>No token counts (add the <code>count_tokens</code> step to the recipe).</p>")
    sections.append(_img("samples_by_kind.png", "samples by data type"))
    payload = dict(stats.payload_bytes)
    if payload:
        _bar(os.path.join(out_dir, "bytes_by_modality.png"), "payload by modality", payload, "bytes")
        sections.append(_img("bytes_by_modality.png", "payload bytes by modality"))

    got = collect_samples(root, max_samples)
    if got.damaged:
        log.warning("%d damaged shards left out of the report (run `omni audit %s`)", len(got.damaged), root)
        sections += [
            "<h2>Damaged shards (left out; `omni run` on the run redoes them)</h2>",
            _table(["shard", "damage"], [[k, v] for k, v in sorted(got.damaged.items())]),
        ]
    sections.append(f"<h2>Distributions (first {human_count(got.samples)} samples)</h2>")
    if got.dist:
        small_multiples(os.path.join(out_dir, "dist_media.png"), "lengths and durations", got.dist)
        sections.append(_img("dist_media.png", "lengths and durations"))

    steps = recipe_steps(info)
    by_column: dict[str, list[Threshold]] = defaultdict(list)
    for step in steps:
        for t in step.thresholds:
            by_column[t.column].append(t)
    plotted: set[str] = set()
    figures = [(s.stage, [c for c in s.columns if c in got.scores]) for s in steps]
    figures.append(("other score columns", sorted(set(got.scores) - {c for s in steps for c in s.columns})))
    for title, columns in figures:
        columns = [c for c in columns if c not in plotted]
        if not columns:
            continue
        plotted.update(columns)
        png = f"scores_{_slug(title)}.png"
        small_multiples(os.path.join(out_dir, png), f"scores: {title}", {c: got.scores[c] for c in columns}, by_column)
        sections += [f"<h3>{html.escape(title)}</h3>", _img(png, f"score histograms of {title}")]
    cuts = [
        [s.stage, f"{t.column} {'≥' if t.side == 'min' else '≤'} {t.value:g}", t.label]
        for s in steps
        for t in s.thresholds
    ]
    if cuts:
        sections += ["<h3>Thresholds</h3>", _table(["step", "passes", "otherwise"], cuts)]

    if got.examples:
        sections.append("<h2>Example samples</h2>")
        for kind in sorted(got.examples):
            rows = [
                [
                    e["id"],
                    e["source"],
                    language_label(e["lang"]),
                    e["segments"],
                    human_count(e["tokens"]) if e["tokens"] is not None else "-",
                    e["text"],
                ]
                for e in got.examples[kind]
            ]
            sections += [
                f"<h3>{html.escape(kind)}</h3>",
                _table(["id", "source", "language", "segments", "tokens", "text"], rows, "examples"),
            ]

    parts, unreadable = run.read_ledger_parts()
    ledger = pa.concat_tables(parts.values()) if parts else LEDGER_SCHEMA.empty_table()
    if unreadable:
        log.warning("%d ledger parts are unreadable and left out of the report", len(unreadable))
        sections += [
            "<h2>Unreadable ledger parts (left out)</h2>",
            _table(["ledger part", "error"], [[k, v] for k, v in sorted(unreadable.items())]),
        ]
    by_stage_reason = Counter(zip(ledger["stage"].to_pylist(), ledger["reason"].to_pylist(), strict=True))
    sections.append("<h2>Rejects by stage and reason</h2>")
    if by_stage_reason:
        by_reason = Counter({f"{s}: {r}": n for (s, r), n in by_stage_reason.items()})
        _bar(os.path.join(out_dir, "rejects.png"), "rejects by stage and reason", by_reason, "samples")
        sections.append(_img("rejects.png", "rejects by stage and reason"))
    sections += [
        _table(["stage", "reason", "count"], [[s, r, f"{n:,}"] for (s, r), n in by_stage_reason.most_common()]),
        "<h2>Throughput per stage</h2>",
        _table(
            ["stage", "rows", "time (summed over workers)", "rows/s per worker"],
            [
                [
                    stage,
                    human_count(t["rows"]),
                    human_duration(t["seconds"]),
                    human_count(t["rows_per_s"]) if t["rows_per_s"] else "-",
                ]
                for stage, t in manifest.get("stage_timings", {}).items()
            ],
        ),
    ]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>report</title><style>{STYLE}</style></head>"
    page += "<body>" + "\n".join(sections) + "</body></html>"
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
