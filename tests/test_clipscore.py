"""``clip_score`` with a tiny open_clip CLIP built here (real architecture, random weights): the
real loading and inference path, its wiring, batching and determinism, and ``keep`` on the score."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from filters.clipscore import ClipScore, image_text_pairs
from pipelines.demo_data import PHOTOS, photo_bytes
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, make_sample, samples_table
from synth.openclip_models import load_model, save_tiny_model

NAMES = list(PHOTOS)[:6]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_tiny_model(tmp_path_factory.mktemp("clip"), coca=False)


@pytest.fixture(scope="module")
def batch():
    rows = [
        make_sample("t", "image_caption", [Segment("image", bytes=photo_bytes(n)), Segment("text", text=PHOTOS[n])], n)
        for n in NAMES
    ]
    rows.append(make_sample("t", "text", [Segment("text", text="no image here")], "text-only"))
    rows.append(
        make_sample(
            "t",
            "interleaved_image_text",
            [
                Segment("text", text="Two pictures."),
                Segment("image", bytes=photo_bytes("rocket")),
                Segment("text", text=PHOTOS["rocket"]),
                Segment("image", bytes=photo_bytes("coffee")),
            ],
            "doc",
        )
    )
    return samples_table(rows)


def reference_scores(config: str, checkpoint: str, pairs: list[tuple[bytes, str]]) -> np.ndarray:
    """open_clip's own similarity, computed directly: normalised embeddings, cosine."""
    model, preprocess, tokenizer = load_model(config, checkpoint)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in pairs])
        img = model.encode_image(images)
        txt = model.encode_text(tokenizer([t for _, t in pairs]))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


def test_scores_are_open_clips_cosine_and_batching_does_not_change_them(tiny_clip, batch) -> None:
    config, checkpoint = tiny_clip
    op = get_operator("clip_score")(model=config, checkpoint=checkpoint, batch_size=4)
    assert op.stateful and op.model is None  # nothing loads before setup()
    op.setup()
    out = op(batch)
    scores = out["clip_score"].to_pylist()
    assert scores[len(NAMES)] is None  # a text-only sample has nothing to score
    expected = reference_scores(config, checkpoint, [(photo_bytes(n), PHOTOS[n]) for n in NAMES])
    np.testing.assert_allclose(scores[: len(NAMES)], expected, rtol=1e-4, atol=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in scores if s is not None)

    other = ClipScore(model=config, checkpoint=checkpoint, batch_size=1)
    other.setup()
    again = other(batch)
    np.testing.assert_allclose(
        np.array(again["clip_score"].to_pylist()[: len(NAMES)]), np.array(scores[: len(NAMES)]), rtol=1e-5
    )


def test_interleaved_images_pair_with_the_nearest_text(tiny_clip, batch) -> None:
    assert image_text_pairs(["text", "image", "text", "image"], np.zeros(4, dtype=np.int64)) == [(1, 2), (3, 2)]
    config, checkpoint = tiny_clip
    op = ClipScore(model=config, checkpoint=checkpoint)
    out = op(batch).to_pylist()[-1]  # setup() on first use when a plain loop forgets it
    per_segment = out["clip_scores"]
    assert per_segment[0] is None and per_segment[2] is None
    expected = reference_scores(
        config, checkpoint, [(photo_bytes("rocket"), PHOTOS["rocket"]), (photo_bytes("coffee"), PHOTOS["rocket"])]
    )
    np.testing.assert_allclose(per_segment[1::2], expected, rtol=1e-4, atol=1e-5)
    assert out["clip_score"] == pytest.approx(min(per_segment[1::2]))


def test_keep_on_clip_score(tiny_clip, batch) -> None:
    config, checkpoint = tiny_clip
    op = ClipScore(model=config, checkpoint=checkpoint)
    op.setup()
    scored = op(batch)
    threshold = float(np.median([s for s in scored["clip_score"].to_pylist() if s is not None]))
    kept, rejected = split_rejected(get_operator("keep")(column="clip_score", min=threshold)(scored))
    assert len(rejected) > 0 and all(s < threshold for s in rejected["clip_score"].to_pylist())
    assert all(d.startswith("clip_score=") for d in rejected["detail"].to_pylist())
    assert "text-only" in [m for m in kept["meta"].to_pylist() if "text-only" in m][0]


def test_missing_checkpoint_fails_at_setup(tmp_path) -> None:
    op = ClipScore(model="ViT-B-32", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError):
        op.setup()
