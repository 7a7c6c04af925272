"""Load open_clip models (CLIP for scores, CoCa for captions) from local files only.

A recipe names a model config (an open_clip architecture name, or a JSON file with one) and a
checkpoint path; nothing is fetched from a hub. ``save_tiny_model`` writes a tiny model with random
weights and the real architecture, so tests and the demo run the real loading and inference code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synth.compat import import_open_clip

TINY_VISION = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
TINY_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def tiny_config(coca: bool) -> dict[str, Any]:
    """A few-MB open_clip config with the real CLIP or CoCa architecture."""
    cfg: dict[str, Any] = {"embed_dim": 64, "vision_cfg": dict(TINY_VISION), "text_cfg": dict(TINY_TEXT)}
    if coca:
        cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
        cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_heads=2, output_tokens=True)
        cfg["multimodal_cfg"] = {**TINY_TEXT, "attn_pooler_heads": 2}
        cfg["custom_text"] = True
    return cfg


def register_config(config: str) -> str:
    """Make a JSON config file known to open_clip; returns the model name to create."""
    open_clip = import_open_clip()
    path = Path(config)
    if path.suffix == ".json" and path.is_file():
        open_clip.add_model_config(path)
        return path.stem
    if config not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {config!r}: give an architecture name or a config .json")
    return config


def load_model(config: str, checkpoint: str | None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model in eval mode, image preprocess, tokenizer) from a config and a local checkpoint."""
    open_clip = import_open_clip()
    name = register_config(config)
    if checkpoint and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint or None, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def save_tiny_model(directory: str | Path, coca: bool = True, seed: int = 0) -> tuple[str, str]:
    """Write ``tiny-{coca,clip}.json`` and random weights; returns (config path, checkpoint path)."""
    import torch

    open_clip = import_open_clip()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = "tiny-coca" if coca else "tiny-clip"
    config_path = directory / f"{name}.json"
    config_path.write_text(json.dumps(tiny_config(coca), indent=1))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    if coca:
        # open_clip creates the decoder's text_projection with torch.empty and never initialises it
        # (its MultimodalTransformer.init_parameters is broken), so it would hold zeros or NaN.
        proj = model.text_decoder.text_projection
        with torch.no_grad():
            proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(seed)) * proj.shape[0] ** -0.5)
    checkpoint = directory / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return str(config_path), str(checkpoint)
