"""The ``validate`` operator against bare PIL (images) and bare ffprobe + ffmpeg (audio).

Same threads on both sides: the bare loop runs on a thread pool as large as Validate's
(``threads``; PIL and ffmpeg release the GIL), and a second pair of rows runs both sides with one
thread, pinned to one core. Validate does more than the bare loop (Arrow to Python rows,
pixel-limit check, metadata written back into the table). Bare audio reads the original wav files;
Validate spills the same bytes to a temporary file first, as it must for bytes that live in a
table. Contenders run in turns, best of the same repeats.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ffmpeg
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from bench.common import Row, best_times, image_caption_rows, main, pinned, result
from filters.integrity import Validate
from pipelines.demo_data import asterisk_prompts
from pipelines.operator import REASON_COLUMN
from shards.schema import Segment, make_sample, samples_table


def _validate(op: Validate, table: pa.Table) -> None:
    out = op(table)
    if pc.sum(pc.is_valid(out[REASON_COLUMN])).as_py():
        raise RuntimeError("validate rejected real media; the benchmark would measure the wrong path")


def _each(fn: Callable[[Any], object], items: Sequence[Any], threads: int) -> None:
    if threads <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        list(pool.map(fn, items))


def _pil(data: bytes) -> None:
    im = Image.open(io.BytesIO(data))
    im.load()


def _ffmpeg(path: str) -> None:
    ffmpeg.probe(path)
    stream = ffmpeg.input(path).output("-", format="null", map="0:a:0").global_args("-xerror", "-v", "error")
    stream.run(capture_stdout=True, capture_stderr=True)


def _pair(ours: Validate, table: pa.Table, bare: Callable[[Any], object], items: Sequence[Any], repeats: int):
    _validate(ours, table)  # warm-up and sanity
    return best_times(
        {"ours": lambda: _validate(ours, table), "bare": lambda: _each(bare, items, ours.threads)}, repeats
    )


def run(quick: bool = False) -> list[Row]:
    n_images, n_audio, repeats, audio_repeats = (100, 12, 3, 1) if quick else (400, 48, 5, 3)
    pool, single = Validate(), Validate(threads=1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    table = samples_table(image_caption_rows(n_images))
    images = [segs[0]["bytes"] for segs in table["segments"].to_pylist()]
    prompts = asterisk_prompts(limit=n_audio)
    audio_table = samples_table(
        make_sample("bench", "asr", [Segment("audio", bytes=wav.read_bytes()), Segment("text", text=text)], str(wav))
        for wav, text in prompts
    )
    paths = [str(wav) for wav, _ in prompts]

    img = _pair(pool, table, _pil, images, repeats)
    aud = _pair(pool, audio_table, _ffmpeg, paths, audio_repeats)
    with pinned(1):
        img1 = _pair(single, table, _pil, images, repeats)
        aud1 = _pair(single, audio_table, _ffmpeg, paths, audio_repeats)

    n_a = len(prompts)
    threads = f"[{pool.threads} threads]"
    both = f"both sides {pool.threads} threads, {cores} cores"
    return [
        result(f"validate.image{threads}", "images/s", n_images / img["ours"], n_images / img["bare"],
               f"bare=PIL open+load; {both}"),
        result(f"validate.audio{threads}", "clips/s", n_a / aud["ours"], n_a / aud["bare"],
               f"bare=ffprobe+ffmpeg decode; {both}"),
        result("validate.image[1 core]", "images/s", n_images / img1["ours"], n_images / img1["bare"],
               "bare=PIL open+load; both 1 thread, pinned to 1 core", cores=1),
        result("validate.audio[1 core]", "clips/s", n_a / aud1["ours"], n_a / aud1["bare"],
               "bare=ffprobe+ffmpeg decode; both 1 thread, pinned to 1 core", cores=1),
    ]  # fmt: skip


if __name__ == "__main__":
    main(run)
