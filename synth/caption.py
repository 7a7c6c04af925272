"""Image captions with open_clip CoCa ``generate``, batched, from a local config and checkpoint.

No CoCa weights are reachable offline, so tests and the demo use a tiny random-weight CoCa
(``synth.openclip_models.save_tiny_model``): its captions are gibberish, but the code path (model
loading, preprocessing, batched beam search / top-k decoding, token decoding) is the real one.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from synth.compat import import_open_clip
from synth.openclip_models import load_model

SOT, EOT = "<start_of_text>", "<end_of_text>"


def clean_caption(text: str) -> str:
    """Decoded CoCa tokens → a caption: text between the start and end tokens, spaces collapsed."""
    text = text.split(SOT, 1)[-1].split(EOT, 1)[0]
    return " ".join(text.split())


def sample_seed(seed: int, key: str) -> int:
    """The sampling seed of one caption: fixed by the run's ``seed`` and the image's ``key`` alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") >> 1


def content_key(image: Image.Image) -> str:
    """A key for an image given without one: its decoded pixels, so equal images caption alike."""
    return hashlib.sha256(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


def to_pil(image: bytes | np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


class Captioner:
    """A CoCa model in eval mode plus its preprocessing; ``caption`` runs ``batch_size`` images per ``generate``.

    Sampling (``top_k``, ``top_p``) draws from one random stream per ``generate`` call, so a batched
    caption would depend on its batch neighbours and on how a run happened to batch them. Sampled
    captions are therefore generated one image at a time, each under its own seed (``sample_seed`` of
    the image's key): a caption is the same in every run, batch size and resume. Beam search draws
    nothing and stays batched."""

    def __init__(
        self,
        config: str,
        checkpoint: str | None,
        device: str = "auto",
        batch_size: int = 16,
        generation_type: str = "beam_search",
        seq_len: int = 30,
        num_beams: int = 6,
        num_beam_groups: int = 3,
        top_k: int = 1,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model, self.preprocess, _ = load_model(config, checkpoint, device=device)
        if not hasattr(self.model, "generate"):
            raise ValueError(f"{config} is not a CoCa model (it has no generate)")
        broken = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise ValueError(f"{checkpoint} has non-finite weights: {', '.join(broken[:3])}")
        context = int(getattr(self.model, "context_length", 77) or 77)
        self.batch_size, self.seed, self.threads = batch_size, seed, threads
        self.kwargs: dict[str, Any] = {"generation_type": generation_type, "seq_len": min(seq_len, context)}
        self.sampling = generation_type != "beam_search"
        if generation_type == "beam_search":
            self.kwargs.update(num_beams=num_beams, num_beam_groups=num_beam_groups)
        else:
            self.kwargs.update(top_k=top_k)
        self.open_clip = import_open_clip()

    def caption(
        self, images: Sequence[bytes | np.ndarray | Image.Image], keys: Sequence[str] | None = None
    ) -> list[str]:
        """One caption per image, in order. ``keys`` (e.g. ``sample id/segment``) seed sampled
        captions; without them an image's pixels are its key."""
        pils = [to_pil(im) for im in images]
        if keys is not None and len(keys) != len(pils):
            raise ValueError(f"{len(keys)} keys for {len(pils)} images")
        if not self.sampling:
            out: list[str] = []
            for lo in range(0, len(pils), self.batch_size):
                out.extend(self._generate(pils[lo : lo + self.batch_size]))
            return out
        keys = list(keys) if keys is not None else [content_key(im) for im in pils]
        return [self._generate([im], sample_seed(self.seed, key))[0] for im, key in zip(pils, keys, strict=True)]

    def _generate(self, images: list[Image.Image], seed: int | None = None) -> list[str]:
        import torch

        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():  # the caller's RNG stays as it was
                if seed is not None:
                    torch.manual_seed(seed)
                tokens = self.model.generate(pixels, **self.kwargs)
        finally:
            torch.set_num_threads(threads)
        return [clean_caption(self.open_clip.decode(t)) for t in tokens]
