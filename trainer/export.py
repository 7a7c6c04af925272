"""``omni export STAGE_DIR --out DIR``: a finished stage as a Hugging Face style directory.

A stage's export (``<stage>/final/model.pt`` + ``done.json``, trainer/train.py) becomes:

- ``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``: every tensor of the stage's
  module, in shards of at most ``--max-shard-size`` (a tensor larger than that gets a shard of its own),
  in the stored dtype or ``--dtype``. The LLM's tensors come first, so its shards hold nothing else;
- ``config.json``: for an LLM stage a valid transformers Qwen2 config (``model_type: qwen2``,
  ``architectures: [Qwen2ForCausalLM]``, the LLM's sizes, ``vocab_size``, token ids), so
  ``transformers.Qwen2ForCausalLM.from_pretrained(DIR)`` loads the LLM (``model.embed_tokens``,
  ``model.layers``, ``model.norm``, ``lm_head``) and reports the towers' tensors (``model.visual_model``,
  ``model.visual_bridge_model``, ``model.audio_embed_layers``, ``audio_tokenizer``, ``audio_head``) as
  unused; the whole model config is under ``omni`` (self-contained: no pretrained paths), the stage's
  record under ``omni_stage``;
- ``generation_config.json`` (the text defaults of ``omni generate``) and the tokenizer files
  (``save_pretrained``: ``AutoTokenizer.from_pretrained(DIR)`` loads it).

Audio stages (0.1 tokenizer, 0.2 flow decoder, 0.3 vocoder) export their module's state the same way,
with a ``config.json`` that has no ``model_type``: transformers cannot load them; ``read_export`` can.

``OmniModel.from_pretrained(DIR)`` (``load_pretrained`` here) rebuilds the model from ``omni`` and the
saved tokenizer directly in the requested dtype, checks every name and shape against the shards' headers
(strict) and loads the shards one at a time through ``trainer.weights.load_into``: about one copy of the
weights in that dtype plus one shard at the peak. ``load_generator`` (``omni speak`` / ``omni generate``
on an export) adds stage 0.2's flow decoder and 0.3's vocoder, from their exports or stage directories or
from the run the export was written from (``omni_stage.source``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from trainer import hf_compat  # noqa: F401  (before transformers)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD = "model-{i:05d}-of-{n:05d}.safetensors"
SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
AUDIO_TASKS = ("audio_tokenizer", "flow_decoder", "vocoder")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
EXPORT_FORMAT = "omnicorpus-export"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
# the keys of a Qwen2Config dict that describe a file, not the architecture
LLM_RUNTIME_KEYS = ("max_position_embeddings", "use_sliding_window", "sliding_window", "max_window_layers")
_NOT_ARCH = ("transformers_version", "model_type", "architectures", "torch_dtype", "_name_or_path", "dtype")


class ExportError(ValueError):
    """Something the user can fix (no finished stage, an occupied output, a bad size); one line in the CLI."""


# ---------------------------------------------------------------- sizes and dtypes


def parse_size(size: str | int) -> int:
    """``5GB`` (10^9), ``500MB``, ``2GiB`` (2^30), ``100KB`` or a plain byte count → bytes (> 0)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise ExportError(f"--max-shard-size {size!r} is not a size like 5GB, 500MB, 2GiB or 1000000")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ExportError(f"--max-shard-size {size!r} must be positive")
    return n


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _target_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None keeps every tensor's own dtype."""
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: one of keep, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------- the stage export


def find_final(path: str | os.PathLike) -> Path:
    """``STAGE_DIR`` (or ``STAGE_DIR/final``) → its finished ``final`` directory."""
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"no stage directory {p}")
    final = p if p.name == "final" and not (p / "final").is_dir() else p / "final"
    if not final.is_dir():
        raise ExportError(f"{p} holds no final/: the stage has not finished (or is not a stage directory)")
    missing = [f for f in ("model.pt", "done.json") if not (final / f).is_file()]
    if missing:
        raise ExportError(f"{final} has no {' or '.join(missing)}: the stage has not finished")
    return final


