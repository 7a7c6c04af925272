"""What a dedup job does, as plain data: methods, their parameters, and how the phases run.

Every field has a default, so ``DedupConfig()`` dedups text, images and audio of a finished run.
``from_dict`` reads the ``dedup:`` block of a recipe (or a YAML file holding only that block) and
rejects unknown keys, so a typo fails before any phase runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from filters.dedup.minhash import LshParams

TEXT_KINDS = ("text", "interleaved_image_text", "speech_text_interleaved", "ocr", "sft_text")


@dataclass
class ExactConfig:
    """Exact duplicates by normalised text (samples of ``text_kinds``) and by media bytes."""

    text: bool = True
    media: bool = True


@dataclass
class MinHashConfig:
    """Near-duplicate text: MinHash over word (or character) n-grams, LSH bands, then verification.

    Bands and rows default to datasketch's optimum for ``lsh_threshold`` (default ``threshold -
    0.2``), low enough that pairs at the threshold almost always share a band. Candidates are then
    verified: ``exact`` (default) computes the true Jaccard of the two shingle sets, which the
    features keep (about 4 bytes per word); ``estimate`` keeps only signatures and accepts an
    estimated Jaccard of at least ``threshold - verify_sigma * stddev(threshold)``. The estimate
    cannot tell 0.75 from 0.8 reliably (stddev ~0.035 at 128 permutations), the exact check can.
    """

    enabled: bool = True
    unit: str = "word"  # word | char
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    threshold: float = 0.8
    lsh_threshold: float | None = None
    bands: int | None = None
    rows: int | None = None
    verify: str = "exact"  # exact | estimate
    verify_sigma: float = 1.0
    min_units: int = 5  # shorter texts are left to the exact dedup

    def lsh(self) -> LshParams:
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
            return LshParams(self.bands, self.rows)
        target = self.lsh_threshold if self.lsh_threshold is not None else max(0.05, self.threshold - 0.2)
        return LshParams.for_threshold(target, self.num_perm)

    def __post_init__(self) -> None:
        if self.verify not in ("exact", "estimate"):
            raise ValueError(f"minhash.verify must be 'exact' or 'estimate', not {self.verify!r}")
        if self.unit not in ("word", "char"):
            raise ValueError(f"minhash.unit must be 'word' or 'char', not {self.unit!r}")

    def accept(self) -> float:
        if self.verify == "exact":
            return self.threshold
        t = self.threshold
        return t - self.verify_sigma * (t * (1 - t) / self.num_perm) ** 0.5


@dataclass
class PHashConfig:
    """Near-duplicate images: 64-bit pHash within ``max_distance`` bits (samples with one image)."""

    enabled: bool = True
    max_distance: int = 6
    bands: int = 4
    max_pixels: int = 64_000_000


@dataclass
class ChromaprintConfig:
    """Near-duplicate audio: chromaprint similarity ``1 - BER`` at least ``min_similarity``."""

    enabled: bool = True
    min_similarity: float = 0.85
    max_offset: int = 8
    min_overlap: float = 0.5
    max_seconds: int = 120
    num_perm: int = 64
    lsh_threshold: float = 0.25
    seed: int = 7

    def lsh(self) -> LshParams:
        return LshParams.for_threshold(self.lsh_threshold, self.num_perm)


@dataclass
class DedupConfig:
    exact: ExactConfig = field(default_factory=ExactConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    phash: PHashConfig = field(default_factory=PHashConfig)
    chromaprint: ChromaprintConfig = field(default_factory=ChromaprintConfig)
    text_kinds: tuple[str, ...] = TEXT_KINDS
    max_bucket: int = 64  # buckets up to this size give all pairs; larger ones a star and a chain
    partitions: int | None = None  # shuffle partitions; None: from the row count
    rows_per_partition: int = 1_000_000
    local_graph_max: int = 1_000_000  # pairs/edges/drops handled in the driver; beyond, by partition tasks
    task_rows: int = 50_000  # most samples per features task (a shard is cut into row ranges)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Covers everything that changes which samples are dropped (not the partitioning)."""
        doc = self.as_dict()
        for k in ("partitions", "rows_per_partition", "local_graph_max", "task_rows"):
            doc.pop(k)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> DedupConfig:
        doc = dict(doc or {})
        sections = {
            "exact": ExactConfig,
            "minhash": MinHashConfig,
            "phash": PHashConfig,
            "chromaprint": ChromaprintConfig,
        }
        kwargs: dict[str, Any] = {}
        for key, value in doc.items():
            if key in sections:
                if isinstance(value, bool):  # `phash: false` switches a method off
                    value = {"enabled": value} if key != "exact" else {"text": value, "media": value}
                kwargs[key] = _build(sections[key], value or {}, key)
            elif key == "text_kinds":
                kwargs[key] = tuple(value)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown dedup setting {key!r}")
        return cls(**kwargs)


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {where} setting(s): {', '.join(sorted(unknown))}")
    return kind(**values)
