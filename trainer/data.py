"""Shards → packed training sequences: streaming, rank/worker split, weighted mixture, exact resume.

Each mixture entry is a list of shard-set manifests (local or ``s3://``), optionally filtered to
some sample kinds (the manifest's per-shard kind counts skip shards that hold none). An entry is an
endless sequence of *shard slots*: epoch ``e`` visits its shards in a permutation seeded by ``e``;
slot ``k`` belongs to stream ``k mod W``, where the W streams are every (rank, loader worker). So no
two streams ever read the same slot, and a tiny set still feeds every stream (in alternate epochs).
Shards are read with webdataset's tar iterators and decoded by ``shards.codec.decode_sample``.

Shards are checked against their manifest entry before a byte is parsed (``verify_shards``): ``size``
is one stat; ``sha256`` (the default) reads the shard once while hashing, into the page cache for a
local file or into an unlinked temporary file for a remote one, and parses only after the digest
matched, so a flipped byte is never trained on. A damaged or unreadable shard is skipped with one
WARNING line naming it and counted in the skip counters. Segment ``uri`` reads are confined to the
stage's ``allow_uris`` plus the ``allow_uris`` the shard-set manifests carry (the recipe's).

A stream draws an entry by weight (a PCG64 generator), builds the sample's sequence
(``trainer.sequence``) and packs greedily into ``seq_len``. The data position — every entry's slot
and offset and the generator state — is snapshotted before each draw; a pack carries the snapshot
taken before the example that did not fit in it. Restarting from that snapshot re-reads that example
first, so the packing buffer needs no storage and a resumed run sees exactly the same sample ids.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import storage
from shards.codec import DecodeError, decode_sample
from shards.confine import UriPolicy
from shards.manifest import read_shardset_manifest
from shards.verify import shard_damage
from trainer.sequence import IGNORE, Example, SkipSample, build_example

log = logging.getLogger(__name__)
VERIFY_MODES = ("sha256", "size", "none")
WARN_ONCE_REASONS = ("uri not allowed", "uri unreadable")  # per-sample skips worth one log line per stream
_warned_shards: set[tuple[str, str, str]] = set()  # (reader, shard, problem): one line each per process


class ShardDamaged(Exception):
    """A shard that does not match its manifest entry; ``kind`` keys the skip counter, ``detail`` the log."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _damage_kind(reason: str) -> str:
    for prefix, kind in (("size", "size mismatch"), ("sha256", "sha256 mismatch"), ("missing", "missing")):
        if reason.startswith(prefix):
            return kind
    return "unreadable"


def _warn_shard(url: str, message: str, reader: str = "loader") -> None:
    """Log ``message`` once per reader, shard and problem (its first word), whatever the epoch."""
    key = (reader, url, message.split(" ", 1)[0])
    if key not in _warned_shards:
        _warned_shards.add(key)
        log.warning("%s", message)


