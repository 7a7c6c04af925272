"""``omni import``: the released Baichuan-Omni-1.5 checkpoint layout into our model, and back.

The released weights (``OmniForCausalLM`` of the public ``modeling_omni.py``, ``audio_modeling_omni.py``,
``visual_modeling_omni.py``, ``vector_quantize.py``) and ours differ in names, in the fused QKV of the
LLM, and in how the audio head stores its per-codebook FFN. Every transform below is a split, a
concatenation, a reshape/permute or a rename: no value changes, so release → ours → release is
bit-exact. Structural differences are settings of our model (``conf/models/baichuan-omni-1.5.yaml``):
``audio_head: {norm: rms, bias: true, ffn_residual: normed, hidden_input: first, unused_ffn_bias: true}``
and ``audio: {bridge: {bias: false}}``; ``release_mismatches`` names the ones a config gets wrong. The
released reconstruction decoder is a layout of ours, ``audio: {decoder: {layout: release}}``
(``trainer/model.py`` ``ReleaseAudioDecoder``, with the released parameter names); with our default
layout the decoder rows below have no place.

Sizes: ``d`` LLM width (3584), ``H``/``K`` query/key-value heads (28/4), ``hd`` head dim (128), ``I`` FFN
(18944), ``V`` vocabulary (152064), ``e`` ViT width (1280), ``n_q`` codebooks (8) of sizes ``s_j``,
``a`` Whisper width (1280), ``m`` mel bins (128), ``A = 4a`` (5120), ``F = 2d`` (depth FFN).

The table (released name, its shape, our name and the transform; ``same`` keeps the name):

LLM, ``model.`` + (and ``lm_head``)            shape              ours
``embed_tokens.weight``                        [V, d]             same
``layers.{i}.self_attn.W_pack.weight``         [(H+2K)·hd, d]     ``layers.{i}.self_attn.{q,k,v}_proj.weight``: rows
                                                                  split H·hd | K·hd | K·hd (concatenated back)
``layers.{i}.self_attn.W_pack.bias``           [(H+2K)·hd]        ``layers.{i}.self_attn.{q,k,v}_proj.bias``: the same
``layers.{i}.self_attn.o_proj.weight``         [d, H·hd]          same (no bias in either)
``layers.{i}.mlp.{gate,up}_proj.weight``       [I, d]             same
``layers.{i}.mlp.down_proj.weight``            [d, I]             same
``layers.{i}.input_layernorm.weight``          [d]                same (RMSNorm, eps 1e-6)
``layers.{i}.post_attention_layernorm.weight`` [d]                same
``norm.weight``                                [d]                same
``lm_head.weight`` (no ``model.``)             [V, d]             same: a plain Linear (``use_norm_head: false``); if
                                                                  the release's config.json says ``use_norm_head``,
                                                                  import L2-normalises the rows (what its forward uses)

Vision, ``model.visual_model.`` / ``model.visual_bridge_model.`` + (HF Qwen2-VL NaViT, merger deleted in both)
``patch_embed.proj.weight``                    [e, 3, 2, 14, 14]  same
``blocks.{i}.{norm1,norm2}.{weight,bias}``     [e]                same
``blocks.{i}.attn.qkv.{weight,bias}``          [3e, e], [3e]      same
``blocks.{i}.attn.proj.{weight,bias}``         [e, e], [e]        same
``blocks.{i}.mlp.fc1.{weight,bias}``           [4e, e], [4e]      same (fc2: [e, 4e], [e])
bridge ``ln_q.{weight,bias}``                  [e]                same (LayerNorm eps 1e-6)
bridge ``mlp.0.{weight,bias}``                 [4e, 4e], [4e]     same
bridge ``mlp.2.{weight,bias}``                 [d, 4e], [d]       same

Audio embeddings: ``model.audio_embed_layers.{j}.weight`` [s_j+1, d]: same.

Audio head, ``audio_head.`` +                  shape              ours (``audio_head.`` +)
``transformer_layers.{i}.self_attention.in_proj_weight``  [3d, d]  ``layers.{i}.attn.in_proj_weight`` (d/128 heads)
``transformer_layers.{i}.self_attention.in_proj_bias``    [3d]     ``layers.{i}.attn.in_proj_bias``
``transformer_layers.{i}.self_attention.out_proj.{weight,bias}``  [d, d], [d]  ``layers.{i}.attn.out_proj.*``
``transformer_layers.{i}.layernorm{1,2}.weight``  [d]             ``layers.{i}.norm{1,2}.weight`` (RMSNorm)
``transformer_layers.{i}.linear1.weight``      [F, n_q·d]         ``layers.{i}.w_in`` [n_q, d, F]: ``view(F, n_q, d)``
                                                                  ``.permute(1, 2, 0)``; back: ``permute(2, 0, 1)``
``transformer_layers.{i}.linear2.weight``      [d, n_q·F]         ``layers.{i}.w_out`` [n_q, F, d]: ``view(d, n_q, F)``
                                                                  ``.permute(1, 2, 0)``; back the same way
``transformer_layers.{i}.linear1.bias``        [F]                ``layers.{i}.linear1_bias``: a buffer; the released
                                                                  forward (einsum on the weights) never adds it
``transformer_layers.{i}.linear2.bias``        [d]                ``layers.{i}.linear2_bias``: idem
``headnorm.weight``                            [d]                ``norm.weight`` (RMSNorm)
``heads.{j}.{weight,bias}``                    [s_j+1, d], [s_j+1]  ``classifiers.{j}.{weight,bias}``

Audio tokenizer, ``audio_tokenizer.`` +         shape              ours (``audio_tokenizer.`` +)
``audio_model.conv1.{weight,bias}``            [a, m, 3], [a]     ``encoder.conv1.*`` (HF WhisperEncoder)
``audio_model.conv2.{weight,bias}``            [a, a, 3], [a]     ``encoder.conv2.*``
``audio_model.positional_embedding``           [1500, a] buffer   ``encoder.embed_positions.weight`` (sinusoids in both)
``audio_model.layers.{i}.self_attn.k_proj.weight``  [a, a]   ``encoder.layers.{i}.self_attn.k_proj.weight`` (no bias)
``audio_model.layers.{i}.self_attn.{q,v,out}_proj.{weight,bias}``  [a, a], [a]  ``encoder.layers.{i}.self_attn.*``
``audio_model.layers.{i}.{self_attn_layer_norm,final_layer_norm}.{weight,bias}``  [a]  ``encoder.layers.{i}.*``
``audio_model.layers.{i}.fc1.{weight,bias}``   [f, a], [f]        ``encoder.layers.{i}.fc1.*`` (fc2: [a, f], [a])
``audio_model.layer_norm.{weight,bias}``       [a]                ``encoder.layer_norm.*``
``audio_bridge_model.{gate,up}_proj.weight``   [A, a, 4]          ``bridge.{gate,up}_proj.weight`` (no biases in either
                                                                  with ``audio.bridge.bias: false``)
``audio_bridge_model.down_proj.weight``        [A, A]             ``bridge.down_proj.weight``
``audio_bridge_model.layer_norm.{weight,bias}``  [A]              ``bridge.norm.{weight,bias}``
``audio_bridge_model.vq_list.{j}.codebook.embed``         [s_j, A]  ``quantizer.layers.{j}.embed``
``audio_bridge_model.vq_list.{j}.codebook.embed_avg``     [s_j, A]  ``quantizer.layers.{j}.embed_avg``
``audio_bridge_model.vq_list.{j}.codebook.cluster_size``  [s_j]     ``quantizer.layers.{j}.cluster_size``

Reconstruction decoder (``audio.decoder.layout: release`` only; ``k`` the decoder kernel, ``audio.decoder.
kernel_size``; ``P`` the stored positions, a chunk's mel frames: 3000; ``c`` post-net channels, ``n_m``
80 mel bins; every name keeps its tail: ``audio_decoder.{rest}`` is ``decoder.{rest}``)
``audio_bridge_model.proj_decoder.{weight,bias}``  [a, A], [a]    ``decoder.proj_decoder.*`` (the release keeps
                                                                  it in its bridge; ours in the decoder)
``audio_decoder.dconv1.conv.{weight,bias}``    [a, a, k], [a]     ``decoder.dconv1.conv.*`` (ConvTranspose1d, stride 4)
``audio_decoder.dconv1.norm.{weight,bias}``    [a]                ``decoder.dconv1.norm.*`` (GroupNorm(1))
``audio_decoder.positional_embedding``         [P, a] buffer      ``decoder.positional_embedding`` (sinusoids)
``audio_decoder.layers.{i}.self_attn.k_proj.weight``  [a, a]      ``decoder.layers.{i}.self_attn.k_proj.weight`` (no
                                                                  bias)
``audio_decoder.layers.{i}.self_attn.{q,v,out}_proj.{weight,bias}``  [a, a], [a]  ``decoder.layers.{i}.self_attn.*``
``audio_decoder.layers.{i}.{self_attn_layer_norm,final_layer_norm}.{weight,bias}``  [a]  ``decoder.layers.{i}.*``
``audio_decoder.layers.{i}.fc1.{weight,bias}`` [f, a], [f]        ``decoder.layers.{i}.fc1.*`` (fc2: [a, f], [a])
``audio_decoder.layer_norm.{weight,bias}``     [a]                ``decoder.layer_norm.*``
``audio_decoder.dconv2.conv.{weight,bias}``    [a, n_m, k], [n_m] ``decoder.dconv2.conv.*`` (stride 2)
``audio_decoder.dconv2.norm.{weight,bias}``    [n_m]              ``decoder.dconv2.norm.*``
``audio_decoder.post_net.layers.{3j}.{weight,bias}``  [c, n_m or c, 5], [c]  ``decoder.post_net.layers.{3j}.*``
                                                                  (conv j; ``{3j+1}``: its GroupNorm [c]; Mish between)
``audio_decoder.post_net.layers.{3J}.{weight,bias}``  [n_m, c, 1], [n_m]  the same (the 1×1 projector, J = layers - 1)

Not placed (``UNPLACED``; strict import stops on them, ``--partial`` loads the rest and lists them):

- with our default decoder layout, ``proj_decoder`` and ``audio_decoder.*`` above. Our default decoder
  (``audio_tokenizer.decoder.*``, trained by stage 0.1) is another network: ConvTranspose from A without
  ``proj_decoder``, ``nn.TransformerEncoderLayer`` (fused biased QKV, no positions), a ``to_mel`` Linear
  and a tanh conv refiner; it keeps its own weights on a ``--partial`` import.
- ``audio_tokenizer.audio_flow_matching_decoder.*`` (prenet + U-Net estimator): our flow decoder is a
  separate stage-0.2 module (trainer/flow_decoder.py), not part of this model, and another network: the
  release conditions on the 50 Hz states before ``dconv2`` through a pre-net (MLP 1280→2048→512, 12
  causal RMSNorm Whisper-style layers, RMSNorm, unbiased Linear→80) where ours has a 1×1 ``cond_proj``;
  its estimator is causal (left-padded convs, LayerNorm-over-channels blocks, diffusers-style attention
  with separate ``to_q/to_k/to_v``, one U-Net level ``[256]``, input ``[x_t, mu]`` without prompt
  channels) where ours is symmetric (GroupNorm blocks, fused ``to_qkv``); and it makes 50 Hz mels (24 kHz,
  hop 480) for a vocoder the checkpoint does not hold, ours 100 Hz mels for stage 0.3's HiFi-GAN.

Forward equivalence: the LLM layer is Qwen2's (RoPE with ``rotate_half``, GQA, biased q/k/v, unbiased
o_proj, SiLU-gated MLP, RMSNorm), which is the released ``DecoderLayer`` with ``W_pack`` split; the audio
head with the settings above computes the released ``OmniAudioHead`` (``tests/test_release_layout.py``
checks both against independent re-implementations of the released forward); the encoder layers are
HF Whisper's, the released ``OmniWhisperTransformerLayer`` math; ``ReleaseAudioDecoder`` computes the
released ``OmniAudioDecoder`` for a clip alone (the test checks it against an independent re-implementation;
in a padded batch its GroupNorms count each clip's frames, the release's the batch's padding too; its
post-net runs at the coarse mel's 100 Hz, the release's resamples to its vocoder_config rate first).
Ours → release writes the same table backwards; our default decoder and, for a non-matching config,
our extra tensors (e.g. bridge biases) have no released place.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

INDEX = "model.safetensors.index.json"
SHARD = "model-{i:05d}-of-{n:05d}.safetensors"

# released tensors our model has no place for (groups, for one-line reports)
UNPLACED = (
    "audio_tokenizer.audio_bridge_model.proj_decoder.",
    "audio_tokenizer.audio_decoder.",
    "audio_tokenizer.audio_flow_matching_decoder.",
)
# ours without a released place
OURS_UNPLACED = ("audio_tokenizer.decoder.",)

# the audio-head / bridge settings of the released structure, and our defaults
RELEASED_HEAD = {
    "norm": ("rms", "layer"),
    "bias": (True, False),
    "ffn_residual": ("normed", "prenorm"),
    "hidden_input": ("first", "every"),
    "unused_ffn_bias": (True, False),
    "ffn_mult": (2, 2),
}


class ReleaseLayoutError(ValueError):
    """Weights or a config that do not fit the other layout; the message names what (one line)."""


# ---------------------------------------------------------------- the name table


def _same(name: str) -> tuple[str, str]:
    return name, name


RENAMES: list[tuple[str, str]] = [  # (released, ours); {i} an index, {rest} any dotted tail; first match wins
    _same("model.embed_tokens.weight"),
    _same("model.norm.weight"),
    _same("lm_head.weight"),
    _same("model.layers.{i}.self_attn.o_proj.weight"),
    _same("model.layers.{i}.mlp.gate_proj.weight"),
    _same("model.layers.{i}.mlp.up_proj.weight"),
    _same("model.layers.{i}.mlp.down_proj.weight"),
    _same("model.layers.{i}.input_layernorm.weight"),
    _same("model.layers.{i}.post_attention_layernorm.weight"),
    _same("model.visual_model.{rest}"),
    _same("model.visual_bridge_model.{rest}"),
    _same("model.audio_embed_layers.{i}.weight"),
    (
        "audio_head.transformer_layers.{i}.self_attention.in_proj_weight",
        "audio_head.layers.{i}.attn.in_proj_weight",
    ),
    ("audio_head.transformer_layers.{i}.self_attention.in_proj_bias", "audio_head.layers.{i}.attn.in_proj_bias"),
    (
        "audio_head.transformer_layers.{i}.self_attention.out_proj.weight",
        "audio_head.layers.{i}.attn.out_proj.weight",
    ),
    ("audio_head.transformer_layers.{i}.self_attention.out_proj.bias", "audio_head.layers.{i}.attn.out_proj.bias"),
    ("audio_head.transformer_layers.{i}.layernorm1.weight", "audio_head.layers.{i}.norm1.weight"),
    ("audio_head.transformer_layers.{i}.layernorm2.weight", "audio_head.layers.{i}.norm2.weight"),
    ("audio_head.transformer_layers.{i}.linear1.bias", "audio_head.layers.{i}.linear1_bias"),
    ("audio_head.transformer_layers.{i}.linear2.bias", "audio_head.layers.{i}.linear2_bias"),
    ("audio_head.headnorm.weight", "audio_head.norm.weight"),
    ("audio_head.heads.{i}.weight", "audio_head.classifiers.{i}.weight"),
    ("audio_head.heads.{i}.bias", "audio_head.classifiers.{i}.bias"),
    ("audio_tokenizer.audio_model.positional_embedding", "audio_tokenizer.encoder.embed_positions.weight"),
    ("audio_tokenizer.audio_model.{rest}", "audio_tokenizer.encoder.{rest}"),
    ("audio_tokenizer.audio_bridge_model.gate_proj.weight", "audio_tokenizer.bridge.gate_proj.weight"),
    ("audio_tokenizer.audio_bridge_model.up_proj.weight", "audio_tokenizer.bridge.up_proj.weight"),
    ("audio_tokenizer.audio_bridge_model.down_proj.weight", "audio_tokenizer.bridge.down_proj.weight"),
    ("audio_tokenizer.audio_bridge_model.layer_norm.weight", "audio_tokenizer.bridge.norm.weight"),
    ("audio_tokenizer.audio_bridge_model.layer_norm.bias", "audio_tokenizer.bridge.norm.bias"),
    ("audio_tokenizer.audio_bridge_model.vq_list.{i}.codebook.embed", "audio_tokenizer.quantizer.layers.{i}.embed"),
    (
        "audio_tokenizer.audio_bridge_model.vq_list.{i}.codebook.embed_avg",
        "audio_tokenizer.quantizer.layers.{i}.embed_avg",
    ),
    (
        "audio_tokenizer.audio_bridge_model.vq_list.{i}.codebook.cluster_size",
        "audio_tokenizer.quantizer.layers.{i}.cluster_size",
    ),
]

# the reconstruction decoder: placed only when the model config builds the released one
# (``audio.decoder.layout: release``: trainer/model.py ReleaseAudioDecoder, the released parameter names)
DECODER_RENAMES: list[tuple[str, str]] = [
    ("audio_tokenizer.audio_bridge_model.proj_decoder.weight", "audio_tokenizer.decoder.proj_decoder.weight"),
    ("audio_tokenizer.audio_bridge_model.proj_decoder.bias", "audio_tokenizer.decoder.proj_decoder.bias"),
    ("audio_tokenizer.audio_decoder.{rest}", "audio_tokenizer.decoder.{rest}"),
]

W_PACK = re.compile(r"model\.layers\.(\d+)\.self_attn\.W_pack\.(weight|bias)")
QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
LINEAR = re.compile(r"audio_head\.transformer_layers\.(\d+)\.linear([12])\.weight")
DEPTH_W = re.compile(r"audio_head\.layers\.(\d+)\.(w_in|w_out)")


def _pattern(template: str) -> re.Pattern[str]:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(rx)


_FORWARD = [(_pattern(r), o) for r, o in RENAMES]
_BACKWARD = [(_pattern(o), r) for r, o in RENAMES]
_DEC_FORWARD = [(_pattern(r), o) for r, o in DECODER_RENAMES]
_DEC_BACKWARD = [(_pattern(o), r) for r, o in DECODER_RENAMES]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for rx, template in table:
        m = rx.fullmatch(name)
        if m:
            groups = m.groupdict()
            return template.replace("{i}", groups.get("i") or "").replace("{rest}", groups.get("rest") or "")
    return None


# ---------------------------------------------------------------- sizes from the model config


def _llm_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    llm = model_cfg.get("llm") or {}
    c = dict(llm.get("config") or {})
    if "num_attention_heads" not in c and llm.get("pretrained"):
        path = Path(str(llm["pretrained"])) / "config.json"
        if path.is_file():
            c = json.loads(path.read_text(encoding="utf-8"))
    for key in ("hidden_size", "num_attention_heads"):
        if key not in c:
            raise ReleaseLayoutError(f"the model config gives no llm.config.{key}: cannot split or fuse W_pack")
    return c


def llm_dims(model_cfg: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(d, H, K, hd)``: width, query heads, key-value heads, head dim of the LLM."""
    c = _llm_config(model_cfg)
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or d // heads)
    return d, heads, kv, hd


