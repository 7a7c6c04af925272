"""One whole run against the bare libraries doing the same work in one plain loop.

Input: a folder of real JPEGs with caption files and a JSONL of multilingual documents. Ours runs
the recipe ``validate → content_hash → langid → count_tokens`` through the run directory (units,
shards with manifests, rejects ledger, commit log), on the local executor and on a local Ray.
Bare: read the files, PIL decode, xxhash the bytes and texts, one batched fastText ``predict``,
one batched tokenizer call, Qwen2-VL's ``smart_resize`` for image tokens, tarfile + fsync.

Rows: the local executor (one process; Validate checks media on threads) and the same pair pinned
to one core; Ray's start-up (``init_ray``, seconds) as its own row; the first Ray run including
start-up; runs on the started Ray, alternated with bare. Ray uses every CPU, bare one loop: the
row names say so. ``--scale N`` (or ``$E2E_SCALE``) multiplies the input (the 5x table).
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

from bench.common import MB, Row, best_times, jpeg_variants, main, pinned, result
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


def run(quick: bool = False, scale: int | None = None) -> list[Row]:
    """``scale`` multiplies the input (the issue's 5x e2e table); default: ``$E2E_SCALE`` or 1."""
    scale = max(1, int(scale or os.environ.get("E2E_SCALE") or 1))
    n_images, n_docs, repeats = (200, 2000, 1) if quick else (1000, 20_000, 3)
    n_images, n_docs = n_images * scale, n_docs * scale
    cpus = os.cpu_count() or 2
    runs = itertools.count()
    with tempfile.TemporaryDirectory(prefix="omni-e2e-") as tmp:
        root = Path(tmp)
        photos, docs, tokenizer = _build_inputs(root / "inputs", n_images, n_docs)
        input_mb = (sum(p.stat().st_size for p in photos.iterdir()) + docs.stat().st_size) / MB
        n = n_images + n_docs

        def ours(executor: str, num_cpus: int = cpus) -> None:
            unit = max(50, n_images // (2 * num_cpus))
            spec = _recipe(photos, docs, tokenizer, root / f"run-{next(runs)}", executor, unit)
            spec["executor"]["num_cpus"] = num_cpus
            manifest = run_recipe(recipe_from_dict(spec), progress=False)
            if manifest["written"] != n:
                raise RuntimeError(f"expected {n} samples written, got {manifest['written']}")

        def bare() -> None:
            if _bare(photos, docs, tokenizer, root / f"bare-{next(runs)}") != n:
                raise RuntimeError("bare loop lost samples")

        bare()  # warm-up: page cache, model files, imports, for both sides
        ours("local")
        times = best_times({"ours": lambda: ours("local"), "bare": bare}, repeats)
        with pinned(1):
            one_core = best_times({"ours": lambda: ours("local", 1), "bare": bare}, repeats)

        import ray

        from pipelines.ray_executor import init_ray

        if ray.is_initialized():
            ray.shutdown()
        settings = _recipe(photos, docs, tokenizer, root / "unused", "ray", 50)["executor"]
        start = time.perf_counter()
        init_ray(settings)  # what a run on a machine without a cluster pays first: a local Ray
        startup = time.perf_counter() - start
        start = time.perf_counter()
        ours("ray")  # the first run on the fresh cluster: worker processes, actors, imports
        first_ray = time.perf_counter() - start
        ray_times = best_times({"ours": lambda: ours("ray"), "bare": bare}, repeats)
        ray.shutdown()

    what = f"{n_images} images + {n_docs} docs, {input_mb:.1f} MB; {' → '.join(STEPS)} → shards"
    tag = "" if scale == 1 else f"@{scale}x"
    ray_what = f"local Ray, {cpus} CPUs vs bare's one loop"
    return [
        result(
            f"e2e.local{tag}",
            "samples/s",
            n / times["ours"],
            n / times["bare"],
            f"bare=libraries in one loop; {what}; ours: one process (validate's threads), {cpus} cores",
        ),
        result(f"e2e.local{tag}", "MB/s", input_mb / times["ours"], input_mb / times["bare"], "input bytes"),
        result(
            f"e2e.local{tag}[1 core]",
            "samples/s",
            n / one_core["ours"],
            n / one_core["bare"],
            "both pinned to one core (sched_setaffinity); ours with num_cpus 1",
            cores=1,
        ),
        {
            "stage": f"e2e.ray{tag}.startup",
            "unit": "1/s",
            "ours_per_s": round(1 / startup, 3),
            "bare_per_s": None,
            "ratio": None,
            "notes": f"start-up {startup:.1f}s: init of a local Ray ({cpus} CPUs, 1 GB object store); bare has none",
        },
        result(
            f"e2e.ray{tag}[first run]",
            "samples/s",
            n / (startup + first_ray),
            n / ray_times["bare"],
            f"Ray start-up + first run ({startup:.1f}s + {first_ray:.1f}s: workers, actors, imports); {ray_what}",
        ),
        result(
            f"e2e.ray{tag}[{cpus} cpus]",
            "samples/s",
            n / ray_times["ours"],
            n / ray_times["bare"],
            f"Ray already started, runs alternated with bare; {ray_what}",
        ),
    ]


def _main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scale", type=int, default=None, help="input multiplier (the 5x table: --scale 5)")
    known, rest = parser.parse_known_args(sys.argv[1:])
    main(lambda quick: run(quick, known.scale), rest)


if __name__ == "__main__":
    _main()
