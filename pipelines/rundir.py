"""The run directory: plan, committed work units, shards, rejects ledger, manifests.

    RUN/run.json             recipe, its config hash, code version, created time
    RUN/plan.json            the work units, frozen at the first start
    RUN/shards/*.tar         committed shards (<unit>-<part>-NNNNN.tar) + shards/manifest.json
    RUN/rejects/*.parquet    the rejects ledger (id, stage, reason, detail, unit, source, locator)
    RUN/units/<unit>.json    a unit's commit marker: what it ingested, wrote and rejected
    RUN/manifest.json        run totals, written when the run finishes
    RUN/lock.json            who runs in it now (``RunLock``); gone when that run ends

A unit counts as done only when its marker exists; the marker is written (atomically) after its
shards and ledger part. Files of units without a marker are leftovers of a killed run and are
removed before the unit runs again, so a re-run never duplicates or loses a sample. A committed
unit whose files are no longer what its marker says (``damaged_units``) is uncommitted and redone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import posixpath
import shlex
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.recipe import Recipe
from shards import storage
from shards.manifest import ShardInfo, summarize, write_shardset_manifest
from shards.verify import sha256_of, size_damage

log = logging.getLogger(__name__)
LOCK_NAME = "lock.json"
DEFAULT_LOCK_TTL = 60.0  # seconds without a heartbeat after which a remote lock is stale (OMNI_LOCK_TTL)

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("unit", pa.string()),
        pa.field("source", pa.string()),
        pa.field("locator", pa.string()),
    ]
)


def add_timings(total: dict[str, dict[str, float]], more: dict[str, dict[str, float]]) -> None:
    """Sum per-stage ``{seconds, rows}`` (from unit parts, or from unit markers)."""
    for stage, t in more.items():
        acc = total.setdefault(stage, {"seconds": 0.0, "rows": 0})
        acc["seconds"] += t["seconds"]
        acc["rows"] += t["rows"]


class ResumeRefused(RuntimeError):
    """The run directory belongs to a different recipe; resuming would mix two corpora."""


class RunLocked(ResumeRefused):
    """Another live run holds the run directory; running too would delete its uncommitted files."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _command() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    if argv[0] in ("cli.py", "__main__.py", "omni"):
        argv[0] = "omni"
    return shlex.join(argv)[:300]


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    text = f"{holder.get('host', '?')}:{holder.get('pid', '?')} (started {holder.get('started', '?')}"
    return text + (f", {holder['command']})" if holder.get("command") else ")")


