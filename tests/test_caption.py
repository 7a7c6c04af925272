"""CoCa captions via open_clip ``generate`` on a tiny random-weight CoCa built here (no weights to download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.demo_data import PHOTOS, photo_bytes
from pipelines.operator import get_operator, split_rejected
from shards.schema import Segment, loads_meta, make_sample, samples_table
from synth.caption import Captioner, clean_caption
from synth.openclip_models import save_tiny_model
from synth.rows import make_segment

NAMES = list(PHOTOS)[:4]


@pytest.fixture(scope="module")
def coca(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_tiny_model(tmp_path_factory.mktemp("coca"), coca=True)


def test_clean_caption_strips_special_tokens() -> None:
    assert clean_caption("<start_of_text>a  cat on a mat <end_of_text>!!!") == "a cat on a mat"


def test_batched_captions_one_per_image_and_deterministic(coca) -> None:
    images = [photo_bytes(n, size=(96, 80)) for n in NAMES]
    captioner = Captioner(*coca, batch_size=3, generation_type="top_k", seq_len=8)
    first = captioner.caption(images)
    assert len(first) == len(images) and all(isinstance(c, str) and c for c in first)
    assert "<start_of_text>" not in "".join(first) and "<end_of_text>" not in "".join(first)
    assert captioner.caption(images) == first
    beams = Captioner(*coca, batch_size=4, generation_type="beam_search", seq_len=7, num_beams=2, num_beam_groups=1)
    assert len(beams.caption(images[:1])) == 1


def test_caption_op_covers_images_and_keyframes(coca, tmp_path: Path) -> None:
    keyframes = [
        make_segment("image", data=photo_bytes(n, size=(64, 48)), meta={"role": "keyframe", "t": float(i)})
        for i, n in enumerate(NAMES[:3])
    ]
    video = {**make_sample("t", "video", [Segment("video", bytes=b"not decoded here")], "v")}
    video["segments"] = [video["segments"][0], *keyframes]
    table = samples_table(
        [
            make_sample("t", "image_caption", [Segment("image", bytes=photo_bytes("coffee"))], "photo"),
            video,
            make_sample("t", "image", [Segment("image", bytes=b"\xff\xd8 broken jpeg")], "broken"),
        ]
    )
    op = get_operator("caption")(config=coca[0], checkpoint=coca[1], generation_type="top_k", seq_len=8)
    op.setup()
    kept, rejected = split_rejected(op(table))
    rows = {loads_meta(r["meta"])["locator"]: r["segments"] for r in kept.to_pylist()}
    assert loads_meta(rows["photo"][0]["meta"])["caption"]
    metas = [loads_meta(s["meta"]) for s in rows["v"]]
    assert "caption" not in metas[0] and all(m["caption"] and m["caption_model"] == "tiny-coca.pt" for m in metas[1:])
    assert rejected["reason"].to_pylist() == ["undecodable image"]
    with pytest.raises(ValueError):
        get_operator("caption")(config=coca[0])  # no checkpoint: refuse rather than download
