"""Generation from a trained run: text, and speech through tokenizer decoder → flow matching → vocoder.

``OmniGenerator.from_run(RUN_DIR)`` loads the latest finished LLM stage (``<run>/<stage>/final``, stage
>= 1), the flow-matching decoder of stage 0.2 and the vocoder of stage 0.3. Decoding (docs/PAPER.md §5):

- the Qwen2 LLM decodes with a KV cache (``DynamicCache``); text tokens are sampled with temperature,
  top-k and top-p from a seeded ``torch.Generator``;
- at ``<audiogen_start_baichuan>`` it switches to speech: the audio head samples the 8 codes of one
  12.5 Hz frame codebook by codebook (depth-autoregressive, with its own per-layer KV cache over the
  codebook axis, exactly the teacher-forced ``AudioHead.forward`` run one position at a time); the frame's
  summed code embeddings are the LLM's next input; the classifier index ``codebook_size`` of the first
  codebook is end-of-audio, as ``OmniModel._audio_targets`` trains it. After end-of-audio (or
  ``max_frames``) ``<audiogen_end_baichuan>`` is fed and text decoding goes on, so replies interleave
  text and speech;
- codes → ``AudioTokenizer.decoder_states`` → ``FlowDecoder.sample`` → ``HifiGanGenerator`` → 24 kHz
  waveform, in chunks of ``chunk_frames`` frames with ``overlap_frames`` of overlap and a linear
  cross-fade over the overlap (the paper's streaming demo decodes the same way). N frames are exactly
  ``N · 8 · 240`` samples.

The ``tts`` prompt is built exactly as ``trainer.sequence`` builds a ``tts`` sample (text tokens, then
``<audiogen_start>``), so a model trained on tts data speaks.
"""

from __future__ import annotations

import json
import re
import warnings
import wave as wave_io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import hf_compat  # noqa: F401  (before transformers)

SAMPLE_RATE = 24_000
HOP = 240  # 24 kHz samples per mel frame (100 Hz)
MEL_PER_FRAME = 8  # mel frames per 12.5 Hz token
SAMPLES_PER_FRAME = MEL_PER_FRAME * HOP  # 1920

FLOW_STAGE, VOCODER_STAGE = "0.2", "0.3"
_STAGE_RE = re.compile(r"^\d+(\.\d+)*$")


class GenerationError(ValueError):
    """Something the user can fix (a missing run, stage or input); the CLI prints it as one line."""


# ---------------------------------------------------------------- sampling


@dataclass
class Sampling:
    """``temperature <= 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sample_from(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One index from 1-D ``logits`` (``-inf`` entries are never drawn). Sampling runs on the CPU with a
    CPU generator, so a seed draws the same tokens on every device."""
    logits = logits.detach().float().cpu()
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------- the model's input embeddings


