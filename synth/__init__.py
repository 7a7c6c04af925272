"""Operators that create content (captions, transcripts, speech, interleaved documents) and the
media helpers they share. Importing the package registers its operators; models load only in
``setup()``, so importing stays cheap."""

from synth import download, interleave, ops_media, ops_models, sft  # noqa: F401
