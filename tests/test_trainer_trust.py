"""What the trainer refuses to trust: segment uris outside the allowed prefixes (local files, loopback
URLs: a real HTTP server records that it was never asked), shards that do not match their manifest
(truncated, one flipped byte; local and over HTTP), and a torch extension build lock left by a killed
build (a real ``omni train`` run finishes with it in place)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipelines.demo_data import MULTILINGUAL, PHOTOS, photo_bytes
from shards.manifest import shard_urls, write_shardset_manifest
from shards.reader import iter_samples
from shards.schema import Segment, make_sample
from shards.writer import ShardWriter
from trainer.data import DataPosition, MixtureEntry, corpus_texts, make_loader, resolve_entry
from trainer.launch import BuildLockTimeout, bound_build_waits, clear_stale_build_locks
from trainer.stages import StageError, load_model_config, load_stage
from trainer.tokenizer import train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


class Recorder(SimpleHTTPRequestHandler):
    """Serves a folder and records every request path (the SSRF witness)."""

    seen: list[str]

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        self.seen.append(self.path)
        super().do_HEAD()


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real HTTP server on loopback serving ``tmp_path/www``; yields (base url, folder, requests)."""
    www = tmp_path / "www"
    www.mkdir()
    seen: list[str] = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", www, seen
    srv.shutdown()
    srv.server_close()


def text_rows(n: int = 12) -> list[dict]:
    texts = [t for _, t in MULTILINGUAL] + list(PHOTOS.values())
    return [make_sample("t", "text", [Segment("text", text=t)], locator=f"text/{i}") for i, t in enumerate(texts[:n])]


def shard_set(directory: Path, rows: list[dict], per_shard: int = 3, extra: dict | None = None) -> str:
    return write_shardset_manifest(str(directory), ShardWriter(str(directory), "s", per_shard).write_all(rows), extra)


