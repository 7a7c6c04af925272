"""MinHash against rensa and datasketch, pHash against imagehash, and ``omni dedup`` against
datatrove's MinHash pipeline, with precision and recall of every dedup on the same planted corpus.

Fairness rules: contenders alternate (``best_times`` runs them in turns, same repeats), same N,
same threads; the single-core rows pin this process to one core (``os.sched_setaffinity``);
start-up (import + first call) is its own row. Both MinHash sides tokenise and shingle inside the
timing. Rows:

* ``minhash`` vs rensa's bulk ``RMinHash.digest_matrix_from_token_sets`` per core, in 1k-document
  calls and in one 20k-document call; vs datasketch's ``MinHash.update`` loop and ``MinHash.bulk``.
* ``minhash.{1,10,100}doc_calls``: the same against rensa in calls of 1, 10 and 100 documents.
* ``dedup`` (``--docs N``): the planted corpus (``filters.dedup.planted.planted_scaled``) as a shard
  set of ``--shard-docs`` documents per shard (default 100k, at least one shard per worker),
  ``omni dedup`` end to end (features to the filtered copy) on ``--workers`` processes, against
  datatrove's four-stage MinHash pipeline (signatures, buckets, cluster, filter with a writer) on its
  local executor with the same workers and the same files as JSONL; a scaling table per phase (wall,
  CPU seconds, peak worker RSS, driver RSS, tasks, rows, and whether the duplicate graph was handled
  in the driver (``local``) or by partition tasks (``distributed``); ``--local-graph-max 0`` forces
  the latter).

datatrove needs its own environment (it pulls spacy); ``--datatrove-python`` names its interpreter
(default ``/tmp/bench-venv/bin/python`` when there, else skipped).

    .venv/bin/python -m bench.dedup_bench --docs 10000 --docs 200000 --workers 2 --out dedup.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

NUM_PERM = 128
NGRAM = 5
SMALL_BATCHES = (1, 10, 100)  # calls of this many documents, on n/10 documents
SHARD_DOCS = 100_000  # documents per input shard (and per datatrove input file) in the dedup rows
_WORD = re.compile(r"\w+")
DATATROVE_PYTHON = "/tmp/bench-venv/bin/python"


# ---------------------------------------------------------------- datatrove (runs in its own venv)


def datatrove_main(inp: str, work: str, workers: int, files: int) -> None:
    """datatrove's MinHash dedup, as its README runs it; prints wall seconds and peak child RSS."""
    import resource

    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    start = time.perf_counter()
    cfg = MinhashConfig()
    common = {"workers": workers, "skip_completed": False}
    s1 = LocalPipelineExecutor(
        [JsonlReader(inp), MinhashDedupSignature(f"{work}/sigs", config=cfg)],
        tasks=files,
        logging_dir=f"{work}/logs/1",
        **common,
    )
    s2 = LocalPipelineExecutor(
        [MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
        tasks=cfg.num_buckets,
        logging_dir=f"{work}/logs/2",
        depends=s1,
        **common,
    )
    s3 = LocalPipelineExecutor(
        [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg, save_cluster_id=True)],
        tasks=1,
        logging_dir=f"{work}/logs/3",
        depends=s2,
        **common,
    )
    s4 = LocalPipelineExecutor(
        [
            JsonlReader(inp),
            MinhashDedupFilter(
                f"{work}/remove", exclusion_writer=JsonlWriter(f"{work}/removed"), load_cluster_ids=True
            ),
            JsonlWriter(f"{work}/kept"),
        ],
        tasks=files,
        logging_dir=f"{work}/logs/4",
        depends=s3,
        **common,
    )
    s4.run()
    wall = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu_s": children.ru_utime + children.ru_stime + own.ru_utime + own.ru_stime,
                "peak_rss": max(children.ru_maxrss, own.ru_maxrss) * 1024,
            }
        )
    )