@contextlib.contextmanager
def open_shard(url: str, expected: Mapping[str, Any] | None, verify: str = "sha256") -> Iterator[IO[bytes]]:
    """The shard's bytes, open at 0, after they matched ``expected`` (a manifest entry) as ``verify`` asks.

    ``sha256`` hashes the same handle that is then parsed (local) or a copy made while hashing into an
    unlinked temporary file under ``$TMPDIR`` (remote), so the bytes parsed are the bytes hashed.
    Raises ``ShardDamaged``."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify_shards must be one of {VERIFY_MODES}, not {verify!r}")
    if expected is None or verify == "none":
        with storage.open_read(url) as f:
            yield f
        return
    reason = shard_damage(url, expected)  # one stat: catches truncation before any read
    if reason:
        raise ShardDamaged(_damage_kind(reason), reason)
    want = expected.get("sha256")
    if verify == "size" or not want:
        with storage.open_read(url) as f:
            yield f
        return
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(storage.open_read(url))
        spool = src if not storage.is_remote(url) else stack.enter_context(tempfile.TemporaryFile())
        h = hashlib.sha256()
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            if spool is not src:
                spool.write(chunk)
        if h.hexdigest() != want:
            raise ShardDamaged("sha256 mismatch", f"sha256 {h.hexdigest()[:16]}…, manifest says {want[:16]}…")
        spool.seek(0)
        yield spool


@dataclass
class MixtureEntry:
    """One weighted source of a stage's mixture, resolved to shard URLs.

    ``expected`` holds each shard's manifest entry (``bytes``, ``sha256``), parallel to ``shards``;
    None (a hand-made entry) skips verification. ``allow_uris``: where segment uris may point."""

    name: str
    shards: list[str]
    weight: float
    kinds: list[str] | None = None
    format: str | None = None
    samples: int = 0
    expected: list[dict[str, Any]] | None = None
    allow_uris: list[str] = field(default_factory=list)
    verify: str = "sha256"
    categories: list[str] | None = None  # only samples whose meta ``category`` is one of these (Table 5)


def manifest_shards(manifest: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(shard url, its manifest entry) pairs of a shard-set manifest, and the ``allow_uris`` it carries.

    A shard path must stay in the manifest's folder: a manifest is data, not a way to name any file."""
    directory = manifest.rsplit("/", 1)[0] if manifest.endswith(".json") else manifest
    doc = read_shardset_manifest(manifest)
    out = []
    for shard in doc["shards"]:
        path = shard.get("path")
        if not isinstance(path, str) or not path or path.startswith("/") or "://" in path or ".." in path.split("/"):
            raise ValueError(f"shard-set manifest {manifest}: shard path {str(path)[:200]!r} leaves its folder")
        out.append((storage.join(directory, path), shard))
    allow = doc.get("allow_uris") or []
    if not isinstance(allow, list) or not all(isinstance(u, str) for u in allow):
        raise ValueError(f"shard-set manifest {manifest}: allow_uris is not a list of strings")
    return out, list(allow)


def resolve_entry(
    spec: dict[str, Any], allow_uris: list[str] | tuple[str, ...] = (), verify: str = "sha256"
) -> MixtureEntry:
    """Read the entry's manifests; keep shards that hold any wanted kind.

    Segment uris are allowed under ``allow_uris`` (the stage's) plus every manifest's ``allow_uris``."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify_shards must be one of {VERIFY_MODES}, not {verify!r}")
    manifests = spec.get("manifests") or [spec["manifest"]]
    kinds = list(spec["kinds"]) if spec.get("kinds") else None
    urls: list[str] = []
    expected: list[dict[str, Any]] = []
    allowed = list(allow_uris)
    samples = 0
    for m in manifests:
        try:
            pairs, manifest_allow = manifest_shards(m)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"mixture entry {spec.get('name')!r}: no shard-set manifest at {m}") from e
        allowed += manifest_allow
        for url, shard in pairs:
            n = sum(shard.get("kinds", {}).get(k, 0) for k in kinds) if kinds else shard["samples"]
            if n:
                urls.append(url)
                expected.append({"bytes": shard.get("bytes"), "sha256": shard.get("sha256")})
                samples += n
    if not urls:
        raise ValueError(f"mixture entry {spec.get('name')!r}: no shard in {manifests} holds kinds {kinds}")
    categories = [str(c) for c in spec["categories"]] if spec.get("categories") else None
    return MixtureEntry(
        spec.get("name", manifests[0]),
        urls,
        float(spec.get("weight", 1.0)),
        kinds,
        spec.get("format"),
        samples,
        expected,
        sorted(set(allowed)),
        verify,
        categories,
    )


def _tar_samples(
    url: str, skip: int, expected: Mapping[str, Any] | None = None, verify: str = "none"
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of one shard via webdataset's tar iterators, after skipping ``skip`` samples.

    The shard is verified against ``expected`` first (``open_shard``); raises ``ShardDamaged``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open_shard(url, expected, verify) as f:
        files = ({**item, "__url__": url} for item in tar_file_iterator(f))
        for i, sample in enumerate(group_by_keys(files)):
            if i < skip:
                continue
            yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def sample_category(row: dict[str, Any]) -> str | None:
    """The sample meta's ``category`` (an SFT category of Table 5), or None."""
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    category = meta.get("category") if isinstance(meta, dict) else None
    return str(category) if category is not None else None


