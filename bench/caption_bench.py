"""``caption`` against bare open_clip ``generate`` on the same images, the same work: images per second.

Both use the same CoCa (a tiny random-weight one, the only CoCa available offline), the same
generation settings and torch thread count (the op's ``threads``, 1 by default), and start from
the same JPEG bytes. Two rows:

- ``caption.coca-sampled``: top-k sampling. Ours seeds every image by its key (a caption must not
  depend on its batch neighbours), so it generates one image at a time; bare does the same thing
  (``torch.manual_seed(seed)`` + ``generate`` per image) and must return the same captions.
- ``caption.coca-beam``: beam search draws nothing, so both sides run batches of ``batch_size``.

Ours adds the Arrow round trip, seeding and caption cleaning, and writes captions into segment
metadata. Contenders alternate, best of the same repeats.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable

import torch
from PIL import Image

from bench.common import Row, alternate_best, cpu_note, image_caption_rows, main, result
from shards.schema import samples_table
from synth.caption import clean_caption, sample_seed
from synth.compat import import_open_clip
from synth.openclip_models import load_model, save_tiny_model
from synth.ops_models import Caption


def _with_threads(threads: int, fn: Callable[[], list[str]]) -> list[str]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def run(quick: bool = False) -> list[Row]:
    n_sampled, repeats, batch_size = (16, 1, 8) if quick else (48, 3, 16)
    open_clip = import_open_clip()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        config, checkpoint = save_tiny_model(d, coca=True)
        model, preprocess, _ = load_model(config, checkpoint)
        for mode, settings in (
            ("sampled", {"generation_type": "top_k", "seq_len": 20}),
            ("beam", {"generation_type": "beam_search", "seq_len": 20}),
        ):
            n = n_sampled if mode == "sampled" else 2 * batch_size  # beam search is ~5x slower: two batches
            table = samples_table(image_caption_rows(n))
            images = [segs[0]["bytes"] for segs in table["segments"].to_pylist()]
            keys = [f"{sample_id}/0" for sample_id in table["id"].to_pylist()]
            op = Caption(config=config, checkpoint=checkpoint, batch_size=batch_size, overwrite=True, **settings)
            op.setup()
            captioner = op.captioner
            kwargs, seed, threads = dict(captioner.kwargs), captioner.seed, captioner.threads or 1

            def ours(op: Caption = op, table=table) -> list[str]:
                out = op(table)
                return [s[0]["meta"] for s in out["segments"].to_pylist()]

            def pixels(data: list[bytes]) -> torch.Tensor:
                return torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in data])

            def bare_sampled(kwargs: dict = kwargs, seed: int = seed, images=images, keys=keys) -> list[str]:
                out = []
                with torch.inference_mode():
                    for data, key in zip(images, keys, strict=True):
                        torch.manual_seed(sample_seed(seed, key))
                        out += [clean_caption(open_clip.decode(t)) for t in model.generate(pixels([data]), **kwargs)]
                return out

            def bare_batched(kwargs: dict = kwargs, images=images) -> list[str]:
                out = []
                with torch.inference_mode():
                    for lo in range(0, len(images), batch_size):
                        tokens = model.generate(pixels(images[lo : lo + batch_size]), **kwargs)
                        out += [clean_caption(open_clip.decode(t)) for t in tokens]
                return out

            bare_fn = bare_sampled if mode == "sampled" else bare_batched

            def bare(bare_fn: Callable[[], list[str]] = bare_fn, threads: int = threads) -> list[str]:
                return _with_threads(threads, bare_fn)

            metas, theirs = ours(), bare()  # warm-up, and both must write the same captions
            mine = [json.loads(m)["caption"] for m in metas]
            if mine != theirs:
                raise RuntimeError(f"caption {mode}: ours and bare disagree; the benchmark would compare other work")
            t = alternate_best({"ours": ours, "bare": bare}, repeats)
            how = "one image per generate, seeded per image" if mode == "sampled" else f"batches of {batch_size}"
            notes = f"tiny CoCa, {settings['generation_type']}, seq_len 20, {how}, {n} JPEGs; {cpu_note(t)}"
            notes += f"; torch threads {threads} both sides, {os.cpu_count()} cores"
            rows.append(result(f"caption.coca-{mode}", "images/s", n / t["ours"], n / t["bare"], notes))
    return rows


if __name__ == "__main__":
    main(run)