def _n_q(model_cfg: Mapping[str, Any]) -> int:
    return len((model_cfg.get("audio") or {}).get("codebook_sizes") or [])


def release_decoder(model_cfg: Mapping[str, Any]) -> bool:
    """Whether the model config builds the released reconstruction decoder (``audio.decoder.layout: release``)."""
    return ((model_cfg.get("audio") or {}).get("decoder") or {}).get("layout", "default") == "release"


def ours_unplaced(model_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """Prefixes of our tensors that have no released place under ``model_cfg`` (our default decoder's)."""
    return () if release_decoder(model_cfg) else OURS_UNPLACED


def _decoder_hint(names: list[str], model_cfg: Mapping[str, Any]) -> str:
    decoder = ("audio_tokenizer.decoder.", "audio_tokenizer.audio_decoder.", UNPLACED[0])
    hint = ""
    if not release_decoder(model_cfg) and any(n.startswith(decoder) for n in names):
        hint += " (audio.decoder.layout: release builds the released reconstruction decoder)"
    if any(n.startswith(UNPLACED[2]) for n in names):
        hint += " (the released flow-matching decoder is another network than stage 0.2's: trainer/release.py)"
    return hint


def release_mismatches(model_cfg: Mapping[str, Any]) -> list[str]:
    """Settings of ``model_cfg`` under which our model does not compute what the released one does."""
    head = model_cfg.get("audio_head") or {}
    out = [
        f"audio_head.{key} is {head.get(key, default)!r} (released: {want!r})"
        for key, (want, default) in RELEASED_HEAD.items()
        if head.get(key, default) != want
    ]
    bridge = ((model_cfg.get("audio") or {}).get("bridge") or {}).get("bias", True)
    if bridge:
        out.append(f"audio.bridge.bias is {bridge!r} (released: False)")
    return out


# ---------------------------------------------------------------- the two directions


def _summary(keys: list[str], groups: tuple[str, ...]) -> str:
    grouped: dict[str, int] = {}
    single: list[str] = []
    for k in keys:
        g = next((p for p in groups if k.startswith(p)), None)
        if g is None:
            single.append(k)
        else:
            grouped[g] = grouped.get(g, 0) + 1
    parts = [f"{g}* ({n})" for g, n in grouped.items()]
    more = f" (+{len(single) - 8} more)" if len(single) > 8 else ""
    parts += single[:8]
    return ", ".join(parts) + more


def _split_wpack(name: str, t: torch.Tensor, dims: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
    _, heads, kv, hd = dims
    sizes = [heads * hd, kv * hd, kv * hd]
    if t.shape[0] != sum(sizes):
        raise ReleaseLayoutError(
            f"{name} has {t.shape[0]} rows; the model config's {heads} heads, {kv} key-value heads of {hd} "
            f"need {sum(sizes)} (q {sizes[0]} + k {sizes[1]} + v {sizes[2]})"
        )
    layer, kind = W_PACK.fullmatch(name).groups()  # type: ignore[union-attr]
    q, k, v = torch.split(t, sizes, dim=0)
    return {f"model.layers.{layer}.self_attn.{p}_proj.{kind}": x for p, x in zip("qkv", (q, k, v), strict=True)}


def map_release_to_ours(
    state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """``(ours, origin, unplaced)``: the tensors under our names, the released name(s) each came from, and
    the released names with no place. Values are views of the inputs (split/permute), never changed."""
    dims = llm_dims(model_cfg)
    d, n_q = dims[0], _n_q(model_cfg)
    with_decoder = release_decoder(model_cfg)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, list[str]] = {}
    unplaced: list[str] = []
    for name, t in state.items():
        if W_PACK.fullmatch(name):
            parts = _split_wpack(name, t, dims)
        elif m := LINEAR.fullmatch(name):
            layer, which = m.groups()
            if t.dim() != 2 or n_q == 0 or t.shape[1] % n_q:
                raise ReleaseLayoutError(f"{name} has shape {tuple(t.shape)}: not [F, {n_q}·width] for {n_q} codebooks")
            if which == "1":  # [F, n_q·d] -> w_in [n_q, d, F]
                parts = {f"audio_head.layers.{layer}.w_in": t.view(t.shape[0], n_q, -1).permute(1, 2, 0)}
            else:  # [d, n_q·F] -> w_out [n_q, F, d]
                parts = {f"audio_head.layers.{layer}.w_out": t.view(t.shape[0], n_q, -1).permute(1, 2, 0)}
            if which == "1" and t.shape[1] != n_q * d:
                raise ReleaseLayoutError(f"{name} has shape {tuple(t.shape)}: not [F, {n_q}·{d}]")
        else:
            ours = _rename(name, _FORWARD)
            if ours is None and with_decoder:
                ours = _rename(name, _DEC_FORWARD)
            if ours is None:
                unplaced.append(name)
                continue
            parts = {ours: t}
        for k, v in parts.items():
            out[k] = v
            origin.setdefault(k, []).append(name)
    return out, origin, unplaced


def map_ours_to_release(
    state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(released, unplaced)``: the released names and tensors for our ``state``, and our names with no
    released place. q/k/v are fused into ``W_pack`` only when all three of a layer are there."""
    _, heads, kv, hd = llm_dims(model_cfg)
    with_decoder = release_decoder(model_cfg)
    out: dict[str, torch.Tensor] = {}
    unplaced: list[str] = []
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for name, t in state.items():
        if m := QKV.fullmatch(name):
            layer, p, kind = m.groups()
            qkv.setdefault((layer, kind), {})[p] = (name, t)
        elif m := DEPTH_W.fullmatch(name):
            layer, which = m.groups()
            if t.dim() != 3:
                raise ReleaseLayoutError(f"{name} has shape {tuple(t.shape)}: not [n_q, in, out]")
            # w_in [n_q, d, F] -> linear1 [F, n_q·d]; w_out [n_q, F, d] -> linear2 [d, n_q·F]
            fused = t.permute(2, 0, 1).reshape(t.shape[2], -1)
            out[f"audio_head.transformer_layers.{layer}.linear{'1' if which == 'w_in' else '2'}.weight"] = fused
        else:
            rel = _rename(name, _BACKWARD)
            if rel is None and with_decoder:
                rel = _rename(name, _DEC_BACKWARD)
            if rel is None:
                unplaced.append(name)
            else:
                out[rel] = t
    sizes = {"q": heads * hd, "k": kv * hd, "v": kv * hd}
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unplaced += [n for n, _ in parts.values()]
            continue
        for p, (n, t) in parts.items():
            if t.shape[0] != sizes[p]:
                raise ReleaseLayoutError(
                    f"{n} has {t.shape[0]} rows; the model config's heads ({heads} q, {kv} kv of {hd}) need {sizes[p]}"
                )
        out[f"model.layers.{layer}.self_attn.W_pack.{kind}"] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
    return out, unplaced


def release_name(ours: str) -> str | None:
    """The released name an our-side tensor comes from (q/k/v: their ``W_pack``), for messages."""
    if m := QKV.fullmatch(ours):
        return f"model.layers.{m.group(1)}.self_attn.W_pack.{m.group(3)}"
    if m := DEPTH_W.fullmatch(ours):
        return f"audio_head.transformer_layers.{m.group(1)}.linear{'1' if m.group(2) == 'w_in' else '2'}.weight"
    return _rename(ours, _BACKWARD) or _rename(ours, _DEC_BACKWARD)


def release_to_ours(
    state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], partial: bool = False
) -> dict[str, torch.Tensor]:
    """The released ``state`` under our names (exact). Released tensors without a place in our model are an
    error naming them, or with ``partial`` left out."""
    out, _, unplaced = map_release_to_ours(state, model_cfg)
    if unplaced and not partial:
        raise ReleaseLayoutError(
            f"{len(unplaced)} released tensors have no place in our model: {_summary(unplaced, UNPLACED)}"
            + _decoder_hint(unplaced, model_cfg)
        )
    return out


def ours_to_release(
    state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], partial: bool = False
) -> dict[str, torch.Tensor]:
    """Our ``state`` in the released layout (exact; fused tensors are new, the rest views of the inputs).
    Our tensors without a released place are an error naming them, or with ``partial`` left out."""
    out, unplaced = map_ours_to_release(state, model_cfg)
    if unplaced and not partial:
        raise ReleaseLayoutError(
            f"{len(unplaced)} of our tensors have no place in the released layout: {_summary(unplaced, OURS_UNPLACED)}"
            + _decoder_hint(unplaced, model_cfg)
        )
    return out


# ---------------------------------------------------------------- files


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, config.json or {})`` of a released checkpoint directory: ``model.safetensors.index.json``
    with its shards, or every ``*.safetensors`` in it."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise ReleaseLayoutError(f"no release directory {p}")
    weight_map = None
    if (p / INDEX).is_file():
        try:
            weight_map = json.loads((p / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as e:
            raise ReleaseLayoutError(f"unreadable {p / INDEX}: {e}") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        raise ReleaseLayoutError(f"{p} holds no safetensors ({INDEX} with its shards, or *.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (p / f).is_file():
            raise ReleaseLayoutError(f"{p / INDEX} names {f}, which is missing")
        try:
            part = load_file(str(p / f))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise ReleaseLayoutError(f"{p / f}: unreadable safetensors ({e})") from e
        dup = part.keys() & state.keys()
        if dup:
            raise ReleaseLayoutError(f"{sorted(dup)[0]} is stored twice in {p}")
        state.update(part)
    if weight_map is not None and set(weight_map) != set(state):
        lost = sorted(set(weight_map) - set(state))
        raise ReleaseLayoutError(f"{p / INDEX} lists tensors its shards lack: {', '.join(lost[:5])}")
    config: dict[str, Any] = {}
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except ValueError as e:
            raise ReleaseLayoutError(f"unreadable {p / 'config.json'}: {e}") from e
    return state, config


def parse_size(size: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ReleaseLayoutError(f"--max-shard-size {size!r}: a size like 5GB, 500MB, 2GiB or bytes")
    unit = (m.group(2) or "B").upper()
    scale = (
        1
        if unit == "B"
        else (2 ** (10 * "KMGT".index(unit[0]) + 10) if "I" in unit else 10 ** (3 * "KMGT".index(unit[0]) + 3))
    )
    n = int(float(m.group(1)) * scale)
    if n < 1:
        raise ReleaseLayoutError(f"--max-shard-size {size!r} must be positive")
    return n


def write_release(state: Mapping[str, torch.Tensor], out: str | Path, max_bytes: int = 5 * 10**9) -> dict[str, Any]:
    """Safetensors shards (at most ``max_bytes`` each, a larger tensor alone) + ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    plan: list[list[str]] = [[]]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if plan[-1] and size + n > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(plan, 1):
        file = SHARD.format(i=i, n=len(plan))
        tensors = {k: state[k].detach().contiguous().clone() for k in names}  # views share storage: copy
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _check_release_config(config: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> None:
    """The release's own config.json (when there is one) against ours, for what a shape check cannot see."""
    c = _llm_config(model_cfg)
    d, heads, kv, hd = llm_dims(model_cfg)
    theirs = {
        "hidden_size": config.get("hidden_size"),
        "num_attention_heads": config.get("num_attention_heads"),
        "num_key_value_heads": config.get("num_key_value_heads") or config.get("num_attention_heads"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }
    ours = {"hidden_size": d, "num_attention_heads": heads, "num_key_value_heads": kv}
    ours["num_hidden_layers"] = c.get("num_hidden_layers")
    bad = [f"{k} {theirs[k]} (ours {ours[k]})" for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
    if bad:
        raise ReleaseLayoutError(f"the release's config.json does not match the model config: {', '.join(bad)}")


def _dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _no_pretrained(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: None if (k == "pretrained" or k.endswith("_pretrained")) else _no_pretrained(v) for k, v in node.items()
        }
    return node


def _with_vocab(model_cfg: Mapping[str, Any], rows: int | None) -> dict[str, Any]:
    """The config the conversion builds and records: self-contained (the LLM's sizes written out, no
    pretrained paths: every weight comes from the checkpoint) and the vocabulary the weights have."""
    cfg = copy.deepcopy(dict(model_cfg))
    llm = cfg.setdefault("llm", {})
    if llm.get("pretrained"):
        file_only = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path")
        found = {k: v for k, v in _llm_config(cfg).items() if k not in file_only}
        llm["config"] = {**found, **(llm.get("config") or {})}
    cfg = _no_pretrained(cfg)
    c = cfg["llm"].setdefault("config", {})
    if c.get("vocab_size") is None and rows is not None:
        c["vocab_size"] = int(rows)
    return cfg


def _build(model_cfg: dict[str, Any], dtype: torch.dtype | None = None, device: str | None = None) -> Any:
    from trainer.model import build_model

    if dtype is None:
        return build_model(model_cfg, device=device)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_model(model_cfg, device=device)
    finally:
        torch.set_default_dtype(old)


def import_release(
    release_dir: str | Path,
    model_cfg: Mapping[str, Any],
    out_dir: str | Path,
    partial: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Convert a released checkpoint into ``out_dir/model.pt`` (our full state dict; released tensors as
    stored) + ``done.json``: an export a stage starts from with ``init_from: OUT_DIR``. Strict unless
    ``partial``: every released tensor must find its place and every tensor of ours (but our default
    reconstruction decoder, which has no released counterpart; ``audio.decoder.layout: release`` builds
    the released one, which must come from the release) must come from the release. Loads
    through ``trainer.weights.load_into``, which checks names and shapes. Returns ``done.json``."""
    from trainer.weights import load_into

    state, config = read_release(release_dir)
    emb = state.get("model.embed_tokens.weight")
    cfg = _with_vocab(model_cfg, None if emb is None else emb.shape[0])
    if config:
        _check_release_config(config, cfg)
    problems = release_mismatches(cfg)
    if problems and not partial:
        raise ReleaseLayoutError("the model config does not build the released structure: " + "; ".join(problems))
    mapped, origin, unplaced = map_release_to_ours(state, cfg)
    dtype = _dominant_dtype(state)
    model = _build(cfg, dtype)
    own = model.state_dict()
    for k in [k for k in mapped if k not in own]:  # a released name our model (this config) lacks
        unplaced += origin[k]
        del mapped[k]
    unplaced = sorted(set(unplaced))
    if unplaced and not partial:
        raise ReleaseLayoutError(
            f"{len(unplaced)} released tensors have no place in our model: {_summary(unplaced, UNPLACED)} "
            f"(--partial loads the rest){_decoder_hint(unplaced, cfg)}"
        )
    skip = ours_unplaced(cfg)  # our default decoder never comes from the release; the released-layout one does
    lacking = sorted({release_name(k) or k for k in own if k not in mapped and not (skip and k.startswith(skip))})
    if lacking and not partial:
        more = f" (+{len(lacking) - 8} more)" if len(lacking) > 8 else ""
        raise ReleaseLayoutError(
            f"{release_dir} lacks {len(lacking)} released tensors the model needs: {', '.join(lacking[:8])}{more}"
        )
    notes = []
    if config.get("use_norm_head") and "lm_head.weight" in mapped:
        w = mapped["lm_head.weight"]
        mapped["lm_head.weight"] = torch.nn.functional.normalize(w.float(), dim=-1).to(w.dtype)
        notes.append("lm_head rows L2-normalised (the release's use_norm_head)")
    # completeness is checked above (our default decoder never comes from the release); names and shapes here
    load_into(model, mapped, strict=False, what=f"the weights of {release_dir}")
    kept = sorted(k for k in own if k not in mapped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the released tensors as stored (their dtypes too), ours where the release has none
    saved = {k: mapped[k].contiguous() if k in mapped else v for k, v in model.state_dict().items()}
    tmp = out / ".model.pt.tmp"
    torch.save(saved, tmp)
    tmp.replace(out / "model.pt")  # a stage never starts from a half-written file
    record = {
        "stage": "import",
        "task": "llm",
        "steps": 0,
        "imported_from": str(Path(release_dir).resolve()),
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": len(state),
        "placed": len(state) - len(unplaced),
        "unplaced": unplaced,
        "not_from_release": kept,
        "mismatches": problems,
        "notes": notes,
        "model_config": cfg,
        "tokenizer": (cfg.get("tokenizer") or {}).get("path"),
    }
    (out / "done.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    say(
        f"{out / 'model.pt'}: {record['placed']} of {len(state)} released tensors placed ({record['dtype']})"
        + (f"; not placed: {_summary(unplaced, UNPLACED)}" if unplaced else "")
        + (f"; {len(kept)} of ours keep their own weights ({_summary(kept, OURS_UNPLACED)})" if kept else "")
        + "".join(f"; {n}" for n in notes)
    )
    return record


def export_release(
    model_pt: str | Path,
    model_cfg: Mapping[str, Any],
    out_dir: str | Path,
    partial: bool = False,
    max_bytes: int = 5 * 10**9,
    say: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Our ``model.pt`` (a stage export, or an import's) in the released layout: shards + index in
    ``out_dir``. The state is checked against the model the config builds (names and shapes) first."""
    from trainer.weights import WeightsMismatch, check_fits

    p = Path(model_pt)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise ReleaseLayoutError(f"no model.pt at {model_pt}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or non-tensor file
        raise ReleaseLayoutError(f"{p}: unreadable weights ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleaseLayoutError(f"{p} is not a state dict of tensors")
    emb = state.get("model.embed_tokens.weight")
    cfg = _with_vocab(model_cfg, None if emb is None else emb.shape[0])
    try:
        check_fits(_build(cfg, device="meta"), state, strict=True, what=str(p))
    except WeightsMismatch as e:
        raise ReleaseLayoutError(str(e)) from e
    problems = release_mismatches(cfg)
    if problems and not partial:
        raise ReleaseLayoutError("the model config does not build the released structure: " + "; ".join(problems))
    rel, unplaced = map_ours_to_release(state, cfg)
    if unplaced and not partial:
        raise ReleaseLayoutError(
            f"{len(unplaced)} of our tensors have no place in the released layout: "
            f"{_summary(unplaced, OURS_UNPLACED)} (--partial writes the rest){_decoder_hint(unplaced, cfg)}"
        )
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("*.safetensors*")):
        raise ReleaseLayoutError(f"{out} already holds safetensors: give an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    index = write_release(rel, out, max_bytes)
    shards = len(set(index["weight_map"].values()))
    say(
        f"{out}: {len(rel)} tensors in the released layout, {shards} shard(s)"
        + (f"; not written: {_summary(sorted(unplaced), OURS_UNPLACED)}" if unplaced else "")
    )
    return {"tensors": len(rel), "shards": shards, "unplaced": sorted(unplaced), "mismatches": problems}