class EntryStream:
    """One stream's endless walk over its slots of one mixture entry; ``position`` is resumable."""

    def __init__(self, entry: MixtureEntry, seed: int, index: int, stream: int, streams: int, position=None):
        self.entry = entry
        self.seed, self.index = seed, index
        self.streams = streams
        self.slot, self.offset = position if position is not None else (stream, 0)
        self._it: Iterator[tuple[str, dict[str, bytes]]] | None = None
        self._url = ""
        self._empty_slots = 0

    @property
    def position(self) -> tuple[int, int]:
        return self.slot, self.offset

    def _shard_index(self, slot: int) -> int:
        n = len(self.entry.shards)
        epoch, i = divmod(slot, n)
        order = np.random.default_rng([self.seed, self.index, epoch]).permutation(n)
        return int(order[i])

    def _shard(self, slot: int) -> str:
        return self.entry.shards[self._shard_index(slot)]

    def next_sample(self) -> dict[str, Any]:
        """The next sample of a wanted kind; undecodable samples and damaged shards are skipped (counted by
        the caller; a damaged shard is also logged once)."""
        while True:
            if self._it is None:
                i = self._shard_index(self.slot)
                expected = self.entry.expected[i] if self.entry.expected is not None else None
                self._url = self.entry.shards[i]
                self._it = _tar_samples(self._url, self.offset, expected, self.entry.verify)
            try:
                key, members = next(self._it)
            except StopIteration:
                self._next_slot()
                continue
            except ShardDamaged as e:
                url = self._url
                self._next_slot()
                _warn_shard(url, f"damaged shard {url}: {e.detail}; skipped, not trained on")
                raise SkipSample(f"damaged shard: {e.kind}", e.detail) from e
            except (tarfile.TarError, OSError, ValueError) as e:  # a truncated or unreadable shard ends early
                url = self._url
                self._next_slot()
                _warn_shard(url, f"unreadable shard {url}: {type(e).__name__}: {str(e)[:200]}; the rest is skipped")
                raise SkipSample(f"unreadable shard: {type(e).__name__}", str(e)[:200]) from e
            self.offset += 1
            try:
                row = decode_sample(key, members)
            except DecodeError as e:
                raise SkipSample(f"undecodable sample: {e.reason}") from e
            if self.entry.kinds and row["kind"] not in self.entry.kinds:
                continue
            if self.entry.categories and sample_category(row) not in self.entry.categories:
                continue
            self._empty_slots = 0
            return row

    def _next_slot(self) -> None:
        self.close()
        self.slot, self.offset = self.slot + self.streams, 0
        self._empty_slots += 1
        if self._empty_slots > 2 * len(self.entry.shards) + self.streams:
            raise RuntimeError(
                f"mixture entry {self.entry.name!r} yields no samples (its shards are empty of wanted kinds, "
                "or damaged: see the warnings above)"
            )

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


@dataclass
class Pack:
    """Examples packed into one row of ``seq_len`` tokens."""

    examples: list[Example] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(len(e) for e in self.examples)


