"""Stage configs (conf/stages/*.yaml): what trains, at which learning rate, on which mixture, for how long.

A stage names trainable modules by the released code's names (docs/PAPER.md §8) or by these group
aliases; everything else is frozen. Learning rates map module prefixes (or aliases) to values with a
``default``. ``init_from`` is the previous stage's id: its exported weights start this stage.
Strings may use ``${VAR}`` or ``${VAR:-default}``; ``--set a.b=value`` overrides any field (YAML value).

Trust (both optional): ``allow_uris`` lists URI prefixes (``s3://bucket/media/``, a local folder) a
segment's ``uri`` may name, on top of the ``allow_uris`` each shard-set manifest carries from its
recipe; any other uri skips the sample ("uri not allowed"), so a shard cannot make the trainer read
local files or fetch URLs. ``verify_shards`` is ``sha256`` (default: every shard is hashed against its
manifest before it is parsed), ``size`` (one stat per shard) or ``none``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.overrides import apply_override  # --set, shared with omni run


def _conf_dir() -> Path:
    """The shipped configs: ``omnicorpus_conf/`` beside the packages of an installed wheel (pyproject.toml maps
    ``conf/`` there), else the checkout's ``conf/``."""
    root = Path(__file__).resolve().parents[1]
    for d in (root / "omnicorpus_conf", root / "conf"):
        if (d / "stages").is_dir():
            return d
    return root / "conf"


CONF_DIR = _conf_dir()

MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "vit": ("model.visual_model",),
    "projector": ("model.visual_bridge_model",),
    "llm": ("model.embed_tokens", "model.layers", "model.norm"),
    "lm_head": ("lm_head",),
    "audio_embed": ("model.audio_embed_layers",),
    "audio_head": ("audio_head",),
    "audio_tokenizer": ("audio_tokenizer",),
}
ALWAYS_FROZEN = ("audio_tokenizer",)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class StageError(ValueError):
    """A stage config that cannot run; the message says what to fix."""


def expand_vars(obj: Any) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in every string; an unset variable without default stays as written."""
    if isinstance(obj, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), obj)
    if isinstance(obj, list):
        return [expand_vars(v) for v in obj]
    if isinstance(obj, dict):
        return {k: expand_vars(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StageError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(doc, dict):
        raise StageError(f"{p}: expected a mapping at the top level")
    return doc


def resolve_conf(ref: str, kind: str, base: Path, suffixes: tuple[str, ...]) -> Path:
    """A name in conf/<kind>/ or a path (relative to the stage file, then the working directory)."""
    candidates = [base / ref, Path(ref)] + [CONF_DIR / kind / f"{ref}{s}" for s in suffixes]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"no {kind} config {ref!r} (looked in {base}, ., {CONF_DIR / kind})")


def load_model_config(ref: str, base: Path | None = None) -> dict[str, Any]:
    return expand_vars(load_yaml(resolve_conf(ref, "models", base or Path.cwd(), (".yaml", ".yml"))))


def load_deepspeed_config(ref: str, base: Path | None = None) -> dict[str, Any]:
    path = resolve_conf(ref, "deepspeed", base or Path.cwd(), (".json", ".yaml", ".yml"))
    return load_yaml(path)  # JSON is YAML


@dataclass
class StageConfig:
    stage: str
    name: str
    path: Path
    model: str
    deepspeed: str
    trainable: list[str]
    lr: dict[str, float]
    seq_len: int
    mixture: list[dict[str, Any]]
    budget: dict[str, float]
    output: str = "runs/omni"
    init_from: str | None = None
    micro_batch: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    precision: str = "auto"
    num_workers: int = 2
    seed: int = 1234
    save_every: int = 500
    log_every: int = 10
    allow_uris: list[str] = field(default_factory=list)  # segment uri prefixes, besides the manifests' own
    verify_shards: str = "sha256"  # sha256 | size | none: what a shard must match in its manifest entry
    task: str = "llm"  # llm | audio_tokenizer | flow_decoder | vocoder: what this stage trains
    task_args: dict[str, Any] = field(default_factory=dict)  # the audio task's hyperparameters
    audio_tokenizer_from: str | None = None  # a stage id (its export) or a .pt: the trained audio tokenizer
    activation_checkpointing: bool | dict[str, bool] = False  # recompute each layer in backward; per tower: {llm: true}
    sequence_parallel: int = 1  # Ulysses degree: ranks that share one sequence (divides the world size)
    ce_chunk_tokens: int = 4096  # rows of logits per cross-entropy chunk (0: all at once)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def out_dir(self) -> Path:
        return Path(self.output) / self.stage

    def model_config(self) -> dict[str, Any]:
        return load_model_config(self.model, self.path.parent)

    def deepspeed_config(self) -> dict[str, Any]:
        return load_deepspeed_config(self.deepspeed, self.path.parent)

    def export_path(self, ref: str | None) -> Path | None:
        """A stage id's export under this run's output, or a file/dir given as a path."""
        if not ref:
            return None
        p = Path(ref)
        if p.suffix in (".pt", ".bin") or p.is_dir():
            return p / "model.pt" if p.is_dir() else p
        return Path(self.output) / ref / "final" / "model.pt"

    def init_weights(self) -> Path | None:
        """The weights this stage starts from: a previous stage's export, or a file/dir given as a path."""
        return self.export_path(self.init_from)

    def audio_tokenizer_weights(self) -> Path | None:
        """Stage 0.1's export (keys ``tokenizer.*``) that replaces the model's audio tokenizer."""
        return self.export_path(self.audio_tokenizer_from)

    @property
    def is_audio(self) -> bool:
        return self.task != "llm"


