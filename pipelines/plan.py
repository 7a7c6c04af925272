"""``omni plan``: a target corpus (conf/corpus/*.yaml) against what manifests hold.

For each data type: target and held tokens, the gap, how many more samples that is (tokens per
sample measured from the manifests, else the config's default), how many raw inputs that needs
(divided by the measured yield, written / ingested), and what processing them costs: CPU-core
hours and GPU hours from measured stage throughputs (``bench`` results) or the config's stated
assumptions. SFT data types are targeted in pairs (the config's ``sft.pairs``, Table 4), and the image
SFT pairs by category (``sft.categories``, Table 5) against the manifests' per-category counts.

It also writes one mixture file per training stage for the trainer (``write_mixtures``): every entry
names only shard-set manifests that hold its data types, so ``omni train-all --mixtures DIR`` runs
them as they are; an entry no shard set holds is dropped (listed under ``dropped:`` with the reason)
and the kept weights are renormalised, or with ``strict`` the plan stops and names what is missing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipelines.stats import collect, find_shardset_manifests, token_sums
from shards import storage
from shards.manifest import read_shardset_manifest


@dataclass
class KindPlan:
    kind: str
    target_tokens: float
    have_tokens: int
    have_samples: int
    tokens_per_sample: float
    measured: bool
    samples_needed: float
    raw_inputs_needed: float
    target_hours: float | None = None
    have_hours: float | None = None
    target_pairs: float | None = None  # SFT data types: the target in pairs (samples), Table 4

    @property
    def gap_tokens(self) -> float:
        return max(0.0, self.target_tokens - self.have_tokens)


@dataclass
class CategoryPlan:
    """One category of an SFT data type (Table 5): its share, target pairs and the samples held."""

    kind: str
    category: str
    share: float
    target_pairs: float
    have_samples: int

    @property
    def gap_pairs(self) -> float:
        return max(0.0, self.target_pairs - self.have_samples)


@dataclass
class MixturePlan:
    """One training stage's mixture as written: the kept entries (weights renormalised) and the dropped ones."""

    stage: str
    entries: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    path: str | None = None


@dataclass
class Plan:
    name: str
    kinds: list[KindPlan]
    yield_ratio: float
    compute: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {items, hours, on, source}
    mixtures: list[str] = field(default_factory=list)
    categories: list[CategoryPlan] = field(default_factory=list)
    # SFT kind -> whether the manifests count its categories (else only the config's shares are known)
    categories_counted: dict[str, bool] = field(default_factory=dict)

    def totals(self) -> dict[str, float]:
        cpu = sum(c["hours"] for c in self.compute.values() if c["on"] == "cpu_core")
        gpu = sum(c["hours"] for c in self.compute.values() if c["on"] == "gpu")
        return {
            "target_tokens": sum(k.target_tokens for k in self.kinds),
            "have_tokens": sum(k.have_tokens for k in self.kinds),
            "gap_tokens": sum(k.gap_tokens for k in self.kinds),
            "cpu_core_hours": cpu,
            "gpu_hours": gpu,
        }


