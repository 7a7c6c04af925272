"""A corpus of hostile inputs through a whole run: each one lands in the ledger with its reason, the
run finishes, the audit balances, and nothing is written outside the run directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipelines.audit import audit
from pipelines.demo_data import PHOTOS, asterisk_prompts, photo_bytes
from pipelines.executor import run_recipe
from pipelines.recipe import recipe_from_dict
from pipelines.rundir import RunDir
from tests.hostile import link, png_bomb, tar_with

LIMIT = 1 << 20  # max_text_bytes for this run


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Sources plus, for every input, the reject reason it must get (None: a good control sample)."""
    src = tmp_path / "src"
    media = src / "media"
    media.mkdir(parents=True)
    rng = random.Random(0)
    jpeg = photo_bytes("astronaut")
    wav = asterisk_prompts(limit=1)[0][0].read_bytes()
    files: dict[str, tuple[bytes, str | None]] = {
        "good.jpg": (jpeg, None),
        "truncated.jpg": (jpeg[: len(jpeg) // 4], "undecodable image"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0" + rng.randbytes(5000), "undecodable image"),
        "bomb.png": (png_bomb(), "image exceeds pixel limit"),
        "empty.mp4": (b"", "empty file"),
        "garbage.mp4": (rng.randbytes(8192), "unreadable media"),
        "wrong-header.wav": (b"RIFF\x24\x00\x00\x00WAVEfmt " + rng.randbytes(3000), "unreadable media"),
        "cut.wav": (wav[: len(wav) // 3], "undecodable media"),
        "latin1.txt": ("caf\xe9".encode("latin-1"), "text is not utf-8"),
        "huge.txt": (b"x" * (LIMIT + 10), "text too large"),
        "photo.webp": (b"this is not a webp", "undecodable image"),
        "notes.exe": (b"MZ\x90\x00", "unsupported file type"),
    }
    expected: dict[str, str | None] = {}
    for name, (data, reason) in files.items():
        (media / name).write_bytes(data)
        expected[name.split(".")[0]] = reason
    (media / "passwd.txt").symlink_to("/etc/passwd")  # never opened, let alone written into a shard
    expected["passwd"] = "path outside source root"
    lines = [
        json.dumps({"text": PHOTOS["coffee"]}),
        '{"text": "no closing brace"',
        "[1, 2, 3]",
        json.dumps({"text": "y" * (LIMIT + 5)}),
        json.dumps({"image": "../../../../etc/passwd"}),
        json.dumps({"image": "/dev/zero"}),
        "[" * 100_000,
        json.dumps({"image": "file:///etc/passwd", "text": "a password file"}),
        json.dumps({"segments": [{"modality": "image", "uri": "http://127.0.0.1:9/x"}]}),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n'
    (src / "docs.jsonl").write_bytes(raw)
    offsets, pos = [], 0
    for line in raw.split(b"\n")[:-1]:
        offsets.append(pos)
        pos += len(line) + 1
    reasons = [
        None,
        "broken json line",
        "record is not an object",
        "line too long",
        "path outside allowed roots",  # relative paths resolve under the manifest's folder; ../ leaves it
        "path outside allowed roots",  # /dev/zero is never opened
        "json too deep",  # no RecursionError
        "path outside allowed roots",
        "uri not allowed",  # never fetched (an SSRF)
        "text is not utf-8",
    ]
    for off, reason in zip(offsets, reasons, strict=True):
        expected[f"docs.jsonl@{off}"] = reason
    (src / "wds").mkdir()
    tar = tar_with(
        [
            ("000.jpg", photo_bytes("coffee", size=(64, 64))),
            ("000.txt", b"a cup of coffee"),
            ("../../escape.txt", b"owned"),
            ("/tmp/absolute-escape.txt", b"owned"),
            link("001.jpg", "/etc/passwd"),
            link("002.txt", "000.txt", hard=True),
        ]
    )
    (src / "wds" / "evil.tar").write_bytes(tar)
    (src / "wds" / "cut.tar").write_bytes(tar_with([("000.txt", b"caption " * 500)])[:700])
    (src / "wds" / "readme.txt").write_text("not a shard")  # counted, not skipped
    expected["readme.txt"] = "not read: unsupported file for webdataset source"
    return src, expected


def test_hostile_corpus_is_fully_ledgered(hostile: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    src, expected = hostile
    recipe = recipe_from_dict(
        {
            "name": "hostile",
            "output": str(tmp_path / "run"),
            "sources": [
                {"name": "media", "type": "local", "path": str(src / "media"), "unit_size": 4},
                {"name": "docs", "type": "jsonl", "path": str(src / "docs.jsonl")},
                {"name": "wds", "type": "webdataset", "path": str(src / "wds")},
            ],
            "pipeline": [{"op": "validate", "params": {"max_pixels": 50_000_000, "timeout_s": 20}}],
            "limits": {"max_text_bytes": LIMIT},
        }
    )
    before = _tree(tmp_path.parent)
    m = run_recipe(recipe, executor="local", progress=False)
    written_outside = {p for p in _tree(tmp_path.parent) - before if not p.startswith(f"{tmp_path.name}/run")}
    assert written_outside == set(), "a run writes only inside its run directory"
    assert not Path("/tmp/absolute-escape.txt").exists()
    ledger = {r["locator"]: r for r in RunDir(str(tmp_path / "run")).read_ledger().to_pylist()}
    for locator, reason in expected.items():
        if reason is None:
            assert locator not in ledger, f"{locator} is a good sample: {ledger.get(locator)}"
        else:
            assert ledger[locator]["reason"] == reason, (locator, ledger[locator])
    wds = {k: v["reason"] for k, v in ledger.items() if k.startswith(("evil.tar", "cut.tar"))}
    assert sorted(wds.values()) == [
        "truncated or corrupt tar",
        "unsafe tar member: absolute path",
        "unsafe tar member: link",
        "unsafe tar member: link",
        "unsafe tar member: parent path",
    ]
    passwd = Path("/etc/passwd").read_bytes()[:64]
    assert not any(passwd in t.read_bytes() for t in (tmp_path / "run" / "shards").glob("*.tar"))
    report = audit(str(tmp_path / "run"))
    assert report.balanced, report.summary()
    assert m["written"] == 3, "good.jpg, the coffee line and the tar's one clean sample"
    assert m["ingested"] == len(expected) + 6, "plus evil.tar's sample and 4 unsafe members, and cut.tar"


def test_ray_executor_ledgers_the_hostile_corpus_like_the_local_loop(
    hostile: tuple[Path, dict[str, str]], tmp_path: Path, ray_local
) -> None:
    """The same hostile inputs through Ray Data tasks: the same rejects, the same shard bytes."""
    src, _ = hostile
    runs = {}
    for executor in ("local", "ray"):
        doc = {
            "name": "hostile",
            "output": str(tmp_path / executor),
            "sources": [
                {"name": "media", "type": "local", "path": str(src / "media"), "unit_size": 4},
                {"name": "docs", "type": "jsonl", "path": str(src / "docs.jsonl")},
                {"name": "wds", "type": "webdataset", "path": str(src / "wds")},
            ],
            "pipeline": [{"op": "validate", "params": {"max_pixels": 50_000_000, "timeout_s": 20, "threads": 1}}],
            "limits": {"max_text_bytes": LIMIT},
        }
        run_recipe(recipe_from_dict(doc), executor=executor, progress=False)
        ledger = RunDir(str(tmp_path / executor)).read_ledger().to_pylist()
        shards = {p.name: p.read_bytes() for p in sorted((tmp_path / executor / "shards").glob("*.tar"))}
        runs[executor] = (sorted((r["locator"], r["reason"], r["id"]) for r in ledger), shards)
        assert audit(str(tmp_path / executor)).balanced
    assert runs["ray"] == runs["local"]
