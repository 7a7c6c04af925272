"""Operators that create content (captions, transcripts, speech, interleaved documents) and the
media helpers they share. Importing the package registers its operators."""