def _parse_holder(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """Exclusive use of a run directory, from start to finish of one ``omni run``.

    Local (or any mounted filesystem): ``RUN/lock.json`` with the holder's host, pid, start time
    and command, locked with ``flock`` on a descriptor kept open for the run's life. The kernel
    drops the lock when the process dies however it dies, so the lock of a SIGKILLed run is free
    at once and the next run takes it over (the file it left only names whom it took it from).

    Remote (S3): the object ``RUN/lock.json`` created with a conditional put (``If-None-Match: *``)
    and rewritten every ``ttl / 4`` seconds by a daemon thread (``If-Match`` its last ETag). No
    process can vouch for a dead host, so a lock not rewritten for ``ttl`` seconds (on the store's
    clock) is stale and is taken over, again with a conditional put, so of two runs that find it
    stale at once exactly one wins. A holder whose heartbeat finds the lock taken over has lost
    it: ``check()`` then refuses to finish the run.
    """

    def __init__(self, root: str, command: str | None = None, ttl: float | None = None) -> None:
        self.root = root if storage.is_remote(root) else root.removeprefix("file://")
        self.path = storage.join(self.root, LOCK_NAME)
        try:
            self.ttl = float(ttl if ttl is not None else os.environ.get("OMNI_LOCK_TTL", DEFAULT_LOCK_TTL))
        except ValueError:
            raise ResumeRefused(f"OMNI_LOCK_TTL must be seconds, not {os.environ.get('OMNI_LOCK_TTL')!r}") from None
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "command": command if command is not None else _command(),
            "token": uuid.uuid4().hex,
        }
        self.taken_from: dict[str, Any] | None = None  # the holder of a stale lock this one took over
        self.lost_to: dict[str, Any] | None = None
        self._fd: int | None = None
        self._made_root = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------ common

    def _refuse(self, holder: dict[str, Any] | None) -> RunLocked:
        return RunLocked(
            f"run directory {self.root} is in use by {_holder_text(holder)}; wait for that run to end or stop it"
        )

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": _now()}).encode()

    def acquire(self) -> RunLock:
        if storage.is_remote(self.root):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def release(self) -> None:
        if storage.is_remote(self.root):
            self._release_remote()
        else:
            self._release_local()

    def check(self) -> None:
        """Raise when the lock was lost while the run went on (a remote heartbeat that found it taken)."""
        if self.lost_to is not None:
            raise RunLocked(
                f"run directory {self.root}: this run lost its lock to {_holder_text(self.lost_to)} (no heartbeat "
                f"for over {self.ttl:.0f}s); stop that run or wait for it, then run again to redo what it removed"
            )

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ local: flock

    def _read_local_holder(self) -> dict[str, Any] | None:
        """The holder info; it is written right after the flock, so an empty or half-written file
        is read again for a moment before giving up on naming the holder."""
        for _ in range(40):
            try:
                with open(self.path, "rb") as f:
                    holder = _parse_holder(f.read())
            except FileNotFoundError:
                holder = None
            if holder is not None:
                return holder
            time.sleep(0.025)
        return None

    def _acquire_local(self) -> None:
        self._made_root = not os.path.isdir(self.root)
        os.makedirs(self.root, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._refuse(self._read_local_holder()) from None
                log.warning("run directory %s: cannot lock %s (%s); running without a lock", self.root, self.path, e)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its releasing holder had just unlinked: lock the new one
        self._fd = fd
        old = _parse_holder(os.pread(fd, 1 << 16, 0))
        if old is not None:
            self.taken_from = old
            log.warning(
                "run directory %s: taking over the lock of %s, which ended without releasing it",
                self.root,
                _holder_text(old),
            )
        body = self._body()
        os.pwrite(fd, body, 0)
        os.ftruncate(fd, len(body))
        os.fsync(fd)

    def _release_local(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # while still locked, so nobody locks a file about to vanish
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
        if self._made_root:  # a run that failed before writing anything leaves no directory behind
            with contextlib.suppress(OSError):
                os.rmdir(self.root)

    # ------------------------------------------------------------ remote: conditional puts + heartbeat

    def _acquire_remote(self) -> None:
        holder: dict[str, Any] | None = None
        for _ in range(5):
            try:
                self._etag = storage.put_conditional(self.path, self._body())
                break
            except storage.Conflict:
                pass
            try:
                data, etag, age = storage.read_versioned(self.path)
            except FileNotFoundError:
                continue  # released in between: try to create it again
            holder = _parse_holder(data)
            if age is None or age <= self.ttl:
                raise self._refuse(holder)
            try:
                self._etag = storage.put_conditional(self.path, self._body(), if_match=etag)
            except (storage.Conflict, FileNotFoundError):
                continue  # another run took it over (or it was released) first: look again
            self.taken_from = holder or {}
            log.warning(
                "run directory %s: taking over the stale lock of %s (no heartbeat for %.0fs, more than %.0fs)",
                self.root,
                _holder_text(holder),
                age,
                self.ttl,
            )
            break
        else:
            raise self._refuse(holder)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"run-lock {self.root}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        interval = max(self.ttl / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                self._etag = storage.put_conditional(self.path, self._body(), if_match=self._etag)
            except (storage.Conflict, FileNotFoundError):
                try:
                    self.lost_to = _parse_holder(storage.read_versioned(self.path)[0]) or {}
                except OSError:
                    self.lost_to = {}
                log.error("run directory %s: lost the run lock to %s", self.root, _holder_text(self.lost_to))
                return
            except Exception as e:  # noqa: BLE001 - a network blip must not end the heartbeat; the next try may work
                log.warning("run directory %s: lock heartbeat failed (%s); retrying", self.root, e)

    def _release_remote(self) -> None:
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
        if self._etag is not None and self.lost_to is None:
            try:
                storage.remove_conditional(self.path, self._etag)
            except OSError as e:
                log.warning("run directory %s: lock not removed (%s); the next run takes it over", self.root, e)
        self._etag = None


def source_roots(sources: Iterable[dict[str, Any]]) -> list[str]:
    """Where the sources' records may point: a folder source itself, a manifest file's folder
    (record paths resolve there). Written into the shard-set manifest for the trainer's URI rule."""
    from pipelines.sources import _pattern_root  # the folder above a glob's first wildcard, as ingest uses

    roots = []
    for s in sources:
        path = str(s["path"])
        pattern_root = _pattern_root(path)
        if pattern_root is not None:
            roots.append(pattern_root)
            continue
        if s.get("type") in ("jsonl", "parquet", "csv", "conversations"):
            try:
                fs, p = storage.filesystem(path)
                is_file = fs.isfile(p)
            except Exception:  # noqa: BLE001 - an unreachable source: keep its path as given
                is_file = False
            if is_file:
                path = posixpath.dirname(path.rstrip("/")) if storage.is_remote(path) else os.path.dirname(path)
        roots.append(path)
    return roots


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def uri_roots(recipe: Recipe) -> list[str]:
    """Everything a run may read from, the rule the trainer applies to the shards' URIs as well:
    the recipe's ``allow_uris``, each source's root and its ``allow_paths`` (relative ones resolved
    against the recipe's folder, as ingest does)."""

    def resolve(p: Any) -> str:
        p = str(p)
        return p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(recipe.base_dir, p))

    out = [resolve(u) for u in recipe.allow_uris]
    for spec in recipe.sources:
        out.extend(source_roots([vars(spec)]))
        out.extend(resolve(p) for p in spec.options.get("allow_paths") or [])
        if spec.options.get("media_root"):  # a conversations source's media folder
            out.append(resolve(spec.options["media_root"]))
    return _unique(out)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("omnicorpus")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class RunDir:
    root: str

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def lock(self, command: str | None = None, ttl: float | None = None) -> RunLock:
        """The run lock (a context manager); see ``RunLock``."""
        return RunLock(self.root, command=command, ttl=ttl)

    @property
    def shards_dir(self) -> str:
        return self.path("shards")

    @property
    def rejects_dir(self) -> str:
        return self.path("rejects")

    # ------------------------------------------------------------ start / resume

    def _read_json(self, name: str) -> Any:
        """A file of the run that must parse; a damaged one is a one-line refusal, not a traceback."""
        try:
            return json.loads(storage.read_bytes(self.path(name)))
        except ValueError as e:
            raise ResumeRefused(f"{self.path(name)} is damaged ({e}); use a new output directory") from None

    def start(self, recipe: Recipe, plan: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Create or reopen the run; returns the frozen plan. Refuses a changed recipe."""
        run_json = self.path("run.json")
        if storage.exists(run_json):
            info = self._read_json("run.json")
            if info["config_hash"] != recipe.config_hash():
                raise ResumeRefused(
                    f"{self.root} was made by a different recipe (config hash {info['config_hash']}, "
                    f"now {recipe.config_hash()}); use a new output directory"
                )
            return self._read_json("plan.json")
        if plan is None:
            raise ValueError("a new run needs a plan")
        for d in ("shards", "rejects", "units"):
            storage.makedirs(self.path(d))
        storage.write_bytes(self.path("plan.json"), json.dumps(plan, indent=1).encode())
        sources = [vars(s) for s in recipe.sources]
        info = {
            "name": recipe.name,
            "config_hash": recipe.config_hash(),
            "code_version": code_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "sources": sources,
            "steps": [vars(s) for s in recipe.steps],
            "units": len(plan),
            "allow_uris": uri_roots(recipe),
        }
        if recipe.sample_limit is not None:  # omni run --limit N: a scratch run, not the corpus
            info["limit"] = {"inputs_per_source": recipe.sample_limit}
        storage.write_bytes(run_json, json.dumps(info, indent=1).encode())
        return plan

    def is_started(self) -> bool:
        return storage.exists(self.path("run.json"))

    def markers(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """``(committed, broken)``: the units' commit markers, and the markers that do not parse
        (disk damage) with why. A broken marker commits nothing: its unit is redone."""
        good: dict[str, dict[str, Any]] = {}
        broken: dict[str, str] = {}
        for m in storage.listdir(self.path("units"), ".json"):
            unit = m.rsplit("/", 1)[-1][: -len(".json")]
            try:
                marker = json.loads(storage.read_bytes(m))
                if not (
                    isinstance(marker, dict)
                    and isinstance(marker.get("shards"), list)
                    and isinstance(marker.get("ledger"), list)
                    and all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in marker["shards"])
                ):
                    raise ValueError("not a commit marker")
            except (OSError, ValueError) as e:
                broken[unit] = f"{type(e).__name__}: {e}"[:200]
                continue
            good[unit] = marker
        return good, broken

    def committed(self) -> dict[str, dict[str, Any]]:
        return self.markers()[0]

    def damaged_units(self, full: bool = False) -> dict[str, list[str]]:
        """Committed units whose files are not what their marker says: ``{unit: [why, ...]}``.

        Cheap by default: one listing per directory gives every shard's size, and each ledger part's
        Parquet footer its row count (they must add up to the unit's rejects). ``full`` also
        re-hashes every shard (sha256) and reads every ledger part whole."""
        shard_sizes = storage.sizes(self.shards_dir)
        ledger_sizes = storage.sizes(self.rejects_dir)
        damaged: dict[str, list[str]] = {}
        for unit, m in sorted(self.committed().items()):
            why = []
            for s in m["shards"]:
                damage = size_damage(shard_sizes.get(s["path"]), s)
                if damage is None and full and s.get("sha256"):
                    try:
                        if sha256_of(storage.join(self.shards_dir, s["path"])) != s["sha256"]:
                            damage = "sha256 mismatch"
                    except OSError as e:
                        damage = f"unreadable: {e}"
                if damage is not None:
                    why.append(f"{s['path']}: {damage}")
            rows = 0
            for name in m["ledger"]:
                if name not in ledger_sizes:
                    why.append(f"{name}: missing")
                    continue
                try:
                    with storage.open_read(self.path("rejects", name)) as f:
                        rows += pq.read_table(f).num_rows if full else pq.read_metadata(f).num_rows
                except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
                    why.append(f"{name}: unreadable ({type(e).__name__}: {str(e)[:120]})")
            if not why and isinstance(m.get("rejected"), int) and m["ledger"] and rows != m["rejected"]:
                why.append(f"{', '.join(m['ledger'])}: {rows} rows, marker says {m['rejected']} rejects")
            if why:
                damaged[unit] = why
        return damaged

    def uncommit(self, units: Iterable[str]) -> int:
        """Remove the markers of ``units`` and then every file no marker owns; returns files removed.

        Markers go first, so a crash in between leaves only unowned files, which any resume removes."""
        for unit in units:
            storage.remove(self.path("units", f"{unit}.json"))
        return self.clean_uncommitted()

    def clean_uncommitted(self) -> int:
        """Remove shards and ledger parts that no commit marker owns; returns how many files."""
        owned = set()
        markers, broken = self.markers()
        for unit in broken:  # not a commit: its files are leftovers like any other
            storage.remove(self.path("units", f"{unit}.json"))
        for marker in markers.values():
            owned.update(s["path"] for s in marker["shards"])
            owned.update(marker["ledger"])
        removed = 0
        removed += storage.remove_stale_temporaries(self.path("units"))  # a marker cut off mid-write
        for d in (self.shards_dir, self.rejects_dir):
            removed += storage.remove_stale_temporaries(d)
            for f in storage.listdir(d):
                name = f.rsplit("/", 1)[-1]
                if name.endswith((".tar", ".parquet")) and name not in owned:
                    storage.remove(f)
                    removed += 1
        return removed

    # ------------------------------------------------------------ writing a unit

    def write_ledger(self, name: str, rows: list[dict[str, Any]]) -> str:
        table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
        path = self.path("rejects", name)
        with storage.atomic_write(path) as f:
            pq.write_table(table, f)
        return name

    def commit_unit(self, unit: str, marker: dict[str, Any]) -> None:
        storage.write_bytes(self.path("units", f"{unit}.json"), json.dumps(marker, indent=1).encode())

    # ------------------------------------------------------------ finishing

    def finish(self, plan: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the shard-set and run manifests from the commit markers."""
        markers = self.committed()
        shards = [ShardInfo.from_dict(s) for m in markers.values() for s in m["shards"]]
        info = json.loads(storage.read_bytes(self.path("run.json")))
        allow_uris = info.get("allow_uris")
        if allow_uris is None:  # a run started before run.json recorded it
            allow_uris = _unique(source_roots(info.get("sources", [])))
        write_shardset_manifest(
            self.shards_dir,
            shards,
            {
                "run": info["name"],
                "config_hash": info["config_hash"],
                "allow_uris": allow_uris,
                **({"limit": info["limit"]} if "limit" in info else {}),
            },
        )
        reasons: Counter = Counter()
        timings: dict[str, dict[str, float]] = {}
        for m in markers.values():
            reasons.update(m.get("reasons", {}))
            add_timings(timings, m.get("timings", {}))
        manifest = {
            "kind": "omnicorpus.run",
            **{k: info[k] for k in ("name", "config_hash", "code_version", "created", "sources")},
            **({"limit": info["limit"]} if "limit" in info else {}),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "units": {"planned": len(plan), "committed": len(markers)},
            "ingested": sum(m["ingested"] for m in markers.values()),
            "written": sum(m["written"] for m in markers.values()),
            "rejected": sum(m["rejected"] for m in markers.values()),
            "rejects_by_reason": dict(reasons.most_common()),
            "stage_timings": {
                stage: {**t, "rows_per_s": t["rows"] / t["seconds"] if t["seconds"] else None}
                for stage, t in timings.items()
            },
            "shardset": summarize(shards),
        }
        storage.write_bytes(self.path("manifest.json"), json.dumps(manifest, indent=1).encode())
        return manifest

    def read_ledger(self) -> pa.Table:
        parts = [pq.read_table(storage.open_read(f)) for f in storage.listdir(self.rejects_dir, ".parquet")]
        return pa.concat_tables(parts) if parts else LEDGER_SCHEMA.empty_table()

    def read_ledger_parts(self) -> tuple[dict[str, pa.Table], dict[str, str]]:
        """``({name: table}, {name: why})``: every ledger part that reads, and those that do not."""
        tables: dict[str, pa.Table] = {}
        broken: dict[str, str] = {}
        for f in storage.listdir(self.rejects_dir, ".parquet"):
            name = f.rsplit("/", 1)[-1]
            try:
                with storage.open_read(f) as fh:
                    table = pq.read_table(fh)
                tables[name] = table.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
                broken[name] = f"{type(e).__name__}: {str(e)[:160]}"
        return tables, broken
