"""``count_tokens``: the model tokens of every segment, written into its meta for the manifests.

Text goes through the LLM's tokenizer (a local Hugging Face tokenizer directory, batched); media
counts follow ``shards.tokens.TokenRules`` from the sizes and durations ``validate`` probed. The
shard writer adds the per-segment counts up into each shard's manifest.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.operator import Operator, Resources, register, with_rejections
from shards.schema import dumps_meta, loads_meta, with_segment_meta
from shards.tokens import MissingMediaFacts, TokenRules, segment_tokens


@register
class CountTokens(Operator):
    """Writes each segment's model tokens into its meta: text by the LLM's tokenizer, media by
    ``shards.tokens.TokenRules``.

    Params:
        tokenizer: a local Hugging Face tokenizer directory.
        **rules: any ``TokenRules`` field: ``image_max_pixels``, ``image_min_pixels``, ``frame_max_pixels``,
            ``video_fps``, ``video_max_frames``, ``audio_tokens_per_second``.
    """

    name = "count_tokens"
    stateful = True
    resources = Resources(cpus=1)

    def __init__(self, tokenizer: str, **rules: Any) -> None:
        super().__init__(tokenizer=tokenizer, **rules)
        self.tokenizer_path = tokenizer
        self.rules = TokenRules(**rules)
        self.tokenizer: Any = None

    def setup(self) -> None:
        from trainer.tokenizer import load_tokenizer  # the model's own tokenizer, from a local dir

        self.tokenizer = load_tokenizer(self.tokenizer_path)

    def _count_texts(self, texts: list[str]) -> dict[str, int]:
        unique = sorted(set(texts))
        if not unique:
            return {}
        ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        return {t: len(i) for t, i in zip(unique, ids, strict=True)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tokenizer is None:
            self.setup()
        rows = batch["segments"].to_pylist()
        text_counts = self._count_texts([s["text"] for segs in rows for s in segs if s["modality"] == "text"])
        metas: list[str | None] = []
        reasons: list[str | None] = []
        details: list[str | None] = []
        for segs in rows:
            counted = []
            reason = detail = None
            for seg in segs:
                try:
                    n = segment_tokens(seg, lambda t: text_counts[t], self.rules)
                except MissingMediaFacts as e:
                    reason, detail = "no media facts for token count", str(e)
                    break
                counted.append(dumps_meta({**loads_meta(seg["meta"]), "tokens": n}))
            metas.extend(counted if reason is None else [s["meta"] for s in segs])
            reasons.append(reason)
            details.append(detail)
        return with_rejections(with_segment_meta(batch, metas), reasons, details)
