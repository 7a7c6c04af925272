"""Operators that drop or tag samples. Importing the package registers them.

Score steps write columns and drop nothing (``content_hash``, ``langid``, ``text_quality``,
``media_quality``, ``clip_score``); ``keep`` drops rows by thresholds on those columns; ``validate``
rejects unusable media. Global deduplication runs over a finished run: ``filters.dedup``.
"""

from filters import clipscore, content_hash, integrity, keep, langid, media_quality, text_quality  # noqa: F401
