"""``omni import``: a tiny checkpoint in the released Baichuan-Omni-1.5 layout (names and shapes written
out here from the released modeling code, independently of trainer/release.py) imports into our model,
computes what the released forward computes (LLM with fused ``W_pack``, the audio head, the reconstruction
decoder), and goes back to the released layout bit-exactly; mistakes are one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from trainer.cli import main
from trainer.generate import head_logits_incremental
from trainer.model import build_model
from trainer.release import map_ours_to_release, map_release_to_ours, release_to_ours
from trainer.stages import load_model_config

REPO = Path(__file__).resolve().parents[1]

# tiny sizes: LLM width, heads, kv heads, head dim, FFN, vocabulary, layers
D, H, K, HD, FFN, V, L = 64, 4, 2, 16, 176, 128, 2
E, A_W, MELS, A_FFN = 32, 32, 128, 64  # ViT width, Whisper width, mel bins, Whisper FFN
SIZES = [64, 32, 16, 16, 16, 16, 16, 16]  # codebooks
NQ, HEAD_LAYERS, HEAD_HEADS = len(SIZES), 2, 4
WIDE = 4 * A_W  # the 12.5 Hz bridge / RVQ width
EPS = 1e-6
# the reconstruction decoder (tiny.yaml's audio.decoder): layers, heads, FFN, kernel, post-net channels and
# layers, mel bins, stored positions (30 s of 10 ms frames)
DEC_L, DEC_H, DEC_FFN, DEC_K, POST_C, POST_L, N_MEL, POS = 1, 2, 64, 8, 16, 5, 80, 3000


def release_config() -> dict:
    """The tiny model with the released structure (what conf/models/baichuan-omni-1.5.yaml sets at size)."""
    cfg = load_model_config("tiny")
    cfg["llm"]["config"]["vocab_size"] = V
    cfg["audio_head"] = {
        "layers": HEAD_LAYERS,
        "heads": HEAD_HEADS,
        "ffn_mult": 2,
        "loss_weight": 1.0,
        "norm": "rms",
        "bias": True,
        "ffn_residual": "normed",
        "hidden_input": "first",
        "unused_ffn_bias": True,
    }
    cfg["audio"]["bridge"] = {"bias": False}
    cfg["audio"]["decoder"].update(layout="release", kernel_size=DEC_K)
    return cfg


def released_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the released OmniForCausalLM at the tiny sizes, from modeling_omni.py (Attention with
    W_pack and qkv bias, DecoderLayer, OmniModel, OmniAudioHead/CasualDepthTransformerLayer),
    visual_modeling_omni.py (Qwen2-VL NaViT without merger, OmniVisualBridge), audio_modeling_omni.py
    (OmniAudioEncoder, OmniAudioVQBridgeTokenizer) and vector_quantize.py (EuclideanCodebook)."""
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        s[p + "self_attn.W_pack.weight"] = ((H + 2 * K) * HD, D)
        s[p + "self_attn.W_pack.bias"] = ((H + 2 * K) * HD,)
        s[p + "self_attn.o_proj.weight"] = (D, H * HD)
        s[p + "mlp.gate_proj.weight"] = (FFN, D)
        s[p + "mlp.up_proj.weight"] = (FFN, D)
        s[p + "mlp.down_proj.weight"] = (D, FFN)
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
    v = "model.visual_model."
    s[v + "patch_embed.proj.weight"] = (E, 3, 2, 14, 14)
    for n in ("norm1", "norm2"):
        s[f"{v}blocks.0.{n}.weight"] = (E,)
        s[f"{v}blocks.0.{n}.bias"] = (E,)
    s[v + "blocks.0.attn.qkv.weight"], s[v + "blocks.0.attn.qkv.bias"] = (3 * E, E), (3 * E,)
    s[v + "blocks.0.attn.proj.weight"], s[v + "blocks.0.attn.proj.bias"] = (E, E), (E,)
    s[v + "blocks.0.mlp.fc1.weight"], s[v + "blocks.0.mlp.fc1.bias"] = (2 * E, E), (2 * E,)  # mlp_ratio 2
    s[v + "blocks.0.mlp.fc2.weight"], s[v + "blocks.0.mlp.fc2.bias"] = (E, 2 * E), (E,)
    b = "model.visual_bridge_model."
    s[b + "ln_q.weight"], s[b + "ln_q.bias"] = (E,), (E,)
    s[b + "mlp.0.weight"], s[b + "mlp.0.bias"] = (4 * E, 4 * E), (4 * E,)
    s[b + "mlp.2.weight"], s[b + "mlp.2.bias"] = (D, 4 * E), (D,)
    for j, size in enumerate(SIZES):
        s[f"model.audio_embed_layers.{j}.weight"] = (size + 1, D)
    for i in range(HEAD_LAYERS):
        p = f"audio_head.transformer_layers.{i}."
        s[p + "self_attention.in_proj_weight"], s[p + "self_attention.in_proj_bias"] = (3 * D, D), (3 * D,)
        s[p + "self_attention.out_proj.weight"], s[p + "self_attention.out_proj.bias"] = (D, D), (D,)
        s[p + "layernorm1.weight"], s[p + "layernorm2.weight"] = (D,), (D,)
        s[p + "linear1.weight"], s[p + "linear1.bias"] = (2 * D, NQ * D), (2 * D,)
        s[p + "linear2.weight"], s[p + "linear2.bias"] = (D, NQ * 2 * D), (D,)
    s["audio_head.headnorm.weight"] = (D,)
    for j, size in enumerate(SIZES):
        s[f"audio_head.heads.{j}.weight"], s[f"audio_head.heads.{j}.bias"] = (size + 1, D), (size + 1,)
    a = "audio_tokenizer.audio_model."
    s[a + "conv1.weight"], s[a + "conv1.bias"] = (A_W, MELS, 3), (A_W,)
    s[a + "conv2.weight"], s[a + "conv2.bias"] = (A_W, A_W, 3), (A_W,)
    s[a + "positional_embedding"] = (1500, A_W)
    s[a + "layers.0.self_attn.k_proj.weight"] = (A_W, A_W)
    for n in ("q_proj", "v_proj", "out_proj"):
        s[f"{a}layers.0.self_attn.{n}.weight"], s[f"{a}layers.0.self_attn.{n}.bias"] = (A_W, A_W), (A_W,)
    for n in ("self_attn_layer_norm", "final_layer_norm"):
        s[f"{a}layers.0.{n}.weight"], s[f"{a}layers.0.{n}.bias"] = (A_W,), (A_W,)
    s[a + "layers.0.fc1.weight"], s[a + "layers.0.fc1.bias"] = (A_FFN, A_W), (A_FFN,)
    s[a + "layers.0.fc2.weight"], s[a + "layers.0.fc2.bias"] = (A_W, A_FFN), (A_W,)
    s[a + "layer_norm.weight"], s[a + "layer_norm.bias"] = (A_W,), (A_W,)
    r = "audio_tokenizer.audio_bridge_model."
    s[r + "gate_proj.weight"], s[r + "up_proj.weight"] = (WIDE, A_W, 4), (WIDE, A_W, 4)
    s[r + "down_proj.weight"] = (WIDE, WIDE)
    s[r + "layer_norm.weight"], s[r + "layer_norm.bias"] = (WIDE,), (WIDE,)
    for j, size in enumerate(SIZES):
        c = f"{r}vq_list.{j}.codebook."
        s[c + "embed"], s[c + "embed_avg"], s[c + "cluster_size"] = (size, WIDE), (size, WIDE), (size,)
    s["lm_head.weight"] = (V, D)
    return s