class PackedStream(IterableDataset):
    """Packs for one rank; each DataLoader worker is one stream. Yields ``(pack arrays, state)``."""

    def __init__(
        self,
        entries: list[MixtureEntry],
        model_cfg: dict[str, Any],
        tokenizer_path: str,
        seq_len: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        states: dict[int, dict[str, Any]] | None = None,
        rotation: int = 0,
    ) -> None:
        self.entries = entries
        self.model_cfg = model_cfg
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.seed = seed
        self.rank, self.world = rank, world
        self.num_workers = max(1, num_workers)
        self.states = states or {}
        self.rotation = rotation
        weights = np.array([e.weight for e in entries], dtype=np.float64)
        if (weights <= 0).any():
            raise ValueError("mixture weights must be positive")
        self.weights = weights / weights.sum()

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.rotation) % self.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from trainer.media import MediaProcessor
        from trainer.tokenizer import load_tokenizer, special_ids

        if get_worker_info() is not None:
            torch.set_num_threads(1)  # loader workers decode media; the rank's threads do the math
        logical = self._logical_worker()
        stream = self.rank * self.num_workers + logical
        streams = self.world * self.num_workers
        tokenizer = load_tokenizer(self.tokenizer_path)
        sp = special_ids(tokenizer)
        media = MediaProcessor.from_model_config(self.model_cfg)
        state = copy.deepcopy(self.states.get(logical))
        positions = state["positions"] if state else [None] * len(self.entries)
        sources = [
            EntryStream(e, self.seed, i, stream, streams, tuple(p) if p is not None else None)
            for i, (e, p) in enumerate(zip(self.entries, positions, strict=True))
        ]
        rng = np.random.Generator(np.random.PCG64([self.seed, stream]))
        if state:
            rng.bit_generator.state = state["rng"]
        skipped: Counter = Counter(state["skipped"] if state else {})
        warned: set[str] = set()
        policies = [UriPolicy(e.allow_uris) for e in self.entries]

        cumulative = np.cumsum(self.weights)

        def snapshot() -> dict[str, Any]:
            st = rng.bit_generator.state  # a fresh dict of ints each call
            return {
                "worker": logical,
                "stream": stream,
                "positions": [list(s.position) for s in sources],
                "rng": st,
                "skipped": dict(skipped),
            }

        def next_example() -> Example:
            while True:
                pick = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(sources) - 1)
                src = sources[pick]
                sample = None
                try:
                    sample = src.next_sample()
                    ex = build_example(sample, src.entry.format, tokenizer, sp, media, policies[pick])
                    ex = ex.truncated(self.seq_len)
                    if not ex.learns_something():
                        raise SkipSample("nothing to learn within seq_len")
                    return ex
                except SkipSample as e:
                    skipped[str(e)] += 1
                    if str(e) in WARN_ONCE_REASONS and str(e) not in warned:
                        warned.add(str(e))
                        log.warning(
                            "mixture entry %r: sample %s skipped: %s (%s); later ones are only counted",
                            src.entry.name,
                            sample["id"] if sample else "?",
                            e,
                            getattr(e, "detail", ""),
                        )

        pack = Pack()
        try:
            while True:
                snap = snapshot()
                ex = next_example()
                if pack.examples and pack.length + len(ex) > self.seq_len:
                    yield pack_arrays(pack, self.seq_len, sp.eos, snap)
                    pack = Pack()
                pack.examples.append(ex)
        finally:
            for s in sources:
                s.close()


def pack_arrays(pack: Pack, seq_len: int, pad_id: int, state: dict[str, Any]) -> dict[str, Any]:
    """One pack as arrays (padded to ``seq_len``), its media, its sample ids and the state after it.

    ``seq_lens``: the pack's sample boundaries as data, each sample's length and then the padding's (one
    segment of its own); the LLM's attention stays within a segment (trainer/attention.py)."""
    from trainer.attention import seq_lens_array

    ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    tags = np.zeros(seq_len, dtype=np.int64)
    images, audios, at = [], [], 0
    for ex in pack.examples:
        n = len(ex)
        ids[at : at + n] = ex.ids
        labels[at : at + n] = ex.labels
        positions[at : at + n] = np.arange(n)
        tags[at : at + n] = ex.tag
        images.extend(ex.images)
        audios.extend(ex.audios)
        at += n
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "loss_tags": tags,
        "seq_lens": np.array(seq_lens_array([len(ex) for ex in pack.examples], seq_len), dtype=np.int64),
        "images": images,
        "audios": audios,
        "sample_ids": [ex.sample_id for ex in pack.examples],
        "tokens": at,
        "state": state,
    }


