"""The dedup work directory: one materialised folder per phase and a done marker for each.

    WORK/job.json               config, its hash, the inputs (shards with sha256 and units)
    WORK/<phase>/*.parquet      a phase's output (features, candidates, edges, components/..., duplicates)
    WORK/_done/<phase>.json     written after the phase's output is complete: rows, seconds
    WORK/report.json            counts of the finished job

A phase without a marker is removed and run again, so a crash anywhere resumes at the first phase
not marked done; a marked phase is never recomputed. A work directory made with another config
refuses to resume.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from filters.dedup.config import DedupConfig
from filters.dedup.inputs import Inputs
from shards import storage


class DedupRefused(RuntimeError):
    """The work directory belongs to another job."""


def arrow_filesystem(path: str) -> tuple[str, Any]:
    """(path, filesystem) for Ray Data and pyarrow: None locally, fsspec's S3 wrapped otherwise."""
    if not storage.is_remote(path):
        return path, None
    import pyarrow.fs as pafs

    fs, stripped = storage.filesystem(path)
    return stripped, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class WorkDir:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def start(self, config: DedupConfig, inputs: Inputs) -> Inputs:
        """Create the job, or reopen it: same config required, and the inputs recorded at the start
        stand (an interrupted apply has already rewritten some shards; the apply phase checks every
        shard's sha256 against them, so a run changed by something else is still caught)."""
        job = self.path("job.json")
        if storage.exists(job):
            self.check_config(config)
            return Inputs.from_dict(json.loads(storage.read_bytes(job))["inputs"])
        doc = {"config_hash": config.config_hash(), "config": config.as_dict(), "inputs": inputs.as_dict()}
        storage.makedirs(self.root)
        storage.write_bytes(job, json.dumps(doc, indent=1).encode())
        return inputs

    def check_config(self, config: DedupConfig) -> None:
        old = json.loads(storage.read_bytes(self.path("job.json")))
        if old["config_hash"] != config.config_hash():
            raise DedupRefused(f"{self.root} holds a dedup with another config; use a new work directory")

    def done(self, phase: str) -> dict[str, Any] | None:
        marker = self.path("_done", f"{phase.replace('/', '__')}.json")
        return json.loads(storage.read_bytes(marker)) if storage.exists(marker) else None

    def remove(self, phase: str) -> None:
        fs, p = storage.filesystem(self.path(phase))
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def run(self, phase: str, fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(output_dir)`` unless ``phase`` is marked done; returns the phase's info."""
        info = self.done(phase)
        if info is not None:
            return {**info, "resumed": True}
        self.remove(phase)
        start = time.perf_counter()
        info = dict(fn(self.path(phase)) or {})
        info["seconds"] = round(time.perf_counter() - start, 3)
        storage.makedirs(self.path("_done"))
        storage.write_bytes(self.path("_done", f"{phase.replace('/', '__')}.json"), json.dumps(info).encode())
        return info

    def read_table(self, phase: str, columns: list[str] | None = None):  # -> pa.Table
        """A (small) phase output read whole in this process."""
        path, fs = arrow_filesystem(self.path(phase))
        return pq.read_table(path, columns=columns, filesystem=fs)
