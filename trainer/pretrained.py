"""Pretrained towers from local Hugging Face directories: the Qwen2/Qwen2.5 LLM, Qwen2-VL's vision
tower (its merger dropped) and Whisper's encoder.

Model config keys (``null`` or empty: random init):

- ``llm.pretrained``: a Qwen2/Qwen2.5 ``Qwen2ForCausalLM`` directory. The LLM is built from the
  checkpoint's ``config.json``; every non-null key of ``llm.config`` must agree with it (a key that
  disagrees is an error naming it), except the runtime keys ``LLM_RUNTIME_KEYS`` (context length,
  sliding window), where ``llm.config`` wins. If the tokenizer has more tokens than the checkpoint's
  vocabulary, the embeddings and ``lm_head`` are resized to the tokenizer's length rounded up to 64
  rather than refused: the checkpoint's rows are kept and every new row starts at the mean of the
  checkpoint's rows. ``llm.config.vocab_size`` may name the checkpoint's or the resized size.
- ``vision.pretrained``: a Qwen2-VL directory (``Qwen2VLForConditionalGeneration``); only its vision
  tower is read: ``visual.*`` (the release and transformers' saves) or ``model.visual.*`` (the layout
  of transformers >= 4.52 in memory), or a bare vision-tower save. ``visual.merger.*`` is never read:
  the model's own 2x2 bridge (``model.visual_bridge_model``) replaces Qwen's merger, as released.
  Qwen2.5-VL's tower (RMSNorm, SwiGLU, window attention) is another architecture and is refused.
- ``audio.encoder_pretrained``: a Whisper directory (``WhisperForConditionalGeneration``:
  ``model.encoder.*``, or ``WhisperModel``: ``encoder.*``) into the audio tokenizer's encoder. Stage
  0.1 reads the same loader through its ``task_args.encoder_from``.

Each tower's ``config.json`` is checked against the model config first (one error naming every field
that differs, e.g. ``embed_dim: checkpoint 1280, config 32``), then its weights go through
``trainer.weights.load_into(..., strict=True)``: every parameter of the tower must be in the checkpoint
with its shape. Weights are read lazily (``safetensors.safe_open``), one tensor at a time and only the
tower's own keys, so the vision tower of a 7B Qwen2-VL never reads its LLM, and under ZeRO-3 no rank
holds more than one full tensor at a time. ``pytorch_model.bin`` directories work too (memory-mapped).
Everything is local: no hub lookups, ever.

``require_pretrained`` in a model config (``baichuan-omni-1.5``) maps those keys to the environment
variables that fill them; the first LLM stage (no ``init_from``) refuses to start with any of them
empty (``check_stages``, before the ranks start, and ``OmniModel(..., pretrained="require")``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import hf_compat  # noqa: F401  (before transformers)
from trainer.weights import WeightsMismatch, load_into

MODES = ("load", "require", "none")  # OmniModel's `pretrained`: load what is set; also refuse unset; read nothing
LLM_RUNTIME_KEYS = ("max_position_embeddings", "use_sliding_window", "sliding_window", "max_window_layers")
VISION_FIELDS = (
    "depth",
    "embed_dim",
    "num_heads",
    "mlp_ratio",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "in_channels",
    "hidden_act",
)
WHISPER_FIELDS = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "num_mel_bins",
    "max_source_positions",
    "activation_function",
)
TOWER_KEYS = ("llm.pretrained", "vision.pretrained", "audio.encoder_pretrained")


class PretrainedError(WeightsMismatch):
    """A pretrained directory that does not fit the model config; the message names what differs."""


class PretrainedMissing(FileNotFoundError):
    """A pretrained directory that is not there (or not set where the model config requires it)."""


def given(value: Any) -> str | None:
    """A directory setting, or None for "random init" (null, or ``${VAR:-}`` left empty)."""
    if value is None:
        return None
    s = str(value).strip()
    return None if s in ("", "null", "None", "~") else s


def setting(cfg: dict[str, Any], dotted: str) -> str | None:
    """``cfg``'s value at ``llm.pretrained``-style ``dotted``, as ``given``."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return given(node)


