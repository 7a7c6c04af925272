"""The ``validate`` operator against bare PIL (images) and bare ffprobe + ffmpeg (audio), serially.

Validate does more than the bare loop (Arrow to Python rows, pixel-limit check, metadata written
back into the table) but checks a batch on a thread pool, so its ratio can exceed 1 on a
multi-core machine. Bare audio reads the original wav files; Validate spills the same bytes to a
temporary file first, as it must for bytes that live in a table.
"""

from __future__ import annotations

import io
import os

import ffmpeg
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from bench.common import Row, best_time, image_caption_rows, main, result
from filters.integrity import Validate
from pipelines.demo_data import asterisk_prompts
from pipelines.operator import REASON_COLUMN
from shards.schema import Segment, make_sample, samples_table


def _validate(op: Validate, table: pa.Table) -> None:
    out = op(table)
    if pc.sum(pc.is_valid(out[REASON_COLUMN])).as_py():
        raise RuntimeError("validate rejected real media; the benchmark would measure the wrong path")


def _bare_pil(images: list[bytes]) -> None:
    for data in images:
        im = Image.open(io.BytesIO(data))
        im.load()


def _bare_ffmpeg(paths: list[str]) -> None:
    for path in paths:
        ffmpeg.probe(path)
        stream = ffmpeg.input(path).output("-", format="null", map="0:a:0").global_args("-xerror", "-v", "error")
        stream.run(capture_stdout=True, capture_stderr=True)


def run(quick: bool = False) -> list[Row]:
    n_images, n_audio, repeats, audio_repeats = (100, 12, 3, 1) if quick else (400, 48, 3, 2)
    op = Validate()
    cores = os.cpu_count()

    table = samples_table(image_caption_rows(n_images))
    images = [segs[0]["bytes"] for segs in table["segments"].to_pylist()]
    _validate(op, table)  # warm-up and sanity
    t_ours_img = best_time(lambda: _validate(op, table), repeats)
    t_bare_img = best_time(lambda: _bare_pil(images), repeats)

    prompts = asterisk_prompts(limit=n_audio)
    audio_table = samples_table(
        make_sample("bench", "asr", [Segment("audio", bytes=wav.read_bytes()), Segment("text", text=text)], str(wav))
        for wav, text in prompts
    )
    paths = [str(wav) for wav, _ in prompts]
    _validate(op, audio_table)
    t_ours_aud = best_time(lambda: _validate(op, audio_table), audio_repeats)
    t_bare_aud = best_time(lambda: _bare_ffmpeg(paths), audio_repeats)

    pool = f"validate threads={op.threads}, {cores} cores"
    return [
        result(
            "validate.image", "images/s", n_images / t_ours_img, n_images / t_bare_img, f"bare=PIL open+load; {pool}"
        ),
        result(
            "validate.audio",
            "clips/s",
            len(prompts) / t_ours_aud,
            len(prompts) / t_bare_aud,
            f"bare=ffprobe+ffmpeg decode, serial; {pool}",
        ),
    ]


if __name__ == "__main__":
    main(run)
