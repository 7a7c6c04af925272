"""``omni train STAGE --smoke``: a stage shrunk to finish in well under a minute on two CPU cores.

The stage keeps its trainable modules, losses, task and mixture kinds; what makes it slow goes: the tiny
model, 256-token sequences, one micro-batch of one sample (two 3-second clips for the audio stages), no
loader workers, five steps, no intermediate checkpoint. ``--set`` still applies on top.

Mixture entries whose shards are missing (``${OMNI_SHARDS}`` unset or empty) point at the small
sample shard set of ``trainer.sample_data`` instead, built once under ``<smoke dir>/sample-shards``;
entries of kinds the sample set lacks (OCR) are dropped. ``init_from`` / ``audio_tokenizer_from`` are
kept when the referenced stage runs earlier in the same command or its smoke export exists, dropped
(fresh weights) otherwise. Everything goes under ``$OMNI_RUNS/smoke`` (``runs/smoke``): the rewritten
stage YAMLs in ``stages/``, the run in ``run/``. A stage's previous smoke output is removed first, so
the same command always trains again; an output directory that is not a smoke run's is never touched.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trainer.stages import apply_mixture_file, apply_override, expand_vars, load_yaml, resolve_conf, stage_from_dict

SMOKE_FIELDS: dict[str, Any] = {
    "model": "tiny",
    "seq_len": 256,
    "micro_batch": 1,
    "grad_accum": 1,
    "num_workers": 0,
    "budget": {"steps": 5},
    "save_every": 1_000_000,
    "log_every": 1,
    "warmup_steps": 0,
}
AUDIO_SMOKE_FIELDS: dict[str, Any] = {"seq_len": 0, "micro_batch": 2}
AUDIO_SMOKE_TASK_ARGS: dict[str, Any] = {"max_seconds": 3.0}
# task_args that load a full-size pretrained part (a Whisper, a 1.5B LLM, a vocoder checkpoint): off in a smoke run
PRETRAINED_TASK_ARGS = ("encoder_from", "semantic_llm", "vocoder_from")
MARKER = "smoke.json"


class SmokeError(ValueError):
    """A smoke run that cannot be set up; the message says why."""


def smoke_dir() -> Path:
    return Path(os.environ.get("OMNI_RUNS") or "runs") / "smoke"


def sample_shards(root: Path, say: Callable[[str], None]) -> tuple[list[str], set[str]]:
    """The sample shard set under ``root`` (built on first use): its manifests and the kinds they hold."""
    manifests = [root / "run" / "shards" / "manifest.json", root / "extra" / "manifest.json"]
    if not all(m.is_file() for m in manifests):
        from trainer.sample_data import build_sample_corpus

        say(f"building the sample shard set in {root} (demo media, speech prompts, espeak-ng, ffmpeg) ...")
        if root.exists():
            shutil.rmtree(root)  # a half-built set from an interrupted run
        manifests = [Path(m) for m in build_sample_corpus(root)]
    kinds: set[str] = set()
    for m in manifests:
        kinds |= set(json.loads(m.read_text(encoding="utf-8"))["totals"]["kinds"])
    return [str(m) for m in manifests], kinds


def _entry_ok(entry: dict[str, Any], allow_uris: list[str], verify: str) -> str | None:
    """None when the entry's shards are there, else why not."""
    from trainer.data import resolve_entry

    try:
        resolve_entry(entry, allow_uris, verify)
    except (OSError, ValueError, KeyError) as e:  # missing, unreadable or refused (S3 credentials): not there
        return str(e)
    return None


