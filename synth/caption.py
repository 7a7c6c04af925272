"""Image captions with open_clip CoCa ``generate``, batched, from a local config and checkpoint.

No CoCa weights are reachable offline, so tests and the demo use a tiny random-weight CoCa
(``synth.openclip_models.save_tiny_model``): its captions are gibberish, but the code path (model
loading, preprocessing, batched beam search / top-k decoding, token decoding) is the real one.
"""

from __future__ import annotations

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


def to_pil(image: bytes | np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    with Image.open(io.BytesIO(image)) as im:
        return im.convert("RGB")


class Captioner:
    """A CoCa model in eval mode plus its preprocessing; ``caption`` runs ``batch_size`` images per ``generate``."""

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
        self.batch_size, self.seed = batch_size, seed
        self.kwargs: dict[str, Any] = {"generation_type": generation_type, "seq_len": min(seq_len, context)}
        if generation_type == "beam_search":
            self.kwargs.update(num_beams=num_beams, num_beam_groups=num_beam_groups)
        else:
            self.kwargs.update(top_k=top_k)
        self.open_clip = import_open_clip()

    def caption(self, images: Sequence[bytes | np.ndarray | Image.Image]) -> list[str]:
        import torch

        out: list[str] = []
        for lo in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(to_pil(im)) for im in images[lo : lo + self.batch_size]])
            torch.manual_seed(self.seed)  # top_k/top_p sample (ties included): seeded, runs repeat exactly
            with torch.inference_mode():
                tokens = self.model.generate(pixels.to(self.device), **self.kwargs)
            out.extend(clean_caption(self.open_clip.decode(t)) for t in tokens)
        return out
