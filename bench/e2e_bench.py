"""One whole run against the bare libraries doing the same work in one plain loop.

Input: a folder of real JPEGs with caption files and a JSONL of multilingual documents. Ours runs
the recipe ``validate → content_hash → langid → count_tokens`` through the run directory (units,
shards with manifests, rejects ledger, commit log), on the local executor and on a local Ray.
Bare: read the files, PIL decode, xxhash the bytes and texts, one batched fastText ``predict``,
one batched tokenizer call, Qwen2-VL's ``smart_resize`` for image tokens, tarfile + fsync.
Ray's start-up is timed apart: the Ray row times a second run on the started cluster.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import xxhash
from PIL import Image

from bench.common import MB, Row, best_times, jpeg_variants, main, result
from bench.langid_bench import texts
from pipelines.demo_data import PHOTOS
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict

STEPS = ("validate", "content_hash", "langid", "count_tokens")


def _build_inputs(root: Path, n_images: int, n_docs: int) -> tuple[Path, Path, Path]:
    from trainer.tokenizer import train_tiny_tokenizer

    photos = root / "photos"
    photos.mkdir(parents=True)
    images, captions = jpeg_variants(), list(PHOTOS.values())
    for i in range(n_images):
        (photos / f"{i:06d}.jpg").write_bytes(images[i % len(images)])
        (photos / f"{i:06d}.txt").write_text(f"{captions[i % len(captions)]} ({i})", encoding="utf-8")
    docs = root / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts(n_docs)):
            f.write(json.dumps({"text": f"{text} ({i})"}, ensure_ascii=False) + "\n")
    tokenizer = root / "tokenizer"
    train_tiny_tokenizer(texts(2000) + captions, tokenizer, vocab_size=2048)
    return photos, docs, tokenizer


def _recipe(photos: Path, docs: Path, tokenizer: Path, output: Path, executor: str, unit: int) -> dict:
    steps: list[dict] = [{"op": s} for s in STEPS]
    steps[-1]["params"] = {"tokenizer": str(tokenizer)}
    return {
        "name": "e2e-bench",
        "output": str(output),
        "sources": [
            {"name": "photos", "type": "local", "path": str(photos), "unit_size": unit},
            {"name": "docs", "type": "jsonl", "path": str(docs), "unit_bytes": 512 * 1024},
        ],
        "pipeline": steps,
        "shards": {"max_samples": 10_000, "max_bytes": "1GB"},
        "executor": {"type": executor, "num_cpus": os.cpu_count() or 2, "object_store_memory": "1GB"},
    }


def _bare(photos: Path, docs: Path, tokenizer: Path, out: Path) -> int:
    """The same work with the libraries alone: no schema, no ledger, no run directory."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from filters.langid import load_model

    model, tok = load_model(), PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    samples: list[tuple[bytes | None, str, int]] = []
    for jpg in sorted(photos.glob("*.jpg")):
        data, caption = jpg.read_bytes(), jpg.with_suffix(".txt").read_text(encoding="utf-8")
        im = Image.open(io.BytesIO(data))
        im.load()
        h, w = smart_resize(im.height, im.width, factor=28, min_pixels=3136, max_pixels=3_211_264)
        samples.append((data, caption, h * w // (28 * 28) + 2))
    with open(docs, encoding="utf-8") as f:
        samples += [(None, json.loads(line)["text"], 0) for line in f]
    all_texts = [s[1] for s in samples]
    langs, _ = model.predict([t.replace("\n", " ") for t in all_texts], k=1)
    n_tokens = [len(ids) for ids in tok(all_texts, add_special_tokens=False)["input_ids"]]
    out.mkdir(parents=True)
    with open(out / "bare-00000.tar", "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, ((data, text, image_tokens), lang, n) in enumerate(zip(samples, langs, n_tokens, strict=True)):
                doc = {"text": text, "lang": lang[0], "tokens": n + image_tokens}
                doc["text_hash"] = xxhash.xxh3_128_hexdigest(text.encode())
                members = {"json": json.dumps(doc, ensure_ascii=False).encode()}
                if data is not None:
                    doc["media_hash"] = xxhash.xxh3_128_hexdigest(data)
                    members["jpg"] = data
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        raw.flush()
        os.fsync(raw.fileno())
    return len(samples)


def run(quick: bool = False) -> list[Row]:
    n_images, n_docs, repeats = (200, 2000, 1) if quick else (1000, 20_000, 3)
    runs = itertools.count()
    with tempfile.TemporaryDirectory(prefix="omni-e2e-") as tmp:
        root = Path(tmp)
        photos, docs, tokenizer = _build_inputs(root / "inputs", n_images, n_docs)
        input_mb = (sum(p.stat().st_size for p in photos.iterdir()) + docs.stat().st_size) / MB
        n = n_images + n_docs

        def ours(executor: str) -> None:
            unit = max(50, n_images // (2 * (os.cpu_count() or 2)))
            recipe = recipe_from_dict(_recipe(photos, docs, tokenizer, root / f"run-{next(runs)}", executor, unit))
            manifest = run_recipe(recipe, progress=False)
            if manifest["written"] != n:
                raise RuntimeError(f"expected {n} samples written, got {manifest['written']}")

        def bare() -> None:
            if _bare(photos, docs, tokenizer, root / f"bare-{next(runs)}") != n:
                raise RuntimeError("bare loop lost samples")

        times = best_times({"ours": lambda: ours("local"), "bare": bare}, repeats)
        import ray

        start = time.perf_counter()
        ours("ray")  # starts the local Ray cluster
        first_ray = time.perf_counter() - start
        ray_times = best_times({"ours": lambda: ours("ray"), "bare": bare}, repeats)
        ray.shutdown()

    what = f"{n_images} images + {n_docs} docs, {input_mb:.1f} MB; {' → '.join(STEPS)} → shards"
    return [
        result("e2e.local", "samples/s", n / times["ours"], n / times["bare"], f"bare=libraries in one loop; {what}"),
        result("e2e.local", "MB/s", input_mb / times["ours"], input_mb / times["bare"], "input bytes"),
        result(
            "e2e.ray",
            "samples/s",
            n / ray_times["ours"],
            n / ray_times["bare"],
            f"local Ray, {os.cpu_count()} CPUs, started; first run with start-up {first_ray:.1f}s",
        ),
    ]


if __name__ == "__main__":
    main(run)