def load_corpus(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such corpus target: {path}")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


class PlanError(ValueError):
    """A corpus config the planner cannot use, or (``--strict``) shard sets a mixture needs but no run holds."""


def sft_pairs(corpus: dict[str, Any]) -> dict[str, float]:
    """SFT data type -> target pairs from ``sft.pairs``; each Table 4 column's pairs must add up to it."""
    sft = corpus.get("sft") or {}
    table4 = {str(k): float(v) for k, v in (sft.get("table4") or {}).items()}
    pairs: dict[str, float] = {}
    by_column: Counter = Counter()
    for kind, spec in (sft.get("pairs") or {}).items():
        spec = spec if isinstance(spec, dict) else {"pairs": spec}
        pairs[kind] = float(spec["pairs"])
        if spec.get("column") is not None:
            if str(spec["column"]) not in table4:
                raise PlanError(f"sft.pairs.{kind}: column {spec['column']!r} is not in sft.table4 {sorted(table4)}")
            by_column[str(spec["column"])] += pairs[kind]
    for column, n in by_column.items():
        if abs(n - table4[column]) > 1e-6 * max(1.0, table4[column]):
            raise PlanError(f"sft.pairs of column {column!r} add up to {n:,.0f}, not Table 4's {table4[column]:,.0f}")
    return pairs


def sft_categories(corpus: dict[str, Any]) -> dict[str, dict[str, float]]:
    """SFT data type -> {category: share} from ``sft.categories`` (Table 5); shares must add up to 1."""
    out: dict[str, dict[str, float]] = {}
    for kind, shares in ((corpus.get("sft") or {}).get("categories") or {}).items():
        shares = {str(c): float(v) for c, v in shares.items()}
        if abs(sum(shares.values()) - 1.0) > 1e-3:
            raise PlanError(f"sft.categories.{kind}: shares add up to {sum(shares.values()):.4f}, not 1")
        out[kind] = shares
    return out


def _yield(targets: list[str]) -> float:
    ingested = written = 0
    for t in targets:
        run_manifest = storage.join(t, "manifest.json")
        if not t.endswith(".json") and storage.exists(run_manifest):
            doc = json.loads(storage.read_bytes(run_manifest))
            if doc.get("kind") == "omnicorpus.run":
                ingested += doc["ingested"]
                written += doc["written"]
    return written / ingested if ingested else 1.0


def bench_throughputs(bench_path: str | None) -> dict[str, tuple[float, str]]:
    """stage -> (items/s per unit, unit) from a bench results JSON (rows of bench/common.result)."""
    if not bench_path:
        return {}
    rows = json.loads(open(bench_path, encoding="utf-8").read())
    cores = os.cpu_count() or 1
    out: dict[str, tuple[float, str]] = {}
    for row in rows:
        stage = row["stage"].split(".")[0]
        on = "gpu" if row.get("device") == "gpu" else "cpu_core"
        per_s = row["ours_per_s"] / (row.get("cores") or cores if on == "cpu_core" else row.get("gpus") or 1)
        if stage not in out or per_s < out[stage][0]:  # the slowest measured variant bounds the stage
            out[stage] = (per_s, on)
    return out


def make_plan(corpus: dict[str, Any], targets: list[str], bench_path: str | None = None) -> Plan:
    stats = collect(targets)
    have = token_sums(stats, "kind")
    audio_tokens: Counter = Counter()
    for (kind, _, _, modality), n in stats.token_breakdown.items():
        if modality == "audio":
            audio_tokens[kind] += n
    yield_ratio = _yield(targets)
    pairs = sft_pairs(corpus)
    kinds = []
    specs = [(kind, spec) for kind, spec in corpus["targets"].items()]
    specs += [(kind, {"pairs": n}) for kind, n in pairs.items() if kind not in corpus["targets"]]
    for kind, spec in specs:
        target_hours = spec.get("hours")
        target_pairs = spec.get("pairs")
        n_samples = stats.kinds.get(kind, 0)
        measured = n_samples > 0 and have[kind] > 0
        per_sample = have[kind] / n_samples if measured else corpus["default_tokens_per_sample"][kind]
        if target_pairs is not None:  # SFT: counted in pairs; tokens follow from the tokens per pair
            target = float(target_pairs) * per_sample
            needed = max(0.0, float(target_pairs) - n_samples)
        else:
            per_hour = float(corpus["tokens_per_hour"])
            target = float(target_hours) * per_hour if target_hours is not None else float(spec["tokens"])
            needed = max(0.0, target - have[kind]) / per_sample
        kinds.append(
            KindPlan(
                kind=kind,
                target_tokens=float(target),
                have_tokens=int(have[kind]),
                have_samples=n_samples,
                tokens_per_sample=float(per_sample),
                measured=measured,
                samples_needed=needed,
                raw_inputs_needed=needed / max(yield_ratio, 1e-9),
                target_hours=target_hours,
                have_hours=audio_tokens[kind] / 12.5 / 3600 if target_hours is not None else None,
                target_pairs=float(target_pairs) if target_pairs is not None else None,
            )
        )
    plan = Plan(corpus.get("name", "corpus"), kinds, yield_ratio)
    for kind, shares in sft_categories(corpus).items():
        held = {c: n for (k, c), n in stats.categories.items() if k == kind}
        plan.categories_counted[kind] = bool(held)
        total = pairs.get(kind, 0.0)
        for category, share in shares.items():
            plan.categories.append(CategoryPlan(kind, category, share, share * total, held.pop(category, 0)))
        for category, n in sorted(held.items()):  # counted in the manifests but not in Table 5
            plan.categories.append(CategoryPlan(kind, category, 0.0, 0.0, n))
    measured_rates = bench_throughputs(bench_path)
    for k in kinds:
        for stage in corpus["stages"].get(k.kind, []):
            if stage in measured_rates:
                per_s, on = measured_rates[stage]
                source = "measured"
            else:
                assumed = corpus["assumed_throughput"][stage]
                per_s, on = float(assumed["per_s"]), assumed["device"]
                source = "assumed"
            entry = plan.compute.setdefault(stage, {"items": 0.0, "hours": 0.0, "on": on, "source": source})
            entry["items"] += k.raw_inputs_needed
            entry["hours"] += k.raw_inputs_needed / per_s / 3600
    return plan


def stage_entries(stage: str, spec: Any) -> list[dict[str, Any]]:
    """A ``training_stages`` value as mixture entries: ``{kind: weight}`` or a list of
    ``{name, kinds, weight, format}``."""
    if isinstance(spec, dict):
        return [{"name": str(kind), "kinds": [str(kind)], "weight": float(w)} for kind, w in spec.items()]
    if isinstance(spec, list):
        out = []
        for i, e in enumerate(spec):
            if not isinstance(e, dict) or not e.get("kinds"):
                raise PlanError(f"training_stages.{stage}[{i}]: an entry needs kinds (and name, weight)")
            kinds = [str(k) for k in (e["kinds"] if isinstance(e["kinds"], list) else [e["kinds"]])]
            entry = {"name": str(e.get("name") or "+".join(kinds)), "kinds": kinds, "weight": float(e.get("weight", 1))}
            if e.get("format"):
                entry["format"] = str(e["format"])
            out.append(entry)
        return out
    raise PlanError(f"training_stages.{stage}: expected {{data type: weight}} or a list of entries")


def held_manifests(targets: list[str]) -> dict[str, list[str]]:
    """Data type -> the shard-set manifests (absolute paths or URLs) of ``targets`` that hold samples of it."""
    out: dict[str, list[str]] = {}
    for t in targets:
        for m in find_shardset_manifests(t):
            path = os.path.abspath(m) if "://" not in m else m
            for kind, n in read_shardset_manifest(m)["totals"].get("kinds", {}).items():
                if n and path not in out.setdefault(kind, []):
                    out[kind].append(path)
    return out


def held_categories(targets: list[str]) -> dict[str, set[str]]:
    """Data type -> the SFT categories the shard sets of ``targets`` count for it."""
    out: dict[str, set[str]] = {}
    for t in targets:
        for m in find_shardset_manifests(t):
            for row in read_shardset_manifest(m)["totals"].get("categories", []):
                if row.get("samples"):
                    out.setdefault(str(row["kind"]), set()).add(str(row["category"]))
    return out


def by_category(
    entry: dict[str, Any], shares: dict[str, dict[str, float]], held: dict[str, set[str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An entry of one SFT data type with Table 5 shares, split into one entry per category the shard
    sets hold (weight x share; the trainer keeps only that category's samples), and the categories
    dropped. Unsplit when the manifests count no category of it (then only the kind is known)."""
    kinds = entry["kinds"]
    if len(kinds) != 1 or kinds[0] not in shares or not held.get(kinds[0]):
        return [entry], []
    kept, dropped = [], []
    for category, share in shares[kinds[0]].items():
        part = {**entry, "name": f"{entry['name']}/{category}", "categories": [category]}
        part["weight"] = entry["weight"] * share
        if category in held[kinds[0]]:
            kept.append(part)
        else:
            dropped.append({**part, "reason": f"no shard set of the --have runs holds {kinds[0]} of {category}"})
    return kept, dropped


def plan_mixtures(corpus: dict[str, Any], targets: list[str]) -> list[MixturePlan]:
    """Every training stage's mixture against the shard sets of ``targets``: an entry keeps the manifests
    that hold its data types; one that no manifest holds is dropped; an SFT entry with Table 5 shares is
    split by category where the manifests count categories; kept weights add up to 1."""
    held = held_manifests(targets)
    shares, categories = sft_categories(corpus), held_categories(targets)
    plans = []
    for stage, spec in corpus.get("training_stages", {}).items():
        kept, dropped = [], []
        entries = []
        for entry in stage_entries(str(stage), spec):
            parts, gone = by_category(entry, shares, categories)
            entries += parts
            for d in gone:
                planned = {k: v for k, v in d.items() if k not in ("weight", "reason")}
                dropped.append({**planned, "planned_weight": d["weight"], "reason": d["reason"]})
        for entry in entries:
            manifests = [m for k in entry["kinds"] for m in held.get(k, [])]
            if not manifests:
                missing = ", ".join(entry["kinds"])
                planned = {k: v for k, v in entry.items() if k != "weight"}
                dropped.append(
                    {
                        **planned,
                        "planned_weight": entry["weight"],
                        "reason": f"no shard set of the --have runs holds {missing}",
                    }
                )
                continue
            kept.append({"name": entry["name"], "manifests": list(dict.fromkeys(manifests)), **entry})
        total = sum(e["weight"] for e in kept)
        for e in kept:
            e["planned_weight"] = e["weight"]
            e["weight"] = e["weight"] / total if total > 0 else 1.0 / len(kept)
        plans.append(MixturePlan(str(stage), kept, dropped))
    return plans


def missing_shard_sets(mixtures: list[MixturePlan]) -> dict[str, list[str]]:
    """Data type -> the stages whose mixture needs it but no run holds it."""
    out: dict[str, list[str]] = {}
    for m in mixtures:
        for d in m.dropped:
            for kind in d["kinds"]:
                if m.stage not in out.setdefault(kind, []):
                    out[kind].append(m.stage)
    return out


def missing_message(missing: dict[str, list[str]]) -> str:
    what = "; ".join(f"{k} (stage{'s' if len(v) > 1 else ''} {', '.join(v)})" for k, v in missing.items())
    return f"no shard set of the --have runs holds {what}: produce them, or plan without --strict to drop them"


def write_mixtures(
    plan: Plan,
    corpus: dict[str, Any],
    targets: list[str],
    out_dir: str,
    strict: bool = False,
    warn: Any = None,
) -> list[str]:
    """One YAML per training stage (``mixture-<stage>.yaml``): the entries, each with the shard-set
    manifests holding its data types, its renormalised ``weight`` and the corpus's ``planned_weight``;
    entries no shard set holds go under ``dropped:`` with the reason (and to ``warn``), or with
    ``strict`` nothing is written and PlanError names the missing shard sets.

    ``omni train-all --mixtures DIR`` uses them for every stage; one stage takes its file with
    ``--set mixture_file=PATH`` (``omni train STAGE.yaml``)."""
    mixtures = plan_mixtures(corpus, targets)
    missing = missing_shard_sets(mixtures)
    if strict and missing:
        raise PlanError(missing_message(missing))
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for m in mixtures:
        path = os.path.join(out_dir, f"mixture-{m.stage}.yaml")
        doc: dict[str, Any] = {"stage": m.stage, "corpus": plan.name, "mixture": m.entries}
        if m.dropped:
            doc["dropped"] = m.dropped
            doc["note"] = (
                "weights renormalised over the kept entries"
                if m.entries
                else "no entry has a shard set: omni train-all --mixtures stops at this stage"
            )
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)
        m.path = path
        paths.append(path)
        for d in m.dropped:
            if warn:
                warn(f"stage {m.stage}: {d['name']} dropped (weight {d['planned_weight']:g}): {d['reason']}")
        if m.dropped and not m.entries and warn:
            warn(f"stage {m.stage}: no data type of it has a shard set; {path} keeps no entry")
    plan.mixtures = paths
    return paths


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(plan: Plan) -> str:
    head = f"{'data type':<24} {'target':>9} {'held':>9} {'gap':>9} {'tok/sample':>11} {'samples':>9} {'raw in':>9}"
    lines = [f"corpus {plan.name}: yield {plan.yield_ratio:.3f} (written / ingested)", head, "-" * len(head)]
    for k in plan.kinds:
        tps = f"{k.tokens_per_sample:,.0f}{'' if k.measured else '*'}"
        lines.append(
            f"{k.kind:<24} {_num(k.target_tokens):>9} {_num(k.have_tokens):>9} {_num(k.gap_tokens):>9} "
            f"{tps:>11} {_num(k.samples_needed):>9} {_num(k.raw_inputs_needed):>9}"
        )
        if k.target_hours is not None:
            lines.append(f"{'':<24} audio hours: target {_num(k.target_hours)}, held {k.have_hours:.3f}")
        if k.target_pairs is not None:
            lines.append(f"{'':<24} SFT pairs: target {_num(k.target_pairs)}, held {k.have_samples:,}")
    lines.append("(* tokens per sample assumed from the config: no such sample in the manifests yet)")
    for kind in dict.fromkeys(c.kind for c in plan.categories):
        rows = [c for c in plan.categories if c.kind == kind]
        lines.append("")
        lines.append(f"{kind} by category (Table 5 shares of {_num(sum(c.target_pairs for c in rows))} pairs)")
        lines.append(f"  {'category':<18} {'share':>7} {'target':>9} {'held':>9} {'gap':>9}")
        for c in rows:
            lines.append(
                f"  {c.category:<18} {100 * c.share:>6.2f}% {_num(c.target_pairs):>9} {c.have_samples:>9,} "
                f"{_num(c.gap_pairs):>9}"
            )
        if not plan.categories_counted.get(kind):
            lines.append(
                f"  (the manifests count no {kind} category yet: targets from the config's shares, nothing held)"
            )
    lines.append("")
    lines.append(f"{'stage':<12} {'items':>10} {'hours':>12} {'on':<9} source")
    for stage, c in sorted(plan.compute.items()):
        lines.append(f"{stage:<12} {_num(c['items']):>10} {c['hours']:>12,.0f} {c['on']:<9} {c['source']}")
    t = plan.totals()
    lines.append(
        f"total: gap {_num(t['gap_tokens'])} tokens of {_num(t['target_tokens'])}; "
        f"{t['cpu_core_hours']:,.0f} CPU-core-hours, {t['gpu_hours']:,.0f} GPU-hours"
    )
    for m in plan.mixtures:
        lines.append(f"wrote {m}")
    return "\n".join(lines)