def smoke_doc(
    path: Path, overrides: list[str] | tuple[str, ...], output: Path, mixtures: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The stage YAML at ``path`` with the smoke settings, then ``overrides``, then its planned mixture
    (``mixture_file``, or ``mixtures/mixture-<stage>.yaml``); model and DeepSpeed configs resolved to
    absolute paths (the rewritten YAML lives elsewhere)."""
    doc = load_yaml(path)
    doc.update(copy.deepcopy(SMOKE_FIELDS), output=str(output))
    if doc.get("task", "llm") != "llm":
        doc.update(AUDIO_SMOKE_FIELDS)
        args = dict(doc.get("task_args") or {})
        args.update(AUDIO_SMOKE_TASK_ARGS)
        for key in PRETRAINED_TASK_ARGS:
            if key in args:
                args[key] = None
        doc["task_args"] = args
    for o in overrides:
        apply_override(doc, o)
    doc = expand_vars(doc)
    apply_mixture_file(doc, mixtures)  # as load_stage: a mixture written by `omni plan --mixtures`
    base = path.resolve().parent
    doc["model"] = str(resolve_conf(str(doc["model"]), "models", base, (".yaml", ".yml")))
    doc["deepspeed"] = str(
        resolve_conf(str(doc.get("deepspeed", "zero2")), "deepspeed", base, (".json", ".yaml", ".yml"))
    )
    return doc


def prepare(
    paths: list[Path],
    overrides: list[str] | tuple[str, ...] = (),
    root: Path | None = None,
    say=print,
    mixtures: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the smoke versions of the stage YAMLs at ``paths`` (run in this order); returns their paths.

    ``mixtures``: a folder of ``omni plan --mixtures``; a stage with a file there trains on that mixture."""
    root = (Path(root) if root is not None else smoke_dir()).resolve()
    out_paths: list[Path] = []
    earlier: set[str] = set()
    sample: tuple[list[str], set[str]] | None = None
    (root / "stages").mkdir(parents=True, exist_ok=True)
    for path in paths:
        doc = smoke_doc(Path(path), overrides, root / "run", mixtures)
        target = root / "stages" / Path(path).name
        stage = stage_from_dict(doc, target.resolve())  # checks the result before anything is written
        sid = stage.stage
        mixture, swapped, dropped, missing = [], [], [], []
        for entry in doc["mixture"]:
            why = _entry_ok(entry, stage.allow_uris, stage.verify_shards)
            if why is None:
                mixture.append(entry)
                continue
            why = why.split(": ", 1)[-1].removeprefix("no shard-set manifest at ")  # resolve_entry's words
            if why not in missing:
                missing.append(why)
            if sample is None:
                sample = sample_shards(root / "sample-shards", say)
            manifests, have = sample
            kinds = [k for k in entry.get("kinds") or sorted(have) if k in have]
            name = str(entry.get("name", "?"))
            if not kinds:
                dropped.append(name)
                continue
            swapped.append(name)
            rest = {k: v for k, v in entry.items() if k not in ("manifest", "manifests", "kinds")}
            mixture.append({**rest, "manifests": manifests, "kinds": kinds})
        if missing:
            note = f"; {', '.join(dropped)} dropped (kinds the sample set lacks)" if dropped else ""
            say(f"stage {sid}: {', '.join(swapped) or 'nothing'} -> sample set (not found: {', '.join(missing)}){note}")
        if not mixture:
            raise SmokeError(f"stage {sid}: no mixture entry has shards, and the sample set holds none of its kinds")
        doc["mixture"] = mixture
        for key in ("init_from", "audio_tokenizer_from"):
            ref = doc.get(key)
            if ref is None or str(ref) in earlier:
                continue
            weights = stage.export_path(str(ref))
            if weights is not None and not weights.is_file():
                say(f"stage {sid}: {key} {ref} dropped (no export at {weights}): starts from fresh weights")
                doc[key] = None
        stage = stage_from_dict(doc, target.resolve())
        out = stage.out_dir
        if out.exists():
            if not (out / MARKER).is_file():
                raise SmokeError(f"{out} exists and is not a smoke run's output; choose another --set output=DIR")
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / MARKER).write_text(json.dumps({"stage": sid, "from": str(Path(path).resolve())}) + "\n")
        target.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
        out_paths.append(target)
        earlier.add(sid)
    return out_paths