def ids_of(url: str) -> set[str]:
    return {s["id"] for s in iter_samples(url)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("trust")
    good = shard_set(root / "good", text_rows())
    tok = root / "tokenizer"
    train_tiny_tokenizer(corpus_texts([good]), tok, 600)
    return {"root": root, "good": good, "tokenizer": str(tok), "cfg": load_model_config("tiny")}


def damaged_copy(good: str, to: Path) -> tuple[str, list[str]]:
    """A copy of the set with shard 0 cut short and one letter of a text in shard 1 changed (same size)."""
    shutil.copytree(Path(good).parent, to)
    urls = shard_urls(str(to / "manifest.json"))
    cut = Path(urls[0])
    data = cut.read_bytes()
    cut.write_bytes(data[: data.rindex(b'"text": "') + 5])  # inside the last member, as a crashed copy leaves it
    flipped = Path(urls[1])
    data = bytearray(flipped.read_bytes())
    at = data.index(b'"text": "') + len(b'"text": "') + 2
    data[at] ^= 0x01  # still valid JSON and a valid tar: only the digest can tell
    flipped.write_bytes(bytes(data))
    return str(to / "manifest.json"), urls


def take_ids(entries: list[MixtureEntry], base: dict, batches: int) -> tuple[set[str], dict[str, int]]:
    loader = make_loader(entries, base["cfg"], base["tokenizer"], 256, 1, 3, 0, 1, 0)
    position = DataPosition(1, 0)
    ids: set[str] = set()
    for i, batch in enumerate(loader):
        position.consumed(batch["meta"])
        ids |= {x for row in batch["meta"]["sample_ids"] for x in row}
        if i + 1 == batches:
            break
    return ids, position.workers[0]["skipped"]


def test_uris_outside_the_allowed_prefixes_are_never_read(base, http_dir, tmp_path: Path, caplog) -> None:
    url, www, seen = http_dir
    (www / "x").write_bytes(photo_bytes("coffee", size=(64, 64)))
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.jpg").write_bytes(photo_bytes("coins", size=(64, 64)))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(photo_bytes("camera", size=(64, 64)))
    hostile = ["/etc/passwd", "file:///etc/passwd", f"{url}/x", f"{allowed}/../secret.jpg", str(secret)]

    def row(uri: str, i: int) -> dict:
        segs = [Segment("image", uri=uri), Segment("text", text=f"a photograph, number {i}")]
        return make_sample("t", "image_caption", segs, locator=f"uri/{i}")

    rows = [row(u, i) for i, u in enumerate([*hostile, str(allowed / "ok.jpg")])]
    manifest = shard_set(tmp_path / "set", rows, per_shard=10, extra={"allow_uris": [str(allowed)]})
    entry = resolve_entry({"name": "uris", "manifest": manifest})
    assert entry.allow_uris == [str(allowed)]
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ids, skipped = take_ids([entry], base, 3)
    assert ids == {rows[-1]["id"]}, "only the sample under the manifest's allowed prefix trains"
    assert skipped["uri not allowed"] >= len(hostile) and "uri unreadable" not in skipped
    assert seen == [], "the loopback server was never asked"
    warned = [r.getMessage() for r in caplog.records if "uri not allowed" in r.getMessage()]
    assert len(warned) == 1 and "later ones are only counted" in warned[0]

    (www / "x.jpg").write_bytes(photo_bytes("coffee", size=(64, 64)))
    web = make_sample("t", "image_caption", [Segment("image", uri=f"{url}/x.jpg"), Segment("text", text="web")], "w")
    stage_allowed = shard_set(tmp_path / "web", [web])
    ids, _ = take_ids([resolve_entry({"name": "web", "manifest": stage_allowed}, allow_uris=[f"{url}/"])], base, 1)
    assert ids == {web["id"]} and set(seen) == {"/x.jpg"}, "the stage's allow_uris opens exactly that prefix"


def test_damaged_shards_are_skipped_with_a_warning_and_never_trained_on(base, tmp_path: Path, caplog) -> None:
    manifest, urls = damaged_copy(base["good"], tmp_path / "damaged")
    good_ids = set().union(*(ids_of(u) for u in urls[2:]))
    all_ids = good_ids | ids_of(urls[1])  # the flipped shard still parses: without sha256 it would train
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ids, skipped = take_ids([resolve_entry({"name": "d", "manifest": manifest})], base, 12)
    assert ids == good_ids
    assert skipped["damaged shard: size mismatch"] >= 1 and skipped["damaged shard: sha256 mismatch"] >= 1
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(urls[0] in m and "manifest says" in m for m in lines), lines
    assert any(urls[1] in m and "sha256" in m for m in lines), lines
    assert len([m for m in lines if urls[0] in m]) == 1, "one line per shard, not one per epoch"

    ids, skipped = take_ids([resolve_entry({"name": "d", "manifest": manifest}, verify="size")], base, 12)
    assert ids == all_ids and skipped["damaged shard: size mismatch"] >= 1, "size alone misses a flipped byte"


def test_remote_shards_are_hashed_into_a_spool_before_parsing(base, http_dir) -> None:
    url, www, seen = http_dir
    manifest, urls = damaged_copy(base["good"], www / "set")
    good_ids = set().union(*(ids_of(u) for u in urls[2:]))
    entry = resolve_entry({"name": "web", "manifest": f"{url}/set/manifest.json"})
    assert entry.shards[0].startswith("http://") and entry.expected[0]["sha256"]
    ids, skipped = take_ids([entry], base, 12)
    assert ids == good_ids and skipped["damaged shard: sha256 mismatch"] >= 1
    assert any(p.endswith(Path(urls[1]).name) for p in seen)


def test_unreadable_shards_are_logged_once_and_the_tokenizer_pass_survives(base, tmp_path: Path, caplog) -> None:
    manifest, urls = damaged_copy(base["good"], tmp_path / "damaged")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        texts = list(corpus_texts([manifest]))
        unverified = list(corpus_texts([manifest], verify="none"))  # the truncated tar itself breaks
    good = [s["segments"][0]["text"] for u in urls[2:] for s in iter_samples(u)]
    assert texts[: len(good)] == good and not set(texts[len(good) :]) & {t for _, t in MULTILINGUAL}
    assert set(good) <= set(unverified)
    messages = [r.getMessage() for r in caplog.records]
    assert any("tokenizer pre-pass" in m and urls[0] in m for m in messages)
    assert any("unreadable shard" in m and urls[0] in m for m in messages)

    caplog.clear()
    hand = MixtureEntry("hand", [urls[0], *urls[2:]], 1.0)  # no manifest entries: the tar itself breaks
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ids, skipped = take_ids([hand], base, 16)
    assert any(k.startswith("unreadable shard") for k in skipped)
    assert len([r for r in caplog.records if "unreadable shard" in r.getMessage() and urls[0] in r.getMessage()]) == 1


def test_stage_trust_keys_are_checked(tmp_path: Path) -> None:
    stage = REPO / "conf" / "stages" / "1.1-image-projector.yaml"
    loaded = load_stage(stage, ["allow_uris=[s3://media/]"])
    assert loaded.allow_uris == ["s3://media/"] and loaded.verify_shards == "sha256"
    with pytest.raises(StageError, match="verify_shards must be"):
        load_stage(stage, ["verify_shards=md5"])
    with pytest.raises(StageError, match="allow_uris must be"):
        load_stage(stage, ["allow_uris=s3://media/"])


def test_a_held_build_lock_is_kept_and_its_wait_ends_with_a_clear_error(tmp_path: Path) -> None:
    from torch.utils.file_baton import FileBaton

    held = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    held.parent.mkdir(parents=True)
    stale = tmp_path / "ext" / "py311_cpu" / "cpu_adam" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    baton = FileBaton(str(held))
    assert baton.try_acquire()  # a live builder: this process holds the descriptor
    try:
        assert clear_stale_build_locks(tmp_path / "ext") == [stale]
        assert held.exists() and not stale.exists()
        original = FileBaton.wait
        try:
            bound_build_waits(0.3)
            with pytest.raises(BuildLockTimeout, match="waited 0.3 s on the torch extension build lock"):
                FileBaton(str(held)).wait()
        finally:
            FileBaton.wait = original
    finally:
        baton.release()


@pytest.mark.slow
def test_omni_train_finishes_despite_a_stale_lock_damaged_shards_and_hostile_uris(base, http_dir, tmp_path) -> None:
    url, www, seen = http_dir
    (www / "x").write_bytes(b"secret")
    manifest, urls = damaged_copy(base["good"], tmp_path / "damaged")
    hostile_rows = [
        make_sample("t", "image_caption", [Segment("image", uri=u), Segment("text", text=f"caption {i}")], f"h/{i}")
        for i, u in enumerate(["/etc/passwd", "file:///etc/passwd", f"{url}/x"])
    ]
    hostile = shard_set(tmp_path / "hostile", hostile_rows + text_rows(2), per_shard=10)
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")  # what a build killed mid-way leaves
    run = tmp_path / "run"
    stage = {
        "stage": "9",
        "name": "trust",
        "model": "tiny",
        "trainable": ["lm_head"],
        "lr": {"default": 1e-3},
        "seq_len": 128,
        "num_workers": 0,
        "budget": {"steps": 2},
        "save_every": 100,
        "log_every": 1,
        "output": str(run),
        "mixture": [{"name": "damaged", "manifest": manifest}, {"name": "hostile", "manifest": hostile}],
    }
    stage_yaml = tmp_path / "stage.yaml"
    stage_yaml.write_text(yaml.safe_dump(stage))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(ext)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", str(stage_yaml), "--nproc", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # the guard: a run waiting on the lock would hang here
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"removed stale torch extension build lock {lock}" in out and not lock.exists()
    assert not list(ext.rglob("*.so")), "no JIT op build on the CPU path"
    assert f"damaged shard {urls[0]}" in out and f"damaged shard {urls[1]}" in out
    assert "uri not allowed" in out and seen == []
    good = set().union(*(ids_of(u) for u in urls[2:])) | {r["id"] for r in text_rows(2)}
    records = [json.loads(line) for line in (run / "9" / "steps.jsonl").read_text().splitlines()]
    trained = {i for r in records for rank in r["sample_ids"] for row in rank for i in row}
    assert trained and trained <= good
    assert (run / "9" / "final" / "done.json").is_file()