def prompt_embeddings(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    audio_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[1, L, d]`` input embeddings: token embeddings with image features at ``<img_pad>`` and summed
    code embeddings at ``<audio_pad>``, the substitution ``OmniModel.forward`` makes for training."""
    embeds = model.model.embed_tokens(input_ids)
    flat = embeds.reshape(-1, embeds.shape[-1])
    ids = input_ids.reshape(-1)
    if pixel_values is not None and pixel_values.shape[0]:
        flat = model.put_images(ids, flat, model._vision(pixel_values, image_grid_thw)[0])
    if audio_codes is not None and audio_codes.shape[0]:
        flat = model.put_audio(ids, flat, audio_codes)
    return flat.view_as(embeds)


class LLMState:
    """The LLM with its KV cache: ``feed(embeds [1, L, d])`` returns the last position's hidden state."""

    def __init__(self, model: Any) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.length = 0

    def feed(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        pos = torch.arange(self.length, self.length + n, device=embeds.device).unsqueeze(0)
        out = self.model.model(inputs_embeds=embeds, position_ids=pos, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += n
        return out.last_hidden_state[0, -1]


# ---------------------------------------------------------------- the audio head, one codebook at a time


def _depth_step(layer: nn.Module, x: torch.Tensor, q: int, cache: list[torch.Tensor]) -> torch.Tensor:
    """``DepthLayer.forward`` for codebook position ``q`` only (``x [F, 1, d]``), keys/values of the
    earlier positions in ``cache``; causal attention makes it equal to the full teacher-forced pass."""
    attn = layer.attn
    h = layer.norm1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    qh, k, v = qkv.chunk(3, dim=-1)
    if cache:
        k, v = torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)
    cache[:] = [k, v]
    n_f, d, heads = x.shape[0], x.shape[-1], attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n_f, t.shape[1], heads, d // heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(split(qh), split(k), split(v))  # the new position sees all earlier ones
    x = x + attn.out_proj(o.transpose(1, 2).reshape(n_f, 1, d))
    return layer.ffn(x, q)


def head_logits_incremental(model: Any, hidden: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
    """Per-codebook logits for given ``codes [F, n_q]`` through the incremental path (for checks)."""
    head, caches = model.audio_head, [[] for _ in model.audio_head.layers]
    acc = torch.zeros_like(hidden)
    out = []
    for i, clf in enumerate(head.classifiers):
        x = head.position_input(hidden, acc, i).unsqueeze(1)
        for layer, cache in zip(head.layers, caches, strict=True):
            x = _depth_step(layer, x, i, cache)
        out.append(clf(head.norm(x))[:, 0])
        acc = acc + model.model.audio_embed_layers[i](codes[:, i])
    return out


def sample_frame(
    model: Any, hidden: torch.Tensor, s: Sampling, generator: torch.Generator | None, allow_end: bool
) -> torch.Tensor | None:
    """The 8 codes ``[n_q]`` of the next frame from the LLM state ``hidden [d]``, or None at end-of-audio."""
    head, caches = model.audio_head, [[] for _ in model.audio_head.layers]
    h = hidden.unsqueeze(0)
    acc = torch.zeros_like(h)
    codes = []
    for i, (clf, size) in enumerate(zip(head.classifiers, model.codebook_sizes, strict=True)):
        x = head.position_input(h, acc, i).unsqueeze(1)
        for layer, cache in zip(head.layers, caches, strict=True):
            x = _depth_step(layer, x, i, cache)
        logits = clf(head.norm(x))[0, 0].float()
        if i > 0 or not allow_end:  # end-of-audio is decided by the first codebook (all codebooks say it in training)
            logits[size] = float("-inf")
        c = sample_from(logits, s, generator)
        if i == 0 and c == size:
            return None
        codes.append(c)
        acc = acc + model.model.audio_embed_layers[i].weight[c]
    return torch.tensor(codes, dtype=torch.long, device=hidden.device)


# ---------------------------------------------------------------- loading a run


def stage_key(stage: str) -> tuple[int, ...]:
    return tuple(int(x) for x in stage.split("."))


def _finished(run: Path, stage: str) -> tuple[Path, dict[str, Any]] | None:
    final = run / stage / "final"
    if not (final / "done.json").is_file() or not (final / "model.pt").is_file():
        return None
    try:
        return final / "model.pt", json.loads((final / "done.json").read_text())
    except (OSError, ValueError) as e:
        raise GenerationError(f"stage {stage}: unreadable {final / 'done.json'}: {e}") from e


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise GenerationError(f"cannot load {path}: {type(e).__name__}: {str(e)[:200]}") from e


def flow_from_state(
    state: dict[str, torch.Tensor], cfg: dict[str, Any], where: Any, model: Any = None, stage: str | None = None
) -> nn.Module:
    """Stage 0.2's flow decoder from its saved state (``flow.*``, and ``tokenizer.*``: the frozen audio
    tokenizer it was trained on) and its model config; warns when that tokenizer is not ``model``'s (the
    LLM stage ``stage``'s). Used by ``OmniGenerator.from_run`` and trainer.export's ``load_generator``."""
    from trainer.flow_decoder import FlowDecoder, flow_config

    try:
        flow = FlowDecoder(flow_config(cfg))
        flow.load_state_dict(_prefixed(state, "flow."), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise GenerationError(f"{where} is no flow decoder for its config: {str(e)[:300]}") from e
    tok_state = _prefixed(state, "tokenizer.")
    if tok_state and model is not None:
        mine = model.audio_tokenizer.state_dict()
        same = tok_state.keys() == mine.keys() and all(
            torch.equal(tok_state[k].float(), mine[k].float()) for k in tok_state
        )
        if not same:
            warnings.warn(
                f"stage {FLOW_STAGE}'s flow decoder was trained on another audio tokenizer than stage {stage}'s",
                stacklevel=3,
            )
    return flow


def vocoder_from_state(state: dict[str, torch.Tensor], cfg: dict[str, Any], where: Any) -> nn.Module:
    """Stage 0.3's HiFi-GAN generator from its saved state (``generator.*``; or hifi-gan's
    ``{"generator": state}``) and its model config, in eval mode."""
    from trainer.vocoder import VOCODER_DEFAULTS, HifiGanGenerator, _hifigan_keys

    if isinstance(state.get("generator"), dict):
        state = state["generator"]
    elif any(k.startswith("generator.") for k in state):
        state = _prefixed(state, "generator.")
    try:
        vocoder = HifiGanGenerator({**VOCODER_DEFAULTS, **(cfg.get("vocoder") or {})})
        vocoder.load_state_dict(_hifigan_keys(state), strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise GenerationError(f"{where} is no vocoder for its config: {str(e)[:300]}") from e
    return vocoder.eval()


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono WAV (stdlib ``wave``); samples clipped to [-1, 1]."""
    pcm = np.round(np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave_io.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


class OmniGenerator:
    """A trained omni model, its flow-matching decoder and its vocoder, ready to generate (eval, no grad)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        flow: nn.Module | None = None,
        vocoder: nn.Module | None = None,
        model_config: dict[str, Any] | None = None,
        stage: str | None = None,
    ) -> None:
        from trainer.media import MediaProcessor

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.flow = flow.eval() if flow is not None else None
        self.vocoder = vocoder.eval() if vocoder is not None else None
        self.config = model_config if model_config is not None else model.cfg
        self.stage = stage
        self.device = model.lm_head.weight.device
        self.media = MediaProcessor.from_model_config(self.config)
        sp = model.special
        self.sp = sp
        vocab = model.lm_head.out_features
        ban = torch.zeros(vocab, dtype=torch.bool)
        ban[len(tokenizer) :] = True  # the LLM's vocab is the tokenizer's rounded up to 64
        for t in (sp.img_start, sp.img_pad, sp.img_end, sp.audio_start, sp.audio_pad, sp.audio_end):
            ban[t] = True
        for t in (sp.audiogen_end, sp.video_start, sp.video_end):
            ban[t] = True
        self._text_ban = ban.to(self.device)

    # -- loading

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        stage: str | None = None,
        device: str | torch.device = "cpu",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | Path | None = None,
    ) -> OmniGenerator:
        """Load ``run_dir``'s latest finished LLM stage (or ``stage``), flow (0.2) and vocoder (0.3).

        ``model_config`` / ``tokenizer`` override what the stage's ``done.json`` records."""
        from trainer.model import build_model
        from trainer.tokenizer import load_tokenizer

        run = Path(run_dir)
        if not run.is_dir():
            raise GenerationError(f"no run directory {run}")
        if stage is None:
            llm_stages = sorted(
                (p.name for p in run.iterdir() if _STAGE_RE.match(p.name) and stage_key(p.name) >= (1,)),
                key=stage_key,
                reverse=True,
            )
            stage = next((s for s in llm_stages if _finished(run, s)), None)
            if stage is None:
                raise GenerationError(f"{run} holds no finished LLM stage (<stage>/final/done.json, stage >= 1)")
        elif not _STAGE_RE.match(stage) or stage_key(stage) < (1,):
            raise GenerationError(f"{stage!r} is not an LLM stage id like 2.1")
        found = _finished(run, stage)
        if found is None:
            raise GenerationError(f"stage {stage} of {run} is not finished (no {run / stage / 'final'}/done.json)")
        llm_path, done = found
        cfg = model_config if model_config is not None else done.get("model_config")
        if cfg is None:
            raise GenerationError(f"{llm_path.parent / 'done.json'} records no model_config: pass one")
        tok_dir = tokenizer or done.get("tokenizer") or (run / "tokenizer")
        if not Path(tok_dir, "tokenizer.json").is_file():
            raise GenerationError(f"no text tokenizer at {tok_dir}")
        tok = load_tokenizer(tok_dir)
        pieces = {}
        for piece, st in (("flow", FLOW_STAGE), ("vocoder", VOCODER_STAGE)):
            f = _finished(run, st)
            if f is None:
                raise GenerationError(f"{run} has no finished stage {st} ({piece}): {run / st / 'final'}/done.json")
            pieces[piece] = f

        model = build_model(cfg, tok)
        state = _load_state(llm_path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise GenerationError(f"{llm_path} does not fit the model config: {str(e)[:300]}") from e
        model.float()

        flow_path, flow_done = pieces["flow"]
        voc_path, voc_done = pieces["vocoder"]
        flow = flow_from_state(_load_state(flow_path), flow_done.get("model_config") or cfg, flow_path, model, stage)
        vocoder = vocoder_from_state(_load_state(voc_path), voc_done.get("model_config") or cfg, voc_path)
        for m in (model, flow, vocoder):
            m.float().to(device)
        return cls(model, tok, flow, vocoder, cfg, stage)

    # -- prompts

    def tts_prompt_ids(self, text: str) -> list[int]:
        """A ``tts`` sample's tokens up to and including ``<audiogen_start>`` (trainer.sequence's layout)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text.strip() else []
        return ids + [self.sp.audiogen_start]

    def build_prompt(
        self, prompt: str, image: bytes | None = None, audio: bytes | None = None
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Token ids with media placeholders (as trainer.sequence lays them out) and the media tensors.

        ``<image>`` / ``<audio>`` in ``prompt`` mark where the media go; without them the text comes
        first, then the image, then the audio (the ASR layout: instruction, then speech)."""
        from trainer.sequence import Example

        sp, ex = self.sp, Example("prompt", 0)
        media: dict[str, torch.Tensor] = {}
        img = self.media.image(image) if image is not None else None
        img_in = img
        clip = self.media.audio_clip(audio) if audio is not None else None
        parts = re.split(r"(<image>|<audio>)", prompt)
        if img is not None and "<image>" not in parts:
            parts.append("<image>")
        if clip is not None and "<audio>" not in parts:
            parts.append("<audio>")
        for part in parts:
            if part == "<image>" and img is not None:
                ex.add_image(img, sp)
                img = None
            elif part == "<audio>" and clip is not None:
                ex.add_audio(clip, sp)
                mels = [torch.from_numpy(m).to(self.device) for m in clip.mels]
                media["audio_codes"] = torch.cat(self.model.audio_tokenizer(mels))
                clip = None
            elif part.strip():
                ex._put(self.tokenizer.encode(part, add_special_tokens=False), False)
        if img_in is not None:
            media["pixel_values"] = torch.from_numpy(img_in.patches).to(self.device)
            media["image_grid_thw"] = torch.tensor([img_in.grid], dtype=torch.long, device=self.device)
        if not ex.ids:
            raise GenerationError("empty prompt: give text, an image or audio")
        return ex.ids, media

    # -- decoding

    @torch.no_grad()
    def decode(
        self,
        ids: list[int],
        media: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        max_new_tokens: int = 256,
        max_frames: int = 750,
        min_frames: int = 0,
        text: Sampling | None = None,
        audio: Sampling | None = None,
        stop_after_audio: bool = False,
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
    ) -> list[dict[str, Any]]:
        """Decode after ``ids``; parts ``{"type": "text", "ids", "text"}`` / ``{"type": "audio", "codes"}``.

        A prompt ending in ``<audiogen_start>`` starts in speech. ``logits_processor(generated_ids, logits)``
        may edit each text step's logits (HF-style); ``stop_after_audio`` ends after the first speech part."""
        text = text or Sampling(temperature=0.7, top_k=50, top_p=0.9)
        audio = audio or Sampling(temperature=0.9, top_k=30)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        model, sp = self.model, self.sp
        embed = model.model.embed_tokens
        state = LLMState(model)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        h = state.feed(prompt_embeddings(model, input_ids, **(media or {})))
        parts: list[dict[str, Any]] = []
        generated: list[int] = []
        text_ids: list[int] = []
        in_audio = ids[-1] == sp.audiogen_start

        def flush_text() -> None:
            if text_ids:
                parts.append({"type": "text", "ids": list(text_ids), "text": self.tokenizer.decode(text_ids)})
                text_ids.clear()

        while True:
            if in_audio:
                frames: list[torch.Tensor] = []
                while len(frames) < max_frames:
                    c = sample_frame(model, h.float(), audio, gen, allow_end=len(frames) >= min_frames)
                    if c is None:
                        break
                    frames.append(c)
                    h = state.feed(model.embed_codes(c.unsqueeze(0)).sum(1).unsqueeze(0))
                n_q = len(model.codebook_sizes)
                codes = torch.stack(frames) if frames else torch.zeros(0, n_q, dtype=torch.long, device=self.device)
                parts.append({"type": "audio", "codes": codes, "frames": len(frames)})
                in_audio = False
                if stop_after_audio:
                    break
                generated.append(sp.audiogen_end)
                h = state.feed(embed(torch.tensor([[sp.audiogen_end]], device=self.device)))
                continue
            if len([t for t in generated if t != sp.audiogen_end]) >= max_new_tokens:
                break
            logits = model.lm_head(h).float().masked_fill(self._text_ban, float("-inf"))
            if logits_processor is not None:
                logits = logits_processor(list(generated), logits)
            tok = sample_from(logits, text, gen)
            generated.append(tok)
            if tok == sp.eos:
                break
            if tok == sp.audiogen_start:
                flush_text()
                in_audio = True
            else:
                text_ids.append(tok)
            h = state.feed(embed(torch.tensor([[tok]], device=self.device)))
        flush_text()
        return parts

    # -- codes to sound

    def _flow_cond(self, codes: torch.Tensor) -> torch.Tensor:
        """The flow decoder's condition ``[1, C, 8N]`` for codes ``[N, n_q]``."""
        hidden, _ = self.model.audio_tokenizer.decoder_states(codes.unsqueeze(0))
        return hidden.transpose(1, 2).float()

    @torch.no_grad()
    def _mel_to_wave(self, cond: torch.Tensor, gen: torch.Generator, flow: dict[str, Any]) -> torch.Tensor:
        mask = torch.ones(1, 1, cond.shape[-1], device=cond.device, dtype=cond.dtype)
        mel = self.flow.sample(cond, mask, generator=gen, **flow)
        return self.vocoder(mel)[0]

    @torch.no_grad()
    def codes_to_wave(
        self,
        codes: torch.Tensor,
        seed: int = 0,
        chunk_frames: int | None = 50,
        overlap_frames: int = 4,
        flow_steps: int | None = None,
        guidance: float | None = None,
        flow_temperature: float = 1.0,
    ) -> np.ndarray:
        """24 kHz float32 waveform of ``codes [N, n_q]``: exactly ``N * 1920`` samples.

        The reconstruction decoder (causal) runs over all frames; flow matching and the vocoder run on
        windows of ``chunk_frames`` frames (None: one window), each window after the first starting
        ``overlap_frames`` early; overlaps are cross-faded linearly. ``flow_steps`` / ``guidance`` default to
        the flow config's ``sample_steps`` / ``guidance``."""
        if self.flow is None or self.vocoder is None:
            raise GenerationError("no flow decoder / vocoder loaded: speech cannot be decoded")
        n = int(codes.shape[0])
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        gen = torch.Generator(device=self.device).manual_seed(int(seed) + 1)
        fc = getattr(self.flow, "cfg", {})
        flow = {
            "steps": int(flow_steps if flow_steps is not None else fc.get("sample_steps", 10)),
            "guidance": float(guidance if guidance is not None else fc.get("guidance", 0.7)),
            "temperature": flow_temperature,
        }
        cond = self._flow_cond(codes.to(self.device))
        if chunk_frames is None or chunk_frames >= n:
            return self._mel_to_wave(cond, gen, flow).cpu().numpy().astype(np.float32)
        if chunk_frames < 1 or not 0 <= overlap_frames < chunk_frames:
            raise GenerationError(f"need 0 <= overlap_frames < chunk_frames, got {overlap_frames}, {chunk_frames}")
        out = torch.zeros(n * SAMPLES_PER_FRAME)
        for start in range(0, n, chunk_frames):
            a = max(0, start - overlap_frames)
            b = min(n, start + chunk_frames)
            w = self._mel_to_wave(cond[:, :, a * MEL_PER_FRAME : b * MEL_PER_FRAME], gen, flow).cpu().float()
            lap = (start - a) * SAMPLES_PER_FRAME
            if lap:  # out already holds the previous window's tail here: fade it out, this one in
                ramp = torch.arange(1, lap + 1, dtype=torch.float32) / (lap + 1)
                w[:lap] = out[a * SAMPLES_PER_FRAME : start * SAMPLES_PER_FRAME] * (1 - ramp) + w[:lap] * ramp
            out[a * SAMPLES_PER_FRAME : b * SAMPLES_PER_FRAME] = w
        return out.numpy().astype(np.float32)

    # -- the two entry points

    def speak_codes(
        self,
        text: str,
        seed: int = 0,
        max_frames: int = 750,
        min_frames: int = 0,
        temperature: float = 0.9,
        top_k: int = 30,
    ) -> torch.Tensor:
        """Codes ``[N, n_q]`` the model speaks for ``text`` (tts prompt, stops at end-of-audio)."""
        parts = self.decode(
            self.tts_prompt_ids(text),
            seed=seed,
            max_frames=max_frames,
            min_frames=min_frames,
            audio=Sampling(temperature=temperature, top_k=top_k),
            stop_after_audio=True,
        )
        return parts[0]["codes"]

    def speak(
        self,
        text: str,
        seed: int = 0,
        max_frames: int = 750,
        min_frames: int = 0,
        temperature: float = 0.9,
        top_k: int = 30,
        **decode_kw: Any,
    ) -> tuple[np.ndarray, int]:
        """``(wave float32, 24000)``: ``text`` spoken; ``decode_kw`` go to ``codes_to_wave``."""
        codes = self.speak_codes(text, seed, max_frames, min_frames, temperature, top_k)
        return self.codes_to_wave(codes, seed=seed, **decode_kw), SAMPLE_RATE

    def generate(
        self,
        prompt: str,
        image: bytes | str | Path | None = None,
        audio: bytes | str | Path | None = None,
        seed: int = 0,
        max_new_tokens: int = 256,
        max_frames: int = 750,
        min_frames: int = 0,
        text: Sampling | None = None,
        speech: Sampling | None = None,
        logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
        **decode_kw: Any,
    ) -> list[dict[str, Any]]:
        """Interleaved reply parts: ``{"type": "text", "text"}`` and
        ``{"type": "audio", "wave", "sample_rate": 24000, "frames"}``. ``image`` / ``audio``: bytes or a path."""

        def read(x: bytes | str | Path | None) -> bytes | None:
            if x is None or isinstance(x, bytes):
                return x
            try:
                return Path(x).read_bytes()
            except OSError as e:
                raise GenerationError(f"cannot read {x}: {e.strerror or e}") from e

        from synth.media import MediaError

        try:
            ids, media = self.build_prompt(prompt, read(image), read(audio))
        except MediaError as e:
            raise GenerationError(f"unusable input: {e}") from e
        parts = self.decode(
            ids,
            media,
            seed=seed,
            max_new_tokens=max_new_tokens,
            max_frames=max_frames,
            min_frames=min_frames,
            text=text,
            audio=speech,
            logits_processor=logits_processor,
        )
        out = []
        for i, p in enumerate(parts):
            if p["type"] == "text":
                out.append({"type": "text", "text": p["text"]})
            else:
                wave = self.codes_to_wave(p["codes"], seed=seed + i, **decode_kw)
                out.append({"type": "audio", "wave": wave, "sample_rate": SAMPLE_RATE, "frames": p["frames"]})
        return out
