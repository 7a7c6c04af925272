"""``omni report``: one HTML page (plus PNG plots) that says what a run made and what it cost.

Token mix by modality and data type, length/duration/resolution histograms, a histogram for every
numeric score column with the recipe's keep thresholds marked, rejects by stage and reason, and
throughput per stage. Samples are read from the shards (up to ``max_samples``), never re-decoded.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections import Counter, defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.rundir import LEDGER_SCHEMA, RunDir  # noqa: E402
from pipelines.stats import collect, token_sums  # noqa: E402
from shards import storage  # noqa: E402
from shards.manifest import read_shardset_manifest  # noqa: E402
from shards.schema import SAMPLE_SCHEMA, loads_meta  # noqa: E402
from shards.verify import ShardScan  # noqa: E402

log = logging.getLogger(__name__)


def _thresholds(run_info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Keep-step thresholds by column, from any recipe step with ``column`` and ``min``/``max``."""
    out: dict[str, dict[str, float]] = {}
    for step in run_info.get("steps", []):
        params = step.get("params", {})
        for rule in [params, *params.get("rules", [])]:  # keep: one rule, or a list of them
            if isinstance(rule, dict) and "column" in rule:
                out[rule["column"]] = {k: float(rule[k]) for k in ("min", "max") if rule.get(k) is not None}
    return out


def collect_distributions(root: str, max_samples: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Histogram values from up to ``max_samples`` samples, and the shards left out as damaged
    (checked against the manifest as they are read, so a truncated shard is a line, not a crash)."""
    dist: dict[str, list[float]] = defaultdict(list)
    damaged: dict[str, str] = {}
    n = 0
    shards_dir = storage.join(root, "shards")
    for entry in read_shardset_manifest(shards_dir)["shards"]:
        scan = ShardScan(storage.join(shards_dir, entry["path"]), entry, name=entry["path"])
        for rec in scan.records():
            if rec.sample is None:
                continue
            sample = rec.sample
            for seg in sample["segments"]:
                meta = loads_meta(seg["meta"])
                m = seg["modality"]
                if m == "text":
                    dist["text length (chars)"].append(len(seg["text"] or ""))
                elif m == "image" and "width" in meta:
                    dist["image megapixels"].append(meta["width"] * meta["height"] / 1e6)
                elif m in ("audio", "video") and "duration" in meta:
                    dist[f"{m} duration (s)"].append(float(meta["duration"]))
            for column, value in sample.items():
                if column not in SAMPLE_SCHEMA.names and isinstance(value, int | float) and not isinstance(value, bool):
                    dist[f"score:{column}"].append(float(value))
            n += 1
            if n >= max_samples:
                break
        if scan.damage is not None:
            damaged[entry["path"]] = scan.damage
        if n >= max_samples:
            break
    return dist, damaged


def _bar(path: str, title: str, counts: dict[str, float], ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    names = list(counts)
    ax.bar(names, [counts[k] for k in names], color="#4a7fb5")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _hist(path: str, title: str, values: list[float], marks: dict[str, float] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(values, bins=min(40, max(5, len(values) // 2)), color="#5b9a68")
    for label, x in (marks or {}).items():
        ax.axvline(x, color="#c0392b", linestyle="--", label=f"keep {label} {x:g}")
    if marks:
        ax.legend()
    ax.set_title(f"{title} (n={len(values)})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(root: str, out_dir: str | None = None, max_samples: int = 50_000) -> str:
    """Write ``report.html`` and its plots into ``out_dir`` (default RUN/report); returns the HTML path."""
    out_dir = out_dir or os.path.join(root, "report")
    os.makedirs(out_dir, exist_ok=True)
    run = RunDir(root)
    manifest = json.loads(storage.read_bytes(run.path("manifest.json")))
    info = json.loads(storage.read_bytes(run.path("run.json")))
    stats = collect([root])
    sections = [
        f"<h1>Run report: {html.escape(manifest['name'])}</h1>",
        f"<p>config {manifest['config_hash']} · code {manifest['code_version']} · finished {manifest['finished']}</p>",
        _table(
            ["ingested", "written", "rejected", "shards", "bytes"],
            [
                [
                    manifest["ingested"],
                    manifest["written"],
                    manifest["rejected"],
                    manifest["shardset"]["shards"],
                    manifest["shardset"]["bytes"],
                ]
            ],
        ),
    ]
    by_modality, by_kind = token_sums(stats, "modality"), token_sums(stats, "kind")
    if by_modality:
        _bar(os.path.join(out_dir, "tokens_by_modality.png"), "tokens by modality", dict(by_modality), "tokens")
        _bar(os.path.join(out_dir, "tokens_by_kind.png"), "tokens by data type", dict(by_kind), "tokens")
        sections += ["<h2>Token mix</h2>", '<img src="tokens_by_modality.png">', '<img src="tokens_by_kind.png">']
    else:
        _bar(os.path.join(out_dir, "samples_by_kind.png"), "samples by data type", dict(stats.kinds), "samples")
        sections += ["<h2>Samples (no token counts: add count_tokens)</h2>", '<img src="samples_by_kind.png">']
    thresholds = _thresholds(info)
    distributions, damaged = collect_distributions(root, max_samples)
    if damaged:
        log.warning("%d damaged shards left out of the report (run `omni audit %s`)", len(damaged), root)
        sections += [
            "<h2>Damaged shards (left out; `omni run` on the run redoes them)</h2>",
            _table(["shard", "damage"], [[k, v] for k, v in sorted(damaged.items())]),
        ]
    sections.append("<h2>Distributions</h2>")
    for i, (name, values) in enumerate(sorted(distributions.items())):
        png = f"hist_{i:02d}.png"
        column = name.removeprefix("score:")
        _hist(os.path.join(out_dir, png), name, values, thresholds.get(column) if name.startswith("score:") else None)
        sections.append(f'<img src="{png}" alt="{html.escape(name)}">')
    parts, unreadable = run.read_ledger_parts()
    ledger = pa.concat_tables(parts.values()) if parts else LEDGER_SCHEMA.empty_table()
    if unreadable:
        log.warning("%d ledger parts are unreadable and left out of the report", len(unreadable))
        sections += [
            "<h2>Unreadable ledger parts (left out)</h2>",
            _table(["ledger part", "error"], [[k, v] for k, v in sorted(unreadable.items())]),
        ]
    by_stage_reason = Counter(zip(ledger["stage"].to_pylist(), ledger["reason"].to_pylist(), strict=True))
    sections += [
        "<h2>Rejects by stage and reason</h2>",
        _table(["stage", "reason", "count"], [[s, r, n] for (s, r), n in by_stage_reason.most_common()]),
        "<h2>Throughput per stage</h2>",
        _table(
            ["stage", "rows", "seconds (summed over workers)", "rows/s per worker"],
            [
                [stage, t["rows"], f"{t['seconds']:.2f}", f"{t['rows_per_s']:.1f}" if t["rows_per_s"] else "-"]
                for stage, t in manifest.get("stage_timings", {}).items()
            ],
        ),
    ]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>report</title><style>{style}</style></head>"
    page += "<body>" + "\n".join(sections) + "</body></html>"
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