def read_done(final: Path) -> dict[str, Any]:
    try:
        done = json.loads((final / "done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable {final / 'done.json'}: {e}") from e
    if not isinstance(done, dict) or not isinstance(done.get("model_config"), dict):
        raise ExportError(f"{final / 'done.json'} records no model_config")
    return done


def load_stage_state(final: Path) -> dict[str, torch.Tensor]:
    """``final/model.pt`` (memory-mapped where the file allows, so a 22 GB export is not read up front)."""
    path = final / "model.pt"
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ExportError(f"cannot load {path}: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{path} is not a state dict of tensors")
    return dict(state)


def qwen2_config(cfg: dict[str, Any], state: Mapping[str, torch.Tensor]) -> Any:
    """The LLM's ``Qwen2Config`` as trained: the pretrained directory's config or ``llm.config``, with the
    vocabulary and width the exported embedding actually has."""
    from transformers import Qwen2Config

    llm = cfg["llm"]
    if llm.get("pretrained"):
        src = Path(llm["pretrained"])
        if not (src / "config.json").is_file():
            raise ExportError(f"the stage's LLM came from {src}, which has no config.json any more")
        q = Qwen2Config.from_dict(json.loads((src / "config.json").read_text(encoding="utf-8")))
        for k in LLM_RUNTIME_KEYS:  # what llm.config overrides of the checkpoint's (trainer/pretrained.py)
            if (llm.get("config") or {}).get(k) is not None:
                setattr(q, k, llm["config"][k])
    else:
        q = Qwen2Config(**{k: v for k, v in llm["config"].items() if k not in _NOT_ARCH and v is not None})
    emb = state.get("model.embed_tokens.weight")
    if emb is None:
        raise ExportError("the stage's weights have no model.embed_tokens.weight: not an LLM stage")
    q.vocab_size, width = int(emb.shape[0]), int(emb.shape[1])
    if width != q.hidden_size:
        raise ExportError(f"the embedding is {width} wide, the model config says hidden_size {q.hidden_size}")
    return q


def _clear_pretrained(node: Any) -> Any:
    """A copy of a config with every pretrained tower path (``llm.pretrained``, ``vision.pretrained``,
    ``audio.encoder_pretrained``, trainer/pretrained.py) nulled and no ``require_pretrained``: the export
    holds those weights now, and the tower configs it keeps are the ones they were checked against."""
    if isinstance(node, dict):
        return {
            k: None if (k == "pretrained" or k.endswith("_pretrained")) and isinstance(v, str) else _clear_pretrained(v)
            for k, v in node.items()
            if k != "require_pretrained"
        }
    if isinstance(node, list):
        return [_clear_pretrained(v) for v in node]
    return node


def self_contained(cfg: dict[str, Any], q: Any | None) -> dict[str, Any]:
    """The model config to rebuild the exported model from, without the files it was first built from."""
    out = _clear_pretrained(copy.deepcopy(cfg))
    if q is not None:
        arch = {k: v for k, v in q.to_diff_dict().items() if k not in _NOT_ARCH}
        out["llm"]["config"] = {**(cfg["llm"].get("config") or {}), **arch, "vocab_size": q.vocab_size}
        out["llm"]["pretrained"] = None
    return out


def _ordered(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LLM's names first (its shards then hold nothing else), then the towers', each in state order."""
    llm = [k for k in state if k.startswith(LLM_PREFIXES)]
    return llm + [k for k in state if not k.startswith(LLM_PREFIXES)]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` if it is a floating tensor and a dtype is asked for, else as it is."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return t.numel() * _out_dtype(t, dtype).itemsize


def shard_plan(
    state: Mapping[str, torch.Tensor],
    max_bytes: int,
    order: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> list[list[str]]:
    """Names per shard: greedy in ``order``, a new shard when the next tensor (in ``dtype``) would pass
    ``max_bytes``; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for k in order or list(state):
        n = _nbytes(state[k], dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards if shards[-1] else shards[:-1] or [[]]


def write_safetensors(
    state: Mapping[str, torch.Tensor],
    out: Path,
    max_bytes: int,
    order: list[str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Shards + index into ``out`` (floating tensors cast to ``dtype`` one shard at a time, so a mapped
    state is never copied whole); the index is returned."""
    from safetensors.torch import save_file

    plan = shard_plan(state, max_bytes, order, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan, 1):
        name = SHARD.format(i=i, n=len(plan))
        # a copy per tensor: mapped or view tensors (shared storage) cannot be written as they are
        tensors = {k: _cast(state[k].detach(), dtype).contiguous().clone() for k in names}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total, "format": EXPORT_FORMAT}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _tokenizer_dir(done: dict[str, Any], final: Path, tokenizer: str | os.PathLike | None) -> Path | None:
    """The text tokenizer to save with the export: ``tokenizer``, the stage's record, or ``<run>/tokenizer``."""
    candidates = [tokenizer] if tokenizer else [done.get("tokenizer"), final.parent.parent / "tokenizer"]
    for c in candidates:
        if c and Path(c, "tokenizer.json").is_file():
            return Path(c)
    if tokenizer:
        raise ExportError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    return None


def _prepare_out(out: Path, force: bool) -> Path:
    """A fresh temporary sibling of ``out`` to write into (moved into place at the end)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty (--force writes over the export files in it)")
    if not out.parent.is_dir():
        raise ExportError(f"no directory {out.parent} for --out {out}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _move_into(tmp: Path, out: Path) -> None:
    """``tmp``'s files become ``out``'s; stale weight files of an earlier export in ``out`` go first."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for f in out.iterdir():
        if f.is_file() and (SHARD_RE.match(f.name) or f.name == INDEX):
            f.unlink()
    for f in tmp.iterdir():
        dest = out / f.name
        if dest.is_dir() and not f.is_dir():
            shutil.rmtree(dest)
        os.replace(f, dest)
    tmp.rmdir()


def export_stage(
    stage_dir: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_size: str | int = "5GB",
    dtype: str | torch.dtype | None = "keep",
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    fmt: str = "hf",
    partial: bool = False,
) -> dict[str, Any]:
    """Write ``stage_dir``'s finished export to ``out``; returns a summary (shards, tensors, bytes, ...).

    ``fmt="release"``: the released Baichuan-Omni-1.5 layout instead (trainer/release.py's
    ``export_release``, the stored dtype; ``partial`` leaves out our tensors the release has no place for,
    such as the audio tokenizer's reconstruction decoder), with the tokenizer."""
    max_bytes = parse_size(max_shard_size)
    target = _target_dtype(dtype)
    if fmt not in ("hf", "release"):
        raise ExportError(f"--format {fmt!r}: hf or release")
    final = find_final(stage_dir)
    done = read_done(final)
    cfg = done["model_config"]
    task = done.get("task") or "llm"
    audio = task in AUDIO_TASKS
    if fmt == "release" and audio:
        raise ExportError(f"--format release: stage {done.get('stage')} is an audio stage ({task}), not the LLM")
    if fmt == "release" and target is not None:
        raise ExportError("--format release keeps the stored dtype: leave out --dtype")
    tok_dir = _tokenizer_dir(done, final, tokenizer)
    if tok_dir is None and not audio:
        raise ExportError(
            f"stage {done.get('stage')} records tokenizer {done.get('tokenizer')}, which has no tokenizer.json; "
            "pass --tokenizer DIR"
        )
    out = Path(out)
    state = load_stage_state(final)
    q = None if audio else qwen2_config(cfg, state)
    if q is not None and q.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; transformers ties it again
    stage_doc = {k: v for k, v in done.items() if k not in ("model_config", "tokenizer")}
    stage_doc.update({"format": EXPORT_FORMAT, "source": str(final.resolve()), "task": task})

    tmp = _prepare_out(out, force)
    try:
        if fmt == "release":
            rel = _write_release(final, self_contained(cfg, q), tmp, max_bytes, partial)
        else:
            index = write_safetensors(state, tmp, max_bytes, _ordered(state), target)
        tok = None
        if tok_dir is not None:
            from trainer.tokenizer import load_tokenizer

            tok = load_tokenizer(tok_dir)
            tok.save_pretrained(str(tmp))
        if fmt == "hf":
            if audio:
                doc = {"omni": _clear_pretrained(copy.deepcopy(cfg)), "omni_stage": stage_doc}
            else:
                doc = _llm_config_json(q, cfg, _out_dtype(state["model.embed_tokens.weight"], target), tok, stage_doc)
                _generation_config(tok).save_pretrained(str(tmp))
            _write_json(tmp / "config.json", doc)
        _move_into(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fmt == "release":
        return {"out": str(out), "stage": done.get("stage"), "task": task, "format": fmt, **rel}
    dtypes = sorted({dtype_name(_out_dtype(t, target)) for t in state.values()})
    return {
        "out": str(out),
        "stage": done.get("stage"),
        "task": task,
        "shards": len(set(index["weight_map"].values())),
        "tensors": len(index["weight_map"]),
        "bytes": index["metadata"]["total_size"],
        "dtypes": dtypes,
        "transformers": not audio,
    }


def _llm_config_json(q: Any, cfg: dict[str, Any], dtype: torch.dtype, tok: Any, stage: dict) -> dict:
    omni = self_contained(cfg, q)
    q = copy.deepcopy(q)
    q.architectures = ["Qwen2ForCausalLM"]
    q.torch_dtype = dtype_name(dtype)
    if tok is not None:
        q.eos_token_id = tok.eos_token_id
        q.pad_token_id = tok.pad_token_id
        q.bos_token_id = tok.bos_token_id
    doc = q.to_diff_dict()
    doc["omni"] = omni
    doc["omni_stage"] = stage
    return doc


def _generation_config(tok: Any) -> Any:
    """The text sampling defaults of ``omni generate`` (temperature 0.7, top-k 50, top-p 0.9)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )


def _write_release(final: Path, cfg: dict[str, Any], out: Path, max_bytes: int, partial: bool) -> dict[str, Any]:
    """``--format release``: trainer.release's ``export_release`` of ``final/model.pt`` into ``out``."""
    try:
        from trainer import release
    except ImportError as e:
        raise ExportError("--format release needs trainer/release.py, which this installation lacks") from e
    try:
        return release.export_release(final / "model.pt", cfg, out, partial=partial, max_bytes=max_bytes)
    except release.ReleaseLayoutError as e:
        raise ExportError(f"--format release: {e}") from e


# ---------------------------------------------------------------- reading an export back


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ExportError(f"no config.json in {p}")
    try:
        doc = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ExportError(f"unreadable {p / 'config.json'}: {e}") from e
    if not isinstance(doc.get("omni"), dict):
        raise ExportError(f"{p / 'config.json'} has no omni section: not an omni export")
    return doc


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def weight_files(path: str | os.PathLike) -> list[tuple[Path, dict[str, tuple[tuple[int, ...], str]]]]:
    """An export's weight files (index + shards, or one ``model.safetensors``) and each one's tensors as
    ``{name: (shape, safetensors dtype)}``, from the files' headers only (nothing is read); every tensor is
    checked to be where the index says and nowhere else."""
    from safetensors import safe_open

    p = Path(path)
    if (p / INDEX).is_file():
        weight_map = json.loads((p / INDEX).read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (p / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        raise ExportError(f"no {INDEX} or {SINGLE} in {p}")
    out: list[tuple[Path, dict[str, tuple[tuple[int, ...], str]]]] = []
    seen: set[str] = set()
    for f in files:
        if not (p / f).is_file():
            raise ExportError(f"{p / INDEX} names {f}, which is missing")
        with safe_open(str(p / f), framework="pt") as sf:
            info = {k: (tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype()) for k in sf.keys()}
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == f}
            if info.keys() != listed:
                raise ExportError(f"{p / f} holds other tensors than {INDEX} lists for it")
        dup = info.keys() & seen
        if dup:
            raise ExportError(f"{sorted(dup)[:3]} stored twice in {p}")
        seen |= info.keys()
        out.append((p / f, info))
    return out


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an export (``weight_files``' checks first)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f, _ in weight_files(path):
        state.update(load_file(str(f)))
    return state


def read_export(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, state)`` of any export, audio stages included."""
    return read_config(path), read_state(path)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` while active: modules built inside get their parameters in
    ``dtype`` directly (buffers created with an explicit dtype keep it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = torch.float32,
) -> Any:
    """The ``OmniModel`` of an LLM stage export (``dtype="auto"``: the stored dtype; None: float32).

    Built from ``config.json``'s ``omni`` section and the saved tokenizer (``model.special``) directly in
    ``dtype`` (so a bf16 load never holds an fp32 model), the names and shapes checked against the shards'
    headers first (``check_fits``, strict), then loaded one shard at a time through
    ``trainer.weights.load_into``: the most it holds is the model in ``dtype`` plus one shard. In eval mode."""
    from safetensors.torch import load_file

    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer
    from trainer.weights import check_fits, load_into

    p = Path(path)
    doc = read_config(p)
    task = (doc.get("omni_stage") or {}).get("task", "llm")
    if task in AUDIO_TASKS or doc.get("model_type") != "qwen2":
        raise ExportError(f"{p} is an audio stage's export ({task}), not an omni model: read_export gives its weights")
    files = weight_files(p)
    stored = {k: v for _, info in files for k, v in info.items()}
    tok = load_tokenizer(p)
    if dtype == "auto":
        emb = stored.get("model.embed_tokens.weight")
        if emb is None or emb[1] not in _SAFETENSORS_DTYPES:
            raise ExportError(f"{p}: no floating model.embed_tokens.weight to take the stored dtype from")
        dtype = _SAFETENSORS_DTYPES[emb[1]]
    dtype = torch.float32 if dtype is None else dtype
    if isinstance(dtype, str):
        dtype = _target_dtype(dtype)
    what = f"the export {p}"
    with default_dtype(dtype):
        model = build_model(doc["omni"], tok, device=device, pretrained="none")
    check_fits(model, {k: torch.empty(shape, device="meta") for k, (shape, _) in stored.items()}, True, what)
    for f, _ in files:
        load_into(model, load_file(str(f)), strict=False, what=what)
    return model.to(dtype).eval()  # what was built in another dtype (rotary inv_freq) as before: all in dtype


def _audio_export(path: str | os.PathLike, task: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    doc, state = read_export(path)
    found = (doc.get("omni_stage") or {}).get("task")
    if found != task:
        raise ExportError(f"{path} is not a {task} export (its stage task is {found})")
    return doc, state


def _audio_piece(path: str | os.PathLike, task: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(model config, state)`` of stage 0.2 / 0.3 (``task``) from its export or its stage directory
    (``RUN/0.2`` or ``RUN/0.2/final``)."""
    p = Path(path)
    if (p / "config.json").is_file():
        doc, state = _audio_export(p, task)
        return doc["omni"], state
    final = find_final(p)
    done = read_done(final)
    if done.get("task") != task:
        raise ExportError(f"{p} is not a {task} stage (its task is {done.get('task')})")
    return done["model_config"], load_stage_state(final)


def source_stage(doc: dict[str, Any], stage: str) -> Path | None:
    """The finished ``stage`` directory of the run an export was written from (``omni_stage.source`` is
    ``<run>/<stage>/final``), as ``OmniGenerator.from_run`` finds stages 0.2 and 0.3; None if there is none."""
    from trainer.generate import _finished

    src = (doc.get("omni_stage") or {}).get("source")
    if not src:
        return None
    run = Path(src).parent.parent
    return run / stage if _finished(run, stage) else None


def load_generator(
    path: str | os.PathLike,
    flow: str | os.PathLike | None = None,
    vocoder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    require_audio: bool = False,
) -> Any:
    """An ``OmniGenerator`` from an LLM stage's export ``path`` (in float32) and, to turn speech codes into
    waves, stage 0.2's flow decoder (``flow``) and stage 0.3's vocoder (``vocoder``): each an export or a
    stage directory; left out, the finished 0.2 / 0.3 of the run ``path`` was exported from, if it is still
    there (``source_stage``). Without them it decodes text and codes only; ``require_audio`` makes that an
    ``ExportError`` (raised before any weights are read)."""
    from trainer.generate import (
        FLOW_STAGE,
        VOCODER_STAGE,
        GenerationError,
        OmniGenerator,
        flow_from_state,
        vocoder_from_state,
    )
    from trainer.tokenizer import load_tokenizer

    doc = read_config(path)
    task = (doc.get("omni_stage") or {}).get("task", "llm")
    if task in AUDIO_TASKS or doc.get("model_type") != "qwen2":
        raise ExportError(f"{path} is an audio stage's export ({task}), not an omni model")
    stage = (doc.get("omni_stage") or {}).get("stage")
    try:
        flow = flow if flow is not None else source_stage(doc, FLOW_STAGE)
        vocoder = vocoder if vocoder is not None else source_stage(doc, VOCODER_STAGE)
    except GenerationError as e:
        raise ExportError(str(e)) from e
    lacking = [
        f"{flag} DIR (stage {st}'s export or stage directory)"
        for flag, st, got in (("--flow", FLOW_STAGE, flow), ("--vocoder", VOCODER_STAGE, vocoder))
        if got is None
    ]
    if require_audio and lacking:
        where = "the run it was exported from has none" if (doc.get("omni_stage") or {}).get("source") else ""
        raise ExportError(
            f"{path} is an export of stage {stage} without a flow decoder and vocoder"
            f"{' (' + where + ')' if where else ''}: pass {' and '.join(lacking)}"
        )
    model = load_pretrained(path, device=device)
    flow_net = voc = None
    try:
        if flow is not None:
            fcfg, fstate = _audio_piece(flow, "flow_decoder")
            flow_net = flow_from_state(fstate, fcfg, flow, model, stage)
        if vocoder is not None:
            vcfg, vstate = _audio_piece(vocoder, "vocoder")
            voc = vocoder_from_state(vstate, vcfg, vocoder)
    except GenerationError as e:
        raise ExportError(str(e)) from e
    for m in (flow_net, voc):
        if m is not None:
            m.float().to(device)
    return OmniGenerator(model, load_tokenizer(path), flow_net, voc, doc["omni"], stage)