# ---------------------------------------------------------------- MinHash rows (one core)


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` real documents: the docstrings, then copies with 5% of words replaced."""
    from filters.dedup.planted import real_documents

    rng = random.Random(seed)
    base = real_documents()
    vocabulary = sorted({w for d in base for w in d.split()})
    out = []
    while len(out) < n:
        doc = base[len(out) % len(base)].split()
        out.append(" ".join(w if rng.random() > 0.05 else rng.choice(vocabulary) for w in doc))
    return out


def _shingles(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return [" ".join(words[i : i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))]


def _startup(code: str) -> float:
    """Seconds for a fresh interpreter to import and make a first signature (minus a bare start)."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    cmd = [sys.executable, "-c", f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})
    )
    return float(out.stdout.strip().splitlines()[-1])


def minhash_rows(quick: bool) -> list[dict]:
    import xxhash
    from datasketch import MinHash
    from rensa import RMinHash

    from bench.common import best_times, result
    from filters.dedup.minhash import text_signatures

    n, n_plain, repeats = (4000, 200, 2) if quick else (20_000, 1000, 3)
    n_small = n // 10
    texts = corpus(n)
    words = sum(len(t.split()) for t in texts) / len(texts)
    note = f"{NUM_PERM} perms, word {NGRAM}-grams, {words:.0f} words/doc, 1 core (pinned), alternated best of {repeats}"

    def ours_batches(size: int = 1000, docs: int = n) -> None:
        for i in range(0, docs, size):
            text_signatures(texts[i : min(i + size, docs)], NUM_PERM, NGRAM)

    def rensa_call(batch: list[str]):
        return RMinHash.digest_matrix_from_token_sets([_shingles(t) for t in batch], NUM_PERM, 1)

    def rensa_batches(size: int = 1000, docs: int = n) -> None:
        for i in range(0, docs, size):
            rensa_call(texts[i : min(i + size, docs)])

    def plain_update() -> None:
        for text in texts[:n_plain]:
            m = MinHash(num_perm=NUM_PERM)
            for shingle in _shingles(text):
                m.update(shingle.encode())

    def bulk_xxhash() -> None:
        MinHash.bulk(
            [[s.encode() for s in _shingles(t)] for t in texts], num_perm=NUM_PERM, hashfunc=xxhash.xxh32_intdigest
        )

    text_signatures(texts[:50], NUM_PERM, NGRAM)  # warm-up of both (start-up is its own row below)
    rensa_call(texts[:50])
    t = best_times(
        {
            "ours_1k": ours_batches,
            "rensa_1k": rensa_batches,
            "ours_all": lambda: text_signatures(texts, NUM_PERM, NGRAM),
            "rensa_all": lambda: rensa_call(texts),
            **{f"ours_{b}": partial(ours_batches, b, n_small) for b in SMALL_BATCHES},
            **{f"rensa_{b}": partial(rensa_batches, b, n_small) for b in SMALL_BATCHES},
            "plain": plain_update,
            "ours_plain": lambda: text_signatures(texts[:n_plain], NUM_PERM, NGRAM),
            "bulk": bulk_xxhash,
        },
        repeats,
    )
    ours_start = _startup("from filters.dedup.minhash import text_signatures; text_signatures(['a b c d e f'])")
    rensa_start = _startup(
        "from rensa import RMinHash; RMinHash.digest_matrix_from_token_sets([['a b c d e']], 128, 1)"
    )
    return [
        result(
            "minhash.1k_calls", "docs/s", n / t["ours_1k"], n / t["rensa_1k"], f"bare=rensa bulk, 1k-doc calls; {note}"
        ),
        result(
            "minhash.one_call",
            "docs/s",
            n / t["ours_all"],
            n / t["rensa_all"],
            f"bare=rensa bulk, one {n}-doc call; {note}",
        ),
        *(
            result(
                f"minhash.{b}doc_calls",
                "docs/s",
                n_small / t[f"ours_{b}"],
                n_small / t[f"rensa_{b}"],
                f"bare=rensa bulk, {b}-doc calls over {n_small} docs; {note}",
            )
            for b in SMALL_BATCHES
        ),
        result(
            "minhash.datasketch",
            "docs/s",
            n_plain / t["ours_plain"],
            n_plain / t["plain"],
            f"bare=MinHash.update loop, {n_plain} docs; {note}",
        ),
        result("minhash.bulk", "docs/s", n / t["ours_all"], n / t["bulk"], f"bare=MinHash.bulk + xxhash; {note}"),
        result(
            "minhash.startup",
            "1/s",
            1 / ours_start,
            1 / rensa_start,
            "import + first call in a fresh interpreter; bare=rensa",
        ),
    ]


def phash_rows(quick: bool) -> list[dict]:
    import imagehash
    from PIL import Image

    from bench.common import best_times, jpeg_variants, result
    from filters.dedup.phash import phash64

    images = list(jpeg_variants()) * (3 if quick else 10)
    t = best_times(
        {
            "ours": lambda: [phash64(d) for d in images],
            "bare": lambda: [imagehash.phash(Image.open(io.BytesIO(d))) for d in images],
        },
        2 if quick else 3,
    )
    return [
        result(
            "phash",
            "images/s",
            len(images) / t["ours"],
            len(images) / t["bare"],
            "ours decodes a reduced JPEG draft, bare=imagehash.phash on a full decode; 1 core, alternated",
        )
    ]


def run(quick: bool = False) -> list[dict]:
    """The per-core rows (what ``bench.run_all`` collects), pinned to one core."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(saved)[0]})
    try:
        return minhash_rows(quick) + phash_rows(quick)
    finally:
        os.sched_setaffinity(0, saved)


# ---------------------------------------------------------------- dedup end to end


def write_inputs(n: int, files: int, root: Path, jsonl: bool = True):
    """The planted corpus as a shard set (ours) and as JSONL.gz files (datatrove, unless ``jsonl``
    is false), same split."""
    from filters.dedup.planted import planted_scaled
    from shards.manifest import write_shardset_manifest
    from shards.schema import Segment, make_sample
    from shards.writer import ShardWriter

    c = planted_scaled(n)
    per = -(-n // files)
    ids: dict[str, int] = {}
    with ShardWriter(str(root / "shards"), "docs", max_samples=per) as w:
        for i, t in enumerate(c.texts):
            sample = make_sample("bench", "text", [Segment("text", text=t)], locator=f"doc/{i}")
            ids[sample["id"]] = i
            w.write(sample)
    write_shardset_manifest(str(root / "shards"), w.written, {})
    (root / "jsonl").mkdir()
    for f in range(files if jsonl else 0):
        with gzip.open(root / "jsonl" / f"docs-{f:05d}.jsonl.gz", "wt", encoding="utf-8") as out:
            for i in range(f * per, min(n, (f + 1) * per)):
                out.write(json.dumps({"id": str(i), "text": c.texts[i]}) + "\n")
    return c, ids


def ours_job(root: str, workers: int, config: str) -> None:
    """``omni dedup``'s job in a fresh interpreter (as the CLI runs it): the bench's own memory (the
    corpus, the ground truth) is not inherited by the forked workers. Prints the report."""
    start = time.perf_counter()
    from filters.dedup import run_dedup

    imported = time.perf_counter()
    report = run_dedup(
        str(Path(root) / "shards"),
        work_dir=str(Path(root) / "work"),
        out=str(Path(root) / "out"),
        config=json.loads(config),
        workers=workers,
    )
    report["wall"] = time.perf_counter() - imported
    report["import_s"] = imported - start
    print(json.dumps(report))


def ours_once(
    root: Path, workers: int, ids: dict[str, int], n: int, config: dict | None = None
) -> tuple[dict, list[int]]:
    import pyarrow.parquet as pq

    for d in ("work", "out"):
        shutil.rmtree(root / d, ignore_errors=True)
    config = {"phash": False, "chromaprint": False, **(config or {})}
    cmd = [sys.executable, "-m", "bench.dedup_bench", "--ours-job", str(root), str(workers), json.dumps(config)]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    elapsed = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"omni dedup failed: {out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["startup_s"] = elapsed - report["wall"]  # interpreter start and imports
    roots = list(range(n))
    for r in pq.read_table(root / "out" / "rejects" / "dedup.parquet").to_pylist():
        roots[ids[r["id"]]] = ids[json.loads(r["detail"])["kept"]]
    return report, roots


def datatrove_once(python: str, root: Path, workers: int, files: int, n: int) -> tuple[dict, list[int]]:
    work = root / "datatrove"
    shutil.rmtree(work, ignore_errors=True)
    cmd = [python, __file__, "--datatrove-job", str(root / "jsonl"), str(work), str(workers), str(files)]
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"datatrove failed: {out.stderr[-2000:]}")
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    clusters: dict[str, list[int]] = {}
    for folder in ("kept", "removed"):
        for f in sorted((work / folder).glob("*.jsonl*")):
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    doc = json.loads(line)
                    cid = (doc.get("metadata") or {}).get("minhash_cluster_id")
                    if cid is not None and cid != -1:
                        clusters.setdefault(str(cid), []).append(int(doc["id"]))
    roots = list(range(n))
    for members in clusters.values():
        for i in members:
            roots[i] = min(members)
    return stats, roots


def dedup_rows(
    docs: list[int],
    workers: int,
    repeats: int,
    python: str | None,
    shard_docs: int = SHARD_DOCS,
    config: dict | None = None,
) -> tuple[list[dict], list[str]]:
    from bench.common import result
    from filters.dedup.planted import score_clusters

    rows, table = [], []
    table.append(
        f"{'docs':>9} {'phase':<11} {'wall_s':>8} {'cpu_s':>8} {'peak_worker_MiB':>15} {'driver_MiB':>10} "
        f"{'tasks':>6} {'rows':>9} form"
    )
    for n in docs:
        files = max(workers, -(-n // shard_docs))  # shards of at most shard_docs documents
        root = Path(tempfile.mkdtemp(prefix=f"dedup-bench-{n}-"))
        try:
            c, ids = write_inputs(n, files, root, jsonl=bool(python))
            best_ours = best_dt = None
            for _ in range(repeats):  # alternate: ours, then datatrove
                report, ours_roots = ours_once(root, workers, ids, n, config)
                if best_ours is None or report["wall"] < best_ours["wall"]:
                    best_ours = report
                if python:
                    stats, dt_roots = datatrove_once(python, root, workers, files, n)
                    if best_dt is None or stats["wall"] < best_dt["wall"]:
                        best_dt = stats
            s = score_clusters(ours_roots, c.true_pairs)
            phases = {**best_ours["phases"], "apply": best_ours["applied"]}
            mib = 1 << 20
            table.append(f"{n:>9} {'startup':<11} {best_ours['startup_s']:>8.2f} {'':>8} {'':>15} {'':>10}")
            for name, info in phases.items():
                cpu = info.get("worker_cpu_s", 0) + info.get("driver_cpu_s", 0)
                table.append(
                    f"{n:>9} {name:<11} {info['seconds']:>8.2f} {cpu:>8.2f} "
                    f"{info.get('worker_peak_rss', 0) / mib:>15.0f} {info.get('driver_peak_rss', 0) / mib:>10.0f} "
                    f"{info.get('tasks', 0):>6} {info.get('rows', info.get('written', 0)):>9} "
                    f"{info.get('mode') or info.get('verify') or ''}"
                )
            table.append(f"{n:>9} {'total':<11} {best_ours['wall']:>8.2f}")
            note = (
                f"{n} docs, {files} files, {workers} workers ({best_ours['executor']['kind']}), best of {repeats} "
                f"alternated; ours P={s.pair_precision:.4f} R={s.pair_recall:.4f} drops P={s.drop_precision:.4f} "
                f"R={s.drop_recall:.4f}"
            )
            if best_dt:
                d = score_clusters(dt_roots, c.true_pairs)
                note += (
                    f"; datatrove P={d.pair_precision:.4f} R={d.pair_recall:.4f} drops P={d.drop_precision:.4f} "
                    f"R={d.drop_recall:.4f}; datatrove peak RSS {best_dt['peak_rss'] / mib:.0f} MiB"
                )
                table.append(
                    f"{n:>9} {'datatrove':<11} {best_dt['wall']:>8.2f} {best_dt['cpu_s']:>8.2f} "
                    f"{best_dt['peak_rss'] / mib:>15.0f}"
                )
            rows.append(
                result(f"dedup.{n}", "docs/s", n / best_ours["wall"], n / best_dt["wall"] if best_dt else 0, note)
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows, table


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--ours-job":
        ours_job(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--datatrove-job":
        datatrove_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller MinHash sizes, fewer repeats")
    parser.add_argument("--docs", type=int, action="append", help="dedup end to end at N documents (repeatable)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=1, help="alternated runs of each dedup contender")
    parser.add_argument("--no-minhash", action="store_true", help="skip the per-core MinHash/pHash rows")
    parser.add_argument("--shard-docs", type=int, default=SHARD_DOCS, help="documents per input shard")
    parser.add_argument(
        "--local-graph-max", type=int, help="dedup setting: larger duplicate graphs take the partitioned steps"
    )
    parser.add_argument("--datatrove-python", default=DATATROVE_PYTHON if os.path.exists(DATATROVE_PYTHON) else "")
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    from bench.common import format_table, write_json

    rows: list[dict] = [] if args.no_minhash else run(args.quick)
    table: list[str] = []
    if args.docs:
        config = {} if args.local_graph_max is None else {"local_graph_max": args.local_graph_max}
        more, table = dedup_rows(
            args.docs, args.workers, args.repeats, args.datatrove_python or None, args.shard_docs, config
        )
        rows += more
    print(format_table(rows))
    if table:
        print("\n" + "\n".join(table))
    if args.out:
        write_json(rows, args.out)


if __name__ == "__main__":
    main()