REQUIRED = ("stage", "model", "trainable", "lr", "seq_len", "mixture", "budget")
AUDIO_TASKS = ("audio_tokenizer", "flow_decoder", "vocoder")
AUDIO_REQUIRED = ("stage", "model", "task", "lr", "mixture", "budget")  # the task's module trains whole


def stage_from_dict(doc: dict[str, Any], path: Path) -> StageConfig:
    doc = expand_vars(copy.deepcopy(doc))
    task = doc.get("task", "llm")
    if task != "llm" and task not in AUDIO_TASKS:
        raise StageError(f"{path}: task must be llm or one of {', '.join(AUDIO_TASKS)}, not {task!r}")
    if task != "llm":
        doc.setdefault("trainable", [task])
        doc.setdefault("seq_len", 0)
    if not isinstance(doc.get("task_args", {}), dict):
        raise StageError(f"{path}: task_args must be a mapping")
    missing = [k for k in (REQUIRED if task == "llm" else AUDIO_REQUIRED) if k not in doc]
    if missing:
        raise StageError(f"{path}: missing {', '.join(missing)}")
    budget = doc["budget"] or {}
    if not set(budget) & {"steps", "tokens"}:
        raise StageError(f"{path}: budget needs steps or tokens")
    lr = {str(k): float(v) for k, v in (doc["lr"] if isinstance(doc["lr"], dict) else {"default": doc["lr"]}).items()}
    if "default" not in lr:
        raise StageError(f"{path}: lr needs a 'default'")
    if not doc["mixture"]:
        raise StageError(f"{path}: empty mixture")
    known = set(StageConfig.__dataclass_fields__) - {"path", "raw"}
    extra = set(doc) - known
    if extra:
        raise StageError(f"{path}: unknown fields {sorted(extra)}")
    kwargs = {k: v for k, v in doc.items() if k in known}
    kwargs["stage"] = str(doc["stage"])
    kwargs.setdefault("name", kwargs["stage"])
    kwargs.setdefault("deepspeed", "zero2")
    kwargs["lr"] = lr
    kwargs["budget"] = {k: float(v) for k, v in budget.items()}
    allow = doc.get("allow_uris") or []
    if not isinstance(allow, list) or not all(isinstance(u, str) and u for u in allow):
        raise StageError(f"{path}: allow_uris must be a list of URI prefixes")
    kwargs["allow_uris"] = list(allow)
    if kwargs.get("verify_shards", "sha256") not in ("sha256", "size", "none"):
        raise StageError(f"{path}: verify_shards must be sha256, size or none, not {kwargs['verify_shards']!r}")
    sp = kwargs.get("sequence_parallel", 1)
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise StageError(f"{path}: sequence_parallel must be a positive integer, not {sp!r}")
    if sp > 1 and (task != "llm" or int(kwargs.get("seq_len") or 0) % sp):
        raise StageError(f"{path}: sequence_parallel {sp} needs an LLM stage whose seq_len divides by it")
    if "activation_checkpointing" in kwargs:  # true/false or per tower {llm: true, vision: false}
        from trainer.memory import checkpoint_towers

        try:
            checkpoint_towers(kwargs["activation_checkpointing"])
        except ValueError as e:
            raise StageError(f"{path}: {e}") from e
    chunk = kwargs.get("ce_chunk_tokens", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise StageError(f"{path}: ce_chunk_tokens must be a whole number >= 0 (0: unchunked), not {chunk!r}")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    for key in ("init_from", "audio_tokenizer_from"):
        if kwargs.get(key) is not None:
            kwargs[key] = str(kwargs[key])
    return StageConfig(path=path, raw=doc, **kwargs)


def planned_mixture_file(mixtures: str | os.PathLike, stage_id: Any) -> Path:
    """Where ``omni plan --mixtures DIR`` wrote a stage's mixture: ``DIR/mixture-<stage>.yaml``."""
    return Path(mixtures) / f"mixture-{stage_id}.yaml"


def apply_mixture_file(doc: dict[str, Any], mixtures: str | os.PathLike | None = None) -> Path | None:
    """Replace ``doc``'s mixture by its ``mixture_file`` (a file of ``omni plan --mixtures``), else by
    ``DIR/mixture-<stage>.yaml`` of the ``mixtures`` folder when there is one; returns the file used."""
    mixture_file = doc.pop("mixture_file", None)
    if mixture_file:
        path = Path(expand_vars(str(mixture_file)))
        if not path.is_file():
            raise FileNotFoundError(f"no mixture file {path}")
    elif mixtures is not None and planned_mixture_file(mixtures, doc.get("stage")).is_file():
        path = planned_mixture_file(mixtures, doc.get("stage"))
    else:
        return None
    planned = load_yaml(path)
    if not isinstance(planned.get("mixture"), list):
        raise StageError(f"{path}: expected a 'mixture' list (a file of omni plan --mixtures)")
    doc["mixture"] = planned["mixture"]
    return path


def load_stage(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    mixtures: str | os.PathLike | None = None,
) -> StageConfig:
    """A stage YAML with ``overrides``; its mixture replaced by ``mixture_file`` or, given ``mixtures``
    (a folder of ``omni plan --mixtures``), by the folder's ``mixture-<stage>.yaml`` when present."""
    doc = load_yaml(path)
    for o in overrides:
        apply_override(doc, o)
    apply_mixture_file(doc, mixtures)
    return stage_from_dict(doc, Path(path).resolve())


def resolve_stage_ref(ref: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """A stage YAML path, or a stage id (``1.1``) or file stem (``1.1-image-projector``) of the shipped stages."""
    p = Path(ref)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") or os.sep in str(ref):
        raise FileNotFoundError(f"no such file: {p}")
    d = Path(directory) if directory is not None else CONF_DIR / "stages"
    ids: dict[str, Path] = {}
    for q in sorted(d.glob("*.yaml")) if d.is_dir() else []:
        if q.stem == str(ref) or q.name == str(ref):
            return q
        try:
            ids[str(load_yaml(q).get("stage"))] = q
        except (StageError, OSError):
            continue
    if str(ref) in ids:
        return ids[str(ref)]
    known = ", ".join(sorted(ids, key=lambda s: stage_key(s) if re.fullmatch(r"\d+(\.\d+)*", s) else (99,)))
    raise FileNotFoundError(f"no stage file or stage id {str(ref)!r} (stage ids in {d}: {known or 'none'})")


def stage_key(stage_id: str) -> tuple[int, ...]:
    """Paper order: the audio stages 0.1 < 0.2 < 0.3, then 1.1 < 1.2 < 2.1 < 2.2 < 3 < 4.1 < 4.2."""
    try:
        return tuple(int(p) for p in stage_id.split("."))
    except ValueError as e:
        raise StageError(f"stage id {stage_id!r} is not dotted numbers") from e


def discover_stages(directory: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> list[StageConfig]:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no stage directory {d}")
    stages = [load_stage(p, overrides) for p in sorted(d.glob("*.yaml"))]
    if not stages:
        raise FileNotFoundError(f"no stage configs (*.yaml) in {d}")
    return sorted(stages, key=lambda s: stage_key(s.stage))


# ---------------------------------------------------------------- applying a stage to a model


def expand_names(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        out.extend(MODULE_GROUPS.get(n, (n,)))
    return out


def _matches(param: str, prefix: str) -> bool:
    return param == prefix or param.startswith(prefix + ".")


def set_trainable(model: Any, names: list[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named modules; returns trainable parameter counts per name."""
    prefixes = expand_names(names)
    frozen = expand_names(list(ALWAYS_FROZEN))
    for p in prefixes:
        if any(_matches(p, f) or _matches(f, p) for f in frozen):
            raise StageError(f"{p} cannot train: the audio tokenizer is always frozen (docs/PAPER.md §8)")
    counts = dict.fromkeys(prefixes, 0)
    for pname, param in model.named_parameters():
        hit = next((p for p in prefixes if _matches(pname, p)), None)
        param.requires_grad_(hit is not None)
        if hit is not None:
            counts[hit] += int(getattr(param, "ds_numel", param.numel()))  # whole size under ZeRO-3
    unknown = [p for p, n in counts.items() if n == 0]
    if unknown:
        raise StageError(f"trainable names match no parameters: {unknown}")
    return counts


def param_groups(model: Any, lr: dict[str, float], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of trainable parameters by the longest matching lr prefix (or ``default``)."""
    keys = sorted(
        ((pre, k) for k in lr if k != "default" for pre in MODULE_GROUPS.get(k, (k,))), key=lambda t: -len(t[0])
    )
    groups: dict[str, list] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for pre, k in keys if _matches(pname, pre)), "default")
        groups.setdefault(key, []).append(param)
    return [
        {"params": ps, "lr": lr[k], "initial_lr": lr[k], "weight_decay": weight_decay, "name": k}
        for k, ps in sorted(groups.items())
    ]
