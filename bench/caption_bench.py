"""``caption`` against bare open_clip ``generate`` on the same images: images per second.

Both use the same CoCa (a tiny random-weight one, the only CoCa available offline), the same
batch size and generation settings, and start from the same JPEG bytes. Ours adds the Arrow
round trip, seeding and caption cleaning, and writes captions into segment metadata.
"""

from __future__ import annotations

import io
import os
import tempfile

import torch
from PIL import Image

from bench.asr_bench import alternate_best, cpu_note
from bench.common import Row, image_caption_rows, main, result
from shards.schema import samples_table
from synth.compat import import_open_clip
from synth.openclip_models import load_model, save_tiny_model
from synth.ops_models import Caption


def run(quick: bool = False) -> list[Row]:
    n, repeats, batch_size = (16, 1, 8) if quick else (48, 3, 16)
    settings = {"generation_type": "top_k", "seq_len": 20}
    table = samples_table(image_caption_rows(n))
    images = [segs[0]["bytes"] for segs in table["segments"].to_pylist()]
    with tempfile.TemporaryDirectory() as d:
        config, checkpoint = save_tiny_model(d, coca=True)
        op = Caption(config=config, checkpoint=checkpoint, batch_size=batch_size, overwrite=True, **settings)
        op.setup()
        model, preprocess, _ = load_model(config, checkpoint)
    open_clip = import_open_clip()

    def ours() -> None:
        op(table)

    def bare() -> None:
        for lo in range(0, n, batch_size):
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[lo : lo + batch_size]]
            with torch.inference_mode():
                tokens = model.generate(torch.stack([preprocess(im) for im in pil]), **settings)
            [open_clip.decode(t) for t in tokens]

    ours()  # warm-up
    bare()
    t = alternate_best({"ours": ours, "bare": bare}, repeats)
    notes = f"tiny CoCa, top_k, seq_len 20, batch {batch_size}, {n} JPEGs; {cpu_note(t)}"
    notes += f"; torch threads {torch.get_num_threads()}, {os.cpu_count()} cores"
    return [result("caption.coca", "images/s", n / t["ours"], n / t["bare"], notes)]


if __name__ == "__main__":
    main(run)