# ---------------------------------------------------------------- reading a checkpoint directory


def read_config(path: str | Path, what: str) -> dict[str, Any]:
    """``config.json`` of a local Hugging Face directory, or ``PretrainedMissing`` naming ``what``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise PretrainedMissing(f"{what}: no directory {p}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise PretrainedMissing(f"{what}: {p} holds no Hugging Face checkpoint (no config.json)")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PretrainedError(f"{what}: {cfg} is not valid JSON ({e})") from e


class LazyTensor:
    """One checkpoint tensor: its shape without reading it, its values on ``.to(dtype)`` (what
    ``load_into`` asks of a state dict's values), optionally transformed after reading."""

    def __init__(
        self, source: Checkpoint, key: str, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> None:
        self.source, self.key, self.shape, self.fn = source, key, torch.Size(shape), fn

    def tensor(self) -> torch.Tensor:
        t = self.source.read(self.key)
        return self.fn(t) if self.fn is not None else t

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor().to(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={tuple(self.shape)})"


class Checkpoint:
    """The weights of a local Hugging Face directory: ``model.safetensors.index.json`` (sharded),
    ``*.safetensors``, or ``pytorch_model.bin[.index.json]``. Reading is lazy; ``read_keys`` and
    ``opened`` record which tensors and files were read."""

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path).expanduser()
        self.what = what
        self.config = read_config(self.path, what)
        self.read_keys: set[str] = set()
        self.opened: set[str] = set()
        self._handles: dict[str, Any] = {}
        self.files = self._index()

    def _index(self) -> dict[str, str]:
        p = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
                missing = sorted({f for f in weight_map.values() if not (p / f).is_file()})
                if missing:
                    raise PretrainedMissing(f"{self.what}: {index} names missing files {missing[:3]}")
                return dict(weight_map)
        files = sorted(f.name for f in p.glob("*.safetensors")) or sorted(f.name for f in p.glob("pytorch_model*.bin"))
        if not files:
            raise PretrainedMissing(f"{self.what}: {p} holds no weights (*.safetensors or pytorch_model.bin)")
        out: dict[str, str] = {}
        for f in files:
            out.update(dict.fromkeys(self._handle(f).keys(), f))
        return out

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            path = self.path / name
            if name.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[name] = safe_open(str(path), framework="pt", device="cpu")  # the header only
            else:  # memory-mapped: tensors are paged in when read
                self._handles[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._handles[name]

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        h = self._handle(self.files[key])
        return tuple(h.get_slice(key).get_shape()) if hasattr(h, "get_slice") else tuple(h[key].shape)

    def read(self, key: str) -> torch.Tensor:
        name = self.files[key]
        h = self._handle(name)
        self.read_keys.add(key)
        self.opened.add(name)
        return h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]

    def lazy(self, key: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LazyTensor:
        return LazyTensor(self, key, self.shape(key), fn)

    def tower(self, prefixes: Iterable[str], skip: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> dict[str, str]:
        """Our name -> checkpoint key for the first of ``prefixes`` the checkpoint uses (names
        starting with ``skip`` or ending with ``drop`` left out); ``PretrainedError`` when none is."""
        prefixes = tuple(prefixes)
        for prefix in prefixes:
            names = {k[len(prefix) :]: k for k in self.files if k.startswith(prefix)}
            if names:
                return {n: k for n, k in names.items() if not n.startswith(skip) and not n.endswith(drop)}
        raise PretrainedError(f"{self.what}: {self.path} has no weights under {' or '.join(repr(p) for p in prefixes)}")

    def close(self) -> None:
        self._handles.clear()


def _load(module: nn.Module, ckpt: Checkpoint, state: dict[str, LazyTensor]) -> None:
    try:
        load_into(module, state, strict=True, what=f"the weights of {ckpt.what} {ckpt.path}")
    finally:
        ckpt.close()


def _differences(pairs: Iterable[tuple[str, Any, Any]]) -> list[str]:
    out = []
    for field, theirs, ours in pairs:
        same = (
            math.isclose(float(theirs), float(ours), rel_tol=1e-9)
            if isinstance(theirs, (int, float)) and isinstance(ours, (int, float))
            else theirs == ours
        )
        if not same:
            out.append(f"{field}: checkpoint {theirs}, config {ours}")
    return out


def _refuse(what: str, path: Any, where: str, differences: list[str]) -> None:
    if differences:
        raise PretrainedError(f"{what} {path} does not fit the model config's {where}: {'; '.join(differences)}")


def _no_load(module: nn.Module) -> bool:
    """A module built on the meta device (a parameter count) has nothing to load into."""
    return any(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------- the LLM


def llm_config(path: str | Path, config: dict[str, Any] | None, vocab_size: int | None, attn: str) -> Any:
    """The ``Qwen2Config`` of the checkpoint at ``path`` after checking it against ``llm.config``
    (``config``), with the runtime keys of ``llm.config`` applied and the vocabulary resized to the
    tokenizer's length ``vocab_size`` rounded up to 64 where the checkpoint's is smaller."""
    from transformers import Qwen2Config

    raw = read_config(path, "llm.pretrained")
    if raw.get("model_type") != "qwen2":
        raise PretrainedError(
            f"llm.pretrained {path} is a {raw.get('model_type')!r} checkpoint, not a Qwen2/Qwen2.5 LLM (qwen2)"
        )
    ck = Qwen2Config.from_dict(raw)
    ours = {k: v for k, v in (config or {}).items() if v is not None}
    target = ck.vocab_size
    if vocab_size is not None and vocab_size > ck.vocab_size:
        target = -(-vocab_size // 64) * 64
    pairs = []
    for key, value in ours.items():
        if key in LLM_RUNTIME_KEYS or key == "attn_implementation":
            continue
        if key == "vocab_size":
            if value not in (ck.vocab_size, target):
                pairs.append((key, ck.vocab_size, value))
            continue
        pairs.append((key, getattr(ck, key, None), value))
    _refuse("llm.pretrained", path, "llm.config", _differences(pairs))
    for key in LLM_RUNTIME_KEYS:
        if key in ours:
            setattr(ck, key, ours[key])
    ck.vocab_size = target
    ck._attn_implementation = attn
    return ck


def _pad_rows(rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """New vocabulary rows start at the mean of the checkpoint's rows."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
        return torch.cat([t, extra])

    return pad


def load_llm(llm: nn.Module, path: str | Path) -> Checkpoint:
    """The checkpoint's LLM weights into ``llm`` (a ``Qwen2ForCausalLM`` built from ``llm_config``)."""
    ckpt = Checkpoint(path, "llm.pretrained")
    names = {k: k for k in ckpt.keys() if k.startswith("model.") or k == "lm_head.weight"}
    names = {n: k for n, k in names.items() if not n.endswith("rotary_emb.inv_freq")}
    if llm.config.tie_word_embeddings:
        names.pop("lm_head.weight", None)  # one matrix: embed_tokens
    state = {}
    vocab = llm.config.vocab_size
    for name, key in names.items():
        shape = ckpt.shape(key)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and shape[0] < vocab:
            state[name] = LazyTensor(ckpt, key, (vocab, *shape[1:]), _pad_rows(vocab))
        else:
            state[name] = ckpt.lazy(key)
    if not _no_load(llm):
        _load(llm, ckpt, state)
    return ckpt


def build_llm(llm_cfg: dict[str, Any], vocab_size: int | None, attn: str, load: bool = True) -> nn.Module:
    """A ``Qwen2ForCausalLM`` shaped by ``llm.pretrained``'s checkpoint (checked against ``llm.config``),
    with its weights when ``load`` (else the shapes only: a later ``init_from`` fills it)."""
    from transformers import Qwen2ForCausalLM

    path = given(llm_cfg.get("pretrained"))
    config = llm_config(path, llm_cfg.get("config"), vocab_size, attn)
    if not load:
        return Qwen2ForCausalLM(config)
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # every weight is read from the checkpoint next (a strict load)
        llm = Qwen2ForCausalLM(config)
    load_llm(llm, path)
    return llm


# ---------------------------------------------------------------- the vision tower


def vision_checkpoint(path: str | Path) -> tuple[Checkpoint, dict[str, Any], tuple[str, ...]]:
    """The checkpoint, its vision config (Qwen2-VL defaults filled in) and its tower's key prefixes."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    ckpt = Checkpoint(path, "vision.pretrained")
    raw = ckpt.config
    if raw.get("model_type") in ("qwen2_5_vl", "qwen2_5_vl_vision"):
        raise PretrainedError(
            f"vision.pretrained {path} is Qwen2.5-VL, whose vision tower (RMSNorm, SwiGLU, window attention) "
            "is not Qwen2-VL's NaViT that this model uses"
        )
    if isinstance(raw.get("vision_config"), dict):
        vc, prefixes = dict(raw["vision_config"]), ("visual.", "model.visual.")
    elif "embed_dim" in raw and "depth" in raw:  # a bare Qwen2VisionTransformerPretrainedModel save
        vc, prefixes = dict(raw), ("", "visual.", "model.visual.")
    else:
        raise PretrainedError(f"vision.pretrained {path} is not a Qwen2-VL checkpoint (no vision_config)")
    if "in_channels" not in vc and "in_chans" in vc:  # Qwen2-VL's released config.json
        vc["in_channels"] = vc["in_chans"]
    defaults = Qwen2VLVisionConfig().to_dict()
    return ckpt, {f: vc.get(f, defaults.get(f)) for f in VISION_FIELDS}, prefixes


def load_vision(visual: nn.Module, path: str | Path) -> Checkpoint:
    """Qwen2-VL's vision tower (no merger) into ``visual`` (``model.visual_model``)."""
    ckpt, theirs, prefixes = vision_checkpoint(path)
    _refuse(
        "vision.pretrained",
        path,
        "vision.config",
        _differences((f, theirs[f], getattr(visual.config, f)) for f in VISION_FIELDS),
    )
    names = ckpt.tower(prefixes, skip=("merger.",), drop=("inv_freq",))
    if not any(n.startswith("blocks.") for n in names):
        raise PretrainedError(f"vision.pretrained {path} holds no vision blocks")
    if not _no_load(visual):
        _load(visual, ckpt, {n: ckpt.lazy(k) for n, k in names.items()})
    return ckpt


# ---------------------------------------------------------------- the Whisper encoder


def load_whisper_encoder(encoder: nn.Module, path: str | Path, what: str = "audio.encoder_pretrained") -> Checkpoint:
    """A local Whisper checkpoint's encoder (``WhisperForConditionalGeneration`` or ``WhisperModel``
    layout) into ``encoder`` (a ``WhisperEncoder``); its config must match ``audio.encoder``."""
    ckpt = Checkpoint(path, what)
    raw = ckpt.config
    if raw.get("model_type") != "whisper":
        raise PretrainedError(f"{what} {path} is a {raw.get('model_type')!r} checkpoint, not Whisper")
    from transformers import WhisperConfig

    defaults = WhisperConfig().to_dict()
    _refuse(
        what,
        path,
        "audio.encoder",
        _differences((f, raw.get(f, defaults.get(f)), getattr(encoder.config, f)) for f in WHISPER_FIELDS),
    )
    names = ckpt.tower(("model.encoder.", "encoder."))
    if not _no_load(encoder):
        _load(encoder, ckpt, {n: ckpt.lazy(k) for n, k in names.items()})
    return ckpt


# ---------------------------------------------------------------- the model config's towers


def required(cfg: dict[str, Any]) -> dict[str, str | None]:
    """``require_pretrained`` of a model config: tower key -> the environment variable that sets it.
    ``true`` requires every tower; a list or mapping names them (a mapping's values: the variables)."""
    spec = cfg.get("require_pretrained")
    if not spec:
        return {}
    if spec is True:
        return dict.fromkeys(TOWER_KEYS)
    if isinstance(spec, (list, tuple)):
        spec = dict.fromkeys(spec)
    if not isinstance(spec, dict):
        raise PretrainedError(f"require_pretrained must be true, a list or a mapping, not {spec!r}")
    unknown = sorted(set(spec) - set(TOWER_KEYS))
    if unknown:
        raise PretrainedError(f"require_pretrained: unknown keys {unknown} (known: {', '.join(TOWER_KEYS)})")
    return {k: (str(v) if v else None) for k, v in spec.items()}


def check_required(cfg: dict[str, Any], where: str) -> None:
    """``PretrainedMissing`` (one line, naming the variables to set) when a tower ``require_pretrained``
    lists is unset or its directory is not there."""
    need = required(cfg)
    unset = [k for k in need if setting(cfg, k) is None]
    if unset:
        envs = [need[k] for k in unset if need[k]]
        how = f"set {', '.join(envs)}" if envs else f"set {', '.join(unset)}"
        raise PretrainedMissing(
            f"{where} would start from random weights for {', '.join(unset)} (model {cfg.get('name', '?')} has "
            f"require_pretrained): {how} to local Hugging Face directories"
        )
    for key in need:
        p = Path(setting(cfg, key)).expanduser()
        if not (p / "config.json").is_file():
            raise PretrainedMissing(f"{where}: {key} {p} is not a Hugging Face checkpoint directory (no config.json)")


def check_stages(stages: Iterable[Any]) -> None:
    """Before any rank starts: every LLM stage without ``init_from`` has the towers its model requires."""
    for stage in stages:
        if not stage.is_audio and stage.init_from is None:
            check_required(stage.model_config(), f"stage {stage.stage} (no init_from)")


def load_towers(model: nn.Module, cfg: dict[str, Any]) -> dict[str, Checkpoint]:
    """``vision.pretrained`` and ``audio.encoder_pretrained`` into an ``OmniModel`` (the LLM is loaded as
    it is built: ``build_llm``); returns the checkpoints read, by key."""
    done = {}
    vision = setting(cfg, "vision.pretrained")
    if vision:
        done["vision.pretrained"] = load_vision(model.model.visual_model, vision)
    whisper = setting(cfg, "audio.encoder_pretrained")
    if whisper:
        done["audio.encoder_pretrained"] = load_whisper_encoder(model.audio_tokenizer.encoder, whisper)
    return done


def detached_config(cfg: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``cfg`` as the built ``model`` now is, for rebuilding it from its own weights (a stage's
    ``done.json``, hence ``omni generate`` and exports): the tower directories cleared, ``llm.config``
    the LLM's actual config (read from ``llm.pretrained``, vocabulary resized) and ``require_pretrained``
    dropped, so the rebuild never reads, nor needs, the pretrained directories."""
    import copy
    import inspect

    from transformers import Qwen2Config

    out = copy.deepcopy(cfg)
    out.pop("require_pretrained", None)
    if given((out.get("llm") or {}).get("pretrained")):
        keys = [k for k in inspect.signature(Qwen2Config.__init__).parameters if k not in ("self", "kwargs")]
        actual = model.llm_config
        out["llm"]["config"] = {k: getattr(actual, k) for k in keys if hasattr(actual, k)}
    for key in TOWER_KEYS:
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name in out[section]:
            out[section][name] = None
    return out