def released_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """The reconstruction decoder of audio_modeling_omni.py at the tiny sizes: OmniAudioVQBridgeTokenizer's
    proj_decoder, OmniAudioDecoder (CasualConvTranspose1d dconv1/dconv2 = ConvTranspose1d + GroupNorm(1),
    the sinusoid buffer, causal OmniWhisperTransformerLayers, layer_norm) and MelSpecRefineNet's post_net
    (an nn.Sequential of Conv1d k5 / GroupNorm / Mish triples, then a 1x1 Conv1d)."""
    s: dict[str, tuple[int, ...]] = {}
    s["audio_tokenizer.audio_bridge_model.proj_decoder.weight"] = (A_W, WIDE)
    s["audio_tokenizer.audio_bridge_model.proj_decoder.bias"] = (A_W,)
    a = "audio_tokenizer.audio_decoder."
    s[a + "dconv1.conv.weight"], s[a + "dconv1.conv.bias"] = (A_W, A_W, DEC_K), (A_W,)  # ConvTranspose: [in, out, k]
    s[a + "dconv1.norm.weight"], s[a + "dconv1.norm.bias"] = (A_W,), (A_W,)
    s[a + "positional_embedding"] = (POS, A_W)
    for i in range(DEC_L):
        p = f"{a}layers.{i}."
        s[p + "self_attn.k_proj.weight"] = (A_W, A_W)
        for n in ("q_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{n}.weight"], s[f"{p}self_attn.{n}.bias"] = (A_W, A_W), (A_W,)
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            s[f"{p}{n}.weight"], s[f"{p}{n}.bias"] = (A_W,), (A_W,)
        s[p + "fc1.weight"], s[p + "fc1.bias"] = (DEC_FFN, A_W), (DEC_FFN,)
        s[p + "fc2.weight"], s[p + "fc2.bias"] = (A_W, DEC_FFN), (A_W,)
    s[a + "layer_norm.weight"], s[a + "layer_norm.bias"] = (A_W,), (A_W,)
    s[a + "dconv2.conv.weight"], s[a + "dconv2.conv.bias"] = (A_W, N_MEL, DEC_K), (N_MEL,)
    s[a + "dconv2.norm.weight"], s[a + "dconv2.norm.bias"] = (N_MEL,), (N_MEL,)
    c_in = N_MEL
    for j in range(POST_L - 1):
        s[f"{a}post_net.layers.{3 * j}.weight"], s[f"{a}post_net.layers.{3 * j}.bias"] = (POST_C, c_in, 5), (POST_C,)
        s[f"{a}post_net.layers.{3 * j + 1}.weight"], s[f"{a}post_net.layers.{3 * j + 1}.bias"] = (POST_C,), (POST_C,)
        c_in = POST_C
    last = 3 * (POST_L - 1)
    s[f"{a}post_net.layers.{last}.weight"], s[f"{a}post_net.layers.{last}.bias"] = (N_MEL, POST_C, 1), (N_MEL,)
    return s