def _stack_seq_lens(packs: list[dict[str, Any]]) -> torch.Tensor:
    """``[B, S]`` segment lengths, zero-padded; a pack without ``seq_lens`` is split where its position ids
    restart."""
    from trainer.attention import Segments

    rows = [
        [int(n) for n in p["seq_lens"]]
        if p.get("seq_lens") is not None
        else Segments.from_position_ids(torch.from_numpy(np.asarray(p["position_ids"]))).lengths[0]
        for p in packs
    ]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(packs: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack packs into a micro-batch; media in row order, matching the placeholders' order."""
    batch: dict[str, Any] = {
        k: torch.from_numpy(np.stack([p[k] for p in packs]))
        for k in ("input_ids", "labels", "position_ids", "loss_tags")
    }
    batch["seq_lens"] = _stack_seq_lens(packs)
    images = [im for p in packs for im in p["images"]]
    if images:
        batch["pixel_values"] = torch.from_numpy(np.concatenate([im.patches for im in images]))
        batch["image_grid_thw"] = torch.tensor([im.grid for im in images], dtype=torch.long)
    audios = [a for p in packs for a in p["audios"]]
    if audios:
        batch["audio_mels"] = [torch.from_numpy(m) for a in audios for m in a.mels]
        batch["audio_chunk_clip"] = torch.tensor([i for i, a in enumerate(audios) for _ in a.mels])
        batch["audio_frames"] = torch.tensor([a.frames for a in audios])
        batch["audio_generate"] = torch.tensor([a.generate for a in audios])
    batch["meta"] = {
        "sample_ids": [p["sample_ids"] for p in packs],
        "tokens": sum(p["tokens"] for p in packs),
        "samples": sum(len(p["sample_ids"]) for p in packs),
        "state": packs[-1]["state"],
    }
    return batch


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "meta":
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list):  # media tensors move; other lists (an audio stage's transcripts) pass as they are
            out[k] = [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in v]
    return out


def make_loader(
    entries: list[MixtureEntry],
    model_cfg: dict[str, Any],
    tokenizer_path: str,
    seq_len: int,
    micro_batch: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    data_state: dict[str, Any] | None = None,
) -> DataLoader:
    """A loader that resumes at ``data_state`` (what ``DataPosition.as_dict`` saved) when given."""
    states, rotation = {}, 0
    if data_state:
        if data_state["num_workers"] != max(1, num_workers) or data_state["world"] != world:
            raise ValueError(
                f"the data position was saved with {data_state['world']} ranks x {data_state['num_workers']} "
                f"workers; resume with the same (now {world} x {max(1, num_workers)})"
            )
        states = {int(k): v for k, v in data_state["workers"].items()}
        rotation = data_state["microbatches"] % max(1, num_workers)
    ds = PackedStream(entries, model_cfg, tokenizer_path, seq_len, seed, rank, world, num_workers, states, rotation)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": 2, "multiprocessing_context": "fork" if os.name == "posix" else None}
    return DataLoader(ds, batch_size=micro_batch, collate_fn=collate, num_workers=num_workers, **kwargs)


@dataclass
class DataPosition:
    """What a rank has consumed: micro-batches and the latest state of every logical worker."""

    world: int
    num_workers: int
    microbatches: int = 0
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def consumed(self, batch_meta: dict[str, Any]) -> None:
        self.microbatches += 1
        self.workers[batch_meta["state"]["worker"]] = batch_meta["state"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "num_workers": max(1, self.num_workers),
            "microbatches": self.microbatches,
            "workers": {str(k): v for k, v in self.workers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(d["world"], d["num_workers"], d["microbatches"], {int(k): v for k, v in d["workers"].items()})


def corpus_texts(manifests: list[str], limit: int = 100_000, verify: str = "sha256") -> Iterator[str]:
    """Text segments of the shard sets (to train the tiny tokenizer), then the formats' fixed prompts.

    Shards are verified like the loader's; a damaged or unreadable one is skipped with a warning
    (the tokenizer pre-pass must not be the thing that stops a run)."""
    from trainer.sequence import FORMATS

    n = 0
    for m in manifests:
        for url, entry in manifest_shards(m)[0]:
            try:
                for key, members in _tar_samples(url, 0, entry, verify):
                    try:
                        row = decode_sample(key, members)
                    except DecodeError:
                        continue
                    for seg in row["segments"]:
                        if seg["modality"] == "text" and seg.get("text"):
                            yield seg["text"]
                            n += 1
                            if n >= limit:
                                return
            except ShardDamaged as e:
                _warn_shard(url, f"damaged shard {url}: {e.detail}; skipped by the tokenizer pre-pass", "tokenizer")
            except (tarfile.TarError, OSError, ValueError) as e:
                detail = f"{type(e).__name__}: {str(e)[:200]}"
                _warn_shard(url, f"unreadable shard {url}: {detail}; the rest is skipped", "tokenizer")
    yield from (f.prompt for f in FORMATS.values() if f.prompt)
