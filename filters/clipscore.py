"""``clip_score``: image-text similarity with open_clip, as a score column.

The model is real open_clip code loaded from a local config and checkpoint
(``synth.openclip_models.load_model``; nothing is fetched). Each image segment is paired with the
text next to it (the following text segment, else the preceding one). The score is open_clip's
own similarity before the logit scale: the cosine of the L2-normalised image and text embeddings,
in [-1, 1]. Images and texts are encoded in batches of ``batch_size``.

Columns: ``clip_scores`` (a list aligned with ``segments``: a score at each paired image, else
null) and ``clip_score`` (the sample's lowest pair score: one bad pair is enough to doubt it).
Pair with ``keep`` (``column: clip_score, min: 0.28`` for a ViT-B/32-class model, say).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from filters.segments import flat_segments, per_segment_list, put_column, scatter
from pipelines.operator import Operator, Resources, register


def image_text_pairs(modality: list[str], row: np.ndarray) -> list[tuple[int, int]]:
    """(image segment, text segment) indices: each image with the next text of its sample, else
    the previous one."""
    pairs = []
    for i, m in enumerate(modality):
        if m != "image":
            continue
        partner = None
        for j in range(i + 1, len(modality)):
            if row[j] != row[i]:
                break
            if modality[j] == "text":
                partner = j
                break
        if partner is None:
            for j in range(i - 1, -1, -1):
                if row[j] != row[i]:
                    break
                if modality[j] == "text":
                    partner = j
                    break
        if partner is not None:
            pairs.append((i, partner))
    return pairs


@register
class ClipScore(Operator):
    """Score step: open_clip image-text similarity of each image and its neighbouring text (``clip_score``).

    Params:
        model: an open_clip architecture name or a config .json.
        checkpoint: the model's weights (a local file).
        batch_size: images (and texts) encoded per call.
        device: the torch device, ``cpu`` or ``cuda``.
    """

    name = "clip_score"
    resources = Resources(cpus=1, memory_mb=2048)
    stateful = True

    def __init__(self, model: str, checkpoint: str | None = None, batch_size: int = 32, device: str = "cpu") -> None:
        super().__init__(model=model, checkpoint=checkpoint, batch_size=batch_size, device=device)
        self.model_name = model
        self.checkpoint = checkpoint
        self.batch_size = int(batch_size)
        self.device = device
        self.model: Any = None

    def setup(self) -> None:
        from synth.openclip_models import load_model

        self.model, self.preprocess, self.tokenizer = load_model(self.model_name, self.checkpoint, self.device)

    def similarities(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        """Cosine similarity of each (image, text) pair, as open_clip computes it."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
                tokens = self.tokenizer(texts[start : start + self.batch_size])
                image_features = self.model.encode_image(pixels.to(self.device), normalize=True)
                text_features = self.model.encode_text(tokens.to(self.device), normalize=True)
                out.append((image_features * text_features).sum(dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.model is None:
            self.setup()
        flat = flat_segments(batch)
        pairs = image_text_pairs(flat.modality.to_pylist(), flat.row)
        images, texts, at = [], [], []
        for img, txt in pairs:
            data = flat.data[img].as_py()
            if data is None:
                continue  # a media reference: scored where it is fetched
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception:  # noqa: BLE001 - undecodable images are validate's to reject
                continue
            texts.append(flat.text[txt].as_py() or "")
            at.append(img)
        scores = self.similarities(images, texts).astype(np.float32)
        index = np.array(at, dtype=np.int64)
        per_segment = scatter(len(flat), index, scores, pa.float32())
        lowest = np.full(len(batch), np.inf, dtype=np.float32)
        if len(index):
            np.minimum.at(lowest, flat.row[index], scores)
        batch = put_column(batch, "clip_scores", per_segment_list(per_segment, flat.offsets))
        return put_column(batch, "clip_score", pa.array(lowest, pa.float32(), mask=np.isinf(lowest)))

    def score_columns(self) -> list[str]:
        return ["clip_score"]