# the released reconstruction decoder: placed by audio.decoder.layout: release, by nothing else
DECODER = released_decoder_shapes()


def released_state(with_decoder: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = released_shapes() | (DECODER if with_decoder else {})
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.2
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
        if name.endswith(".weight") and ("norm" in module or module == "ln_q"):
            t = 1.0 + t  # norm scales near one
        state[name] = t
    return state


def save_release(state: dict[str, torch.Tensor], out: Path) -> Path:
    """Two shards + index, as the released repository stores them, and a config.json."""
    out.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), 1):
        file = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": K, "num_hidden_layers": L}
    (out / "config.json").write_text(json.dumps(config | {"use_norm_head": False, "attention_qkv_bias": True}))
    return out


def omni(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["import", *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---------------------------------------------------------------- independent released forwards


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def causal_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def released_llm(rel: dict[str, torch.Tensor], ids: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """modeling_omni.py's DecoderLayer stack: fused W_pack (q | k | v rows), RoPE (rotate_half), GQA by
    repeating each kv head, causal attention, o_proj, SiLU-gated MLP, RMSNorm; then norm and lm_head."""
    t = ids.shape[0]
    x = rel["model.embed_tokens.weight"][ids]
    inv = 1.0 / theta ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(z: torch.Tensor) -> torch.Tensor:
        return z * cos + torch.cat([-z[..., HD // 2 :], z[..., : HD // 2]], -1) * sin

    for i in range(L):
        p = f"model.layers.{i}."
        h = rms(x, rel[p + "input_layernorm.weight"])
        qkv = h @ rel[p + "self_attn.W_pack.weight"].T + rel[p + "self_attn.W_pack.bias"]
        q, k, v = qkv.split([H * HD, K * HD, K * HD], -1)
        q, k, v = (z.view(t, -1, HD).transpose(0, 1) for z in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)
        o = causal_softmax_attention(q, k, v).transpose(0, 1).reshape(t, H * HD)
        x = x + o @ rel[p + "self_attn.o_proj.weight"].T
        h = rms(x, rel[p + "post_attention_layernorm.weight"])
        gate, up = h @ rel[p + "mlp.gate_proj.weight"].T, h @ rel[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ rel[p + "mlp.down_proj.weight"].T
    x = rms(x, rel["model.norm.weight"])
    return x, x @ rel["lm_head.weight"].T


def released_audio_head(rel: dict[str, torch.Tensor], hidden: torch.Tensor, codes: torch.Tensor) -> list:
    """OmniAudioHead: [LLM state, cumsum of codes 0..n-2's embeddings] through CasualDepthTransformerLayer
    (RMSNorm, biased causal MHA, the normalised residual into the position-wise FFN whose weights are
    linear1/linear2 reshaped per codebook, their biases unused), headnorm, biased heads."""
    n_f = hidden.shape[0]
    embs = torch.stack([rel[f"model.audio_embed_layers.{j}.weight"][codes[:, j]] for j in range(NQ - 1)], 1)
    x = torch.cat([hidden[:, None], embs.cumsum(1)], 1)  # [F, n_q, d]
    for i in range(HEAD_LAYERS):
        p = f"audio_head.transformer_layers.{i}."
        h = rms(x, rel[p + "layernorm1.weight"])
        qkv = h @ rel[p + "self_attention.in_proj_weight"].T + rel[p + "self_attention.in_proj_bias"]
        q, k, v = (z.view(n_f, NQ, HEAD_HEADS, -1).transpose(1, 2) for z in qkv.chunk(3, -1))
        o = causal_softmax_attention(q, k, v).transpose(1, 2).reshape(n_f, NQ, D)
        res = x + o @ rel[p + "self_attention.out_proj.weight"].T + rel[p + "self_attention.out_proj.bias"]
        res = rms(res, rel[p + "layernorm2.weight"])
        w1 = rel[p + "linear1.weight"].reshape(2 * D, NQ, D)
        w2 = rel[p + "linear2.weight"].reshape(D, NQ, 2 * D)
        x = res + torch.einsum("blt,dlt->bld", F.gelu(torch.einsum("bld,tld->blt", res, w1)), w2)
    x = rms(x, rel["audio_head.headnorm.weight"])
    return [x[:, j] @ rel[f"audio_head.heads.{j}.weight"].T + rel[f"audio_head.heads.{j}.bias"] for j in range(NQ)]


def released_decoder(rel: dict[str, torch.Tensor], codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """OmniAudioTokenizer.decode for one clip's codes [N, n_q]: the codebooks' summed vectors through
    proj_decoder; dconv1 (ConvTranspose1d stride 4, GroupNorm(1) over the whole output, the last k - 4
    frames cut); + the stored positions; causal pre-LN Whisper layers (q/v/out biased, k not, exact GELU);
    layer_norm (the states before dconv2); dconv2 (stride 2) gives the coarse mel; the post-net (its
    resampling to the vocoder rate is the identity at 100 Hz) adds its conv stack to it.
    Returns (states before dconv2 [4N, a], coarse [80, 8N], refined [80, 8N])."""
    r, a = "audio_tokenizer.audio_bridge_model.", "audio_tokenizer.audio_decoder."
    vec = sum(rel[f"{r}vq_list.{j}.codebook.embed"][codes[:, j]] for j in range(NQ))
    x = vec @ rel[r + "proj_decoder.weight"].T + rel[r + "proj_decoder.bias"]

    def upsample(z: torch.Tensor, name: str, stride: int) -> torch.Tensor:  # [C, L] -> [C', stride * L]
        w, b = rel[f"{a}{name}.conv.weight"], rel[f"{a}{name}.conv.bias"]
        y = F.conv_transpose1d(z[None], w, b, stride=stride)
        y = F.group_norm(y, 1, rel[f"{a}{name}.norm.weight"], rel[f"{a}{name}.norm.bias"])
        return y[0, :, : y.shape[-1] - (DEC_K - stride)]

    def ln(z: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(z, (A_W,), rel[name + ".weight"], rel[name + ".bias"])

    h = upsample(x.T, "dconv1", 4).T
    t = h.shape[0]
    h = h + rel[a + "positional_embedding"][:t]
    for i in range(DEC_L):
        p = f"{a}layers.{i}."
        z = ln(h, p + "self_attn_layer_norm")
        q = z @ rel[p + "self_attn.q_proj.weight"].T + rel[p + "self_attn.q_proj.bias"]
        k = z @ rel[p + "self_attn.k_proj.weight"].T
        v = z @ rel[p + "self_attn.v_proj.weight"].T + rel[p + "self_attn.v_proj.bias"]
        q, k, v = (y.view(t, DEC_H, -1).transpose(0, 1) for y in (q, k, v))
        o = causal_softmax_attention(q, k, v).transpose(0, 1).reshape(t, A_W)
        h = h + o @ rel[p + "self_attn.out_proj.weight"].T + rel[p + "self_attn.out_proj.bias"]
        z = ln(h, p + "final_layer_norm")
        z = F.gelu(z @ rel[p + "fc1.weight"].T + rel[p + "fc1.bias"])
        h = h + z @ rel[p + "fc2.weight"].T + rel[p + "fc2.bias"]
    h = ln(h, a + "layer_norm")
    coarse = upsample(h.T, "dconv2", 2)
    y = coarse[None]
    for j in range(POST_L - 1):
        c = f"{a}post_net.layers.{3 * j}."
        n = f"{a}post_net.layers.{3 * j + 1}."
        y = F.conv1d(y, rel[c + "weight"], rel[c + "bias"], padding=2)
        y = F.mish(F.group_norm(y, 1, rel[n + "weight"], rel[n + "bias"]))
    last = f"{a}post_net.layers.{3 * (POST_L - 1)}."
    y = F.conv1d(y, rel[last + "weight"], rel[last + "bias"])
    return h, coarse, coarse + y[0]


# ---------------------------------------------------------------- tests


def test_released_names_and_shapes_map_onto_our_model_both_ways() -> None:
    cfg = release_config()
    model = build_model(cfg, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = released_shapes() | DECODER
    mapped, origin, unplaced = map_release_to_ours(released_state(), cfg)
    assert unplaced == [], "the release layout places every released tensor, the decoder's too"
    assert set(mapped) == set(ours), "and every tensor of ours comes from the release"
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    assert origin["model.layers.1.self_attn.k_proj.bias"] == ["model.layers.1.self_attn.W_pack.bias"]
    assert origin["audio_tokenizer.decoder.proj_decoder.weight"] == [
        "audio_tokenizer.audio_bridge_model.proj_decoder.weight"
    ]
    # and back: our model's tensors give exactly the released names and shapes
    state = {k: torch.zeros(v) for k, v in ours.items()}
    rel, left = map_ours_to_release(state, cfg)
    assert left == []
    assert {k: tuple(v.shape) for k, v in rel.items()} == spec

    # our default decoder (tiny's) is another network: the released decoder has no place, nor has ours
    default = release_config()
    default["audio"]["decoder"] = load_model_config("tiny")["audio"]["decoder"]
    own = {k: tuple(v.shape) for k, v in build_model(default, device="meta").state_dict().items()}
    decoder = {k for k in own if k.startswith("audio_tokenizer.decoder.")}
    mapped, _, unplaced = map_release_to_ours(released_state(), default)
    assert sorted(unplaced) == sorted(DECODER) and set(mapped) == set(own) - decoder
    rel, left = map_ours_to_release({k: torch.zeros(v) for k, v in own.items()}, default)
    assert sorted(left) == sorted(decoder) and set(rel) == set(released_shapes())


def test_import_computes_the_released_forward_and_round_trips_bit_exactly(tmp_path: Path, capsys) -> None:
    cfg = release_config()
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(cfg))
    rel = released_state()
    src = save_release(rel, tmp_path / "release")

    # strict: every released tensor placed, every tensor of ours (the decoder's too) from the release
    code, out, err = omni(
        str(src), "--model", str(tmp_path / "omni.yaml"), "--out", str(tmp_path / "imp"), capsys=capsys
    )
    assert code == 0, err
    assert f"{len(rel)} of {len(rel)} released tensors placed" in out
    done = json.loads((tmp_path / "imp" / "done.json").read_text())
    assert done["unplaced"] == [] and done["not_from_release"] == [] and done["model_config"] == cfg

    # what a stage with init_from: <dir> loads (trainer/stages.py export_path: <dir>/model.pt, strict)
    model = build_model(cfg)
    model.load_state_dict(torch.load(tmp_path / "imp" / "model.pt", weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(1))
        hidden = model.model(input_ids=ids[None], position_ids=torch.arange(12)[None], use_cache=False)
        hidden = hidden.last_hidden_state[0]
        ref_hidden, ref_logits = released_llm(rel, ids, cfg["llm"]["config"]["rope_theta"])
        torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.lm_head(hidden), ref_logits, rtol=1e-5, atol=1e-5)

        state = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
        codes = torch.stack([torch.randint(0, s + 1, (5,)) for s in SIZES], 1)
        ref = released_audio_head(rel, state, codes)
        ours = model.audio_head(state, model.embed_codes(codes))
        step = head_logits_incremental(model, state, codes)  # the generation path, one codebook at a time
        for r, o, s in zip(ref, ours, step, strict=True):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)

        # the reconstruction decoder: codes -> mel, and the flow decoder's condition
        tok = model.audio_tokenizer
        g = torch.Generator().manual_seed(3)
        clip = torch.stack([torch.randint(0, s, (6,), generator=g) for s in SIZES], 1)  # 6 frames
        ref_h, ref_coarse, ref_refined = released_decoder(rel, clip)
        q = tok.quantizer.dequantize(clip)[None]
        coarse, refined = tok.decoder(q)
        torch.testing.assert_close(coarse[0], ref_coarse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(refined[0], ref_refined, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.decode_mel(clip), ref_refined, rtol=1e-5, atol=1e-5)
        cond, mel = tok.decoder_states(clip[None])
        assert cond.shape == (1, 8 * 6, A_W) and mel.shape == (1, N_MEL, 8 * 6)
        torch.testing.assert_close(cond[0], ref_h.repeat_interleave(2, 0), rtol=1e-5, atol=1e-5)
        # a padded batch gives each clip what it gives alone
        short = clip[:4]
        both = torch.stack([clip, F.pad(short, (0, 0, 0, 2))])
        cond2, mel2 = tok.decoder_states(both, torch.tensor([6, 4]))
        alone_h, alone_mel = tok.decoder_states(short[None])
        torch.testing.assert_close(cond2[1, :32], alone_h[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mel2[1, :, :32], alone_mel[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mel2[0], mel[0], rtol=1e-5, atol=1e-5)

    # back to the released layout, strictly: every tensor identical (values and dtype)
    back = tmp_path / "back"
    args = ["--to-release", str(tmp_path / "imp"), "--model", str(tmp_path / "omni.yaml"), "--out", str(back)]
    code, out, err = omni(*args, "--max-shard-size", "100KB", capsys=capsys)
    assert code == 0, err
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    written = {}
    for f in set(index["weight_map"].values()):
        written.update(load_file(str(back / f)))
    assert set(written) == set(rel)
    for k, v in written.items():
        assert v.dtype == rel[k].dtype and torch.equal(v, rel[k]), k
    code, out, err = omni(*args, capsys=capsys)
    assert code == 2 and "already holds safetensors" in err

    # the functions alone: release -> ours -> release is the identity on every tensor
    again, left = map_ours_to_release(release_to_ours(rel, cfg), cfg)
    assert not left and set(again) == set(rel) and all(torch.equal(again[k], rel[k]) for k in rel)


def test_our_default_decoder_has_no_released_place(tmp_path: Path, capsys) -> None:
    """tiny's decoder layout: the released decoder is named and stops a strict import; --partial loads the
    rest and our decoder keeps its own weights; back, it is left out."""
    cfg = release_config()
    cfg["audio"]["decoder"] = load_model_config("tiny")["audio"]["decoder"]
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(cfg))
    rel = released_state()
    src = save_release(rel, tmp_path / "release")
    args = [str(src), "--model", str(tmp_path / "omni.yaml"), "--out", str(tmp_path / "imp")]
    code, out, err = omni(*args, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    n_dec = sum(k.startswith("audio_tokenizer.audio_decoder.") for k in DECODER)
    assert f"audio_tokenizer.audio_decoder.* ({n_dec})" in err and "proj_decoder.* (2)" in err
    assert "--partial" in err and "audio.decoder.layout: release" in err
    code, out, err = omni(*args, "--partial", capsys=capsys)
    assert code == 0, err
    assert f"{len(rel) - len(DECODER)} of {len(rel)} released tensors placed" in out
    done = json.loads((tmp_path / "imp" / "done.json").read_text())
    assert done["unplaced"] == sorted(DECODER)
    assert done["not_from_release"] and all(k.startswith("audio_tokenizer.decoder.") for k in done["not_from_release"])

    back = tmp_path / "back"
    args = ["--to-release", str(tmp_path / "imp"), "--model", str(tmp_path / "omni.yaml"), "--out", str(back)]
    code, out, err = omni(*args, capsys=capsys)
    assert code == 2 and "audio_tokenizer.decoder.*" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = omni(*args, "--partial", capsys=capsys)
    assert code == 0, err
    written = {}
    for f in set(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"].values()):
        written.update(load_file(str(back / f)))
    assert set(written) == set(rel) - set(DECODER) and all(torch.equal(v, rel[k]) for k, v in written.items())


def test_mistakes_are_one_line_errors(tmp_path: Path, capsys) -> None:
    cfg = release_config()
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(cfg))
    model = str(tmp_path / "omni.yaml")

    def run(state: dict, name: str, *extra: str) -> tuple[int, str, str]:
        src = save_release(state, tmp_path / name)
        return omni(str(src), "--model", *extra, "--out", str(tmp_path / f"{name}-out"), capsys=capsys)

    # pretrained tower paths play no part (nothing is read); a release without its decoder imports strictly
    # into our default decoder layout, not into the released one, which needs it
    towers = release_config()
    towers["vision"]["pretrained"] = str(tmp_path / "no-qwen2-vl")
    towers["audio"]["encoder_pretrained"] = str(tmp_path / "no-whisper")
    towers["audio"]["decoder"] = load_model_config("tiny")["audio"]["decoder"]
    (tmp_path / "towers.yaml").write_text(yaml.safe_dump(towers))
    code, out, err = run(released_state(with_decoder=False), "nodecoder", str(tmp_path / "towers.yaml"))
    assert code == 0, err
    done = json.loads((tmp_path / "nodecoder-out" / "done.json").read_text())
    assert done["unplaced"] == [] and done["model_config"]["vision"]["pretrained"] is None
    code, _, err = run(released_state(with_decoder=False), "nodecoder-release", model)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"lacks {len(DECODER)} released tensors the model needs" in err and "audio_decoder." in err

    lacking = released_state()
    del lacking["model.layers.1.self_attn.W_pack.bias"]
    code, _, err = run(lacking, "lacking", model)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "lacks 1 released tensors the model needs: model.layers.1.self_attn.W_pack.bias" in err

    flow = released_state()  # the released flow-matching decoder: no place (stage 0.2's is another network)
    flow["audio_tokenizer.audio_flow_matching_decoder.prenet.out_proj.weight"] = torch.zeros(N_MEL, 16)
    code, _, err = run(flow, "flow", model)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "audio_tokenizer.audio_flow_matching_decoder.* (1)" in err and "flow-matching decoder" in err
    code, out, err = omni(
        str(tmp_path / "flow"), "--model", model, "--out", str(tmp_path / "flow-out"), "--partial", capsys=capsys
    )
    assert code == 0 and "not placed: audio_tokenizer.audio_flow_matching_decoder.* (1)" in out, err

    odd = released_state()
    odd["audio_head.heads.0.weights"] = odd.pop("audio_head.heads.0.weight")
    code, _, err = run(odd, "odd", model)
    assert code == 2 and "no place in our model: audio_head.heads.0.weights" in err

    short = released_state()
    short["model.layers.0.self_attn.W_pack.weight"] = short["model.layers.0.self_attn.W_pack.weight"][:-HD]
    code, _, err = run(short, "short", model)
    assert code == 2 and "W_pack.weight has 112 rows" in err and "need 128" in err

    shape = released_state()
    shape["audio_head.heads.2.bias"] = torch.zeros(3)
    code, _, err = run(shape, "shape", model)
    assert code == 2 and "audio_head.classifiers.2.bias: (3,) vs model (17,)" in err

    kernel = released_state()  # a release whose decoder kernel is not the config's
    kernel["audio_tokenizer.audio_decoder.dconv1.conv.weight"] = torch.zeros(A_W, A_W, 6)
    code, _, err = run(kernel, "kernel", model)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "audio_tokenizer.decoder.dconv1.conv.weight: (32, 32, 6) vs model (32, 32, 8)" in err

    code, _, err = run(released_state(), "tiny", "tiny")  # our default head is not the released one
    assert code == 2 and "does not build the released structure: audio_head.norm is 'layer' (released: 'rms')" in err

    code, _, err = omni(str(tmp_path / "nowhere"), "--model", model, "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and "no release directory" in err
    code, _, err = omni("--model", model, "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and "give a RELEASE_DIR" in err

    # through the installed entry point: the same single line on stderr, exit 2
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "import", str(tmp_path / "lacking"), "--model", model, "--out", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("omni: error: ") and len(proc.stderr.splitlines()) == 1


def test_the_shipped_release_config_builds_the_released_structure() -> None:
    from trainer.release import release_decoder, release_mismatches

    full = load_model_config("baichuan-omni-1.5")
    assert release_mismatches(full) == [] and release_decoder(full)
    assert release_mismatches(load_model_config("tiny"))  # tiny and mid keep today's head
    assert not release_decoder(load_model_config("tiny")) and not release_decoder(load_model_config("mid"))
