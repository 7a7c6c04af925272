"""``omni plan``: a target corpus (conf/corpus/*.yaml) against what manifests hold.

For each data type: target and held tokens, the gap, how many more samples that is (tokens per
sample measured from the manifests, else the config's default), how many raw inputs that needs
(divided by the measured yield, written / ingested), and what processing them costs: CPU-core
hours and GPU hours from measured stage throughputs (``bench`` results) or the config's stated
assumptions. It also writes one mixture file per training stage for the trainer.
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

    @property
    def gap_tokens(self) -> float:
        return max(0.0, self.target_tokens - self.have_tokens)


@dataclass
class Plan:
    name: str
    kinds: list[KindPlan]
    yield_ratio: float
    compute: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {items, hours, on, source}
    mixtures: list[str] = field(default_factory=list)

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
    kinds = []
    for kind, spec in corpus["targets"].items():
        target_hours = spec.get("hours")
        per_hour = float(corpus["tokens_per_hour"])
        target = float(target_hours) * per_hour if target_hours is not None else float(spec["tokens"])
        n_samples = stats.kinds.get(kind, 0)
        measured = n_samples > 0 and have[kind] > 0
        per_sample = have[kind] / n_samples if measured else corpus["default_tokens_per_sample"][kind]
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
            )
        )
    plan = Plan(corpus.get("name", "corpus"), kinds, yield_ratio)
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


def write_mixtures(plan: Plan, corpus: dict[str, Any], targets: list[str], out_dir: str) -> list[str]:
    """One YAML per training stage: the shard-set manifests and the weight of each data type.

    A stage config takes it with ``--set mixture_file=PATH`` (``omni train STAGE.yaml``)."""
    manifests = [os.path.abspath(m) if "://" not in m else m for t in targets for m in find_shardset_manifests(t)]
    held = {k.kind for k in plan.kinds if k.have_samples}
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for stage, weights in corpus["training_stages"].items():
        doc = {
            "stage": str(stage),
            "corpus": plan.name,
            "mixture": [
                {"name": kind, "manifests": list(manifests), "kinds": [kind], "weight": float(w), "held": kind in held}
                for kind, w in weights.items()
            ],
        }
        path = os.path.join(out_dir, f"mixture-{stage}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        paths.append(path)
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
    lines.append("(* tokens per sample assumed from the config: no such sample in the manifests yet)")
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
