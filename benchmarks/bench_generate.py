"""LM-Mixup generation: one process with a `generate` loop vs `map_with_actors` on Ray Data.

    make bench-generate        # or: .venv/bin/python benchmarks/bench_generate.py --clusters 64

Both distil the same cluster prompts (synthetic clusters of degraded ShareGPT / GSM8K pairs
from the packages, built with the distiller's prompt template) with the same model
(SmolLM2-135M-Instruct, offline alias), greedy, ``--new-tokens`` new tokens, prompts in
micro-batches of ``--micro`` (left-padded):

(a) single process: ``DistillGenerator(model, threads=<all cores>).generate(prompts)`` — a
    plain ``model.generate`` loop, what a user writes without mixray; the model load is timed;
(b) mixray: ``map_with_actors(ds, DistillGenerator, ...)`` (what the ``distill`` stage runs):
    ``--actors`` actors × ``--threads`` threads on a local Ray started before the clock;
    end to end = actor start-up + model load + generation + collecting the outputs.

Prints seconds, prompts/s, the ratio (single / mixray: ≥ 1 means mixray is faster) and the
share of identical outputs (greedy decoding; the micro-batches' padding is the same in both).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` cluster prompts: 2-4 degraded copies of one real pair each (general + math, alternating)."""
    import sys
    from pathlib import Path

    import numpy as np

    from mixray.algorithms.lmmixup import cluster_prompt, degraded_members

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from packaged_data import records

    rng = np.random.default_rng(seed)
    pool = [r for task in ("general", "math") for r in records(task, n)]
    pool = [r for r in pool if len(r["instruction"]) + len(r["output"]) < 900][:n]
    out = []
    for r in pool:
        members = degraded_members(r["instruction"], r["output"], int(rng.integers(2, 5)), rng)
        out.append(cluster_prompt([(q[:300], a[:300]) for q, a in members]))
    return out


def single(model: str, texts: list[str], new_tokens: int, micro: int, threads: int) -> tuple[float, list[str]]:
    from mixray.models.distill import DistillGenerator

    t0 = time.perf_counter()
    gen = DistillGenerator(model, max_new_tokens=new_tokens, micro_batch=micro, threads=threads)
    out = gen.generate(texts)
    return time.perf_counter() - t0, out


def distributed(model: str, texts: list[str], args) -> tuple[float, list[str]]:
    import pyarrow as pa
    import ray

    from mixray.config import ActorPoolConfig
    from mixray.distributed.pipeline import map_with_actors
    from mixray.models.distill import DistillGenerator

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    t = pa.table({"cluster": list(range(len(texts))), "prompt": texts})
    pool = ActorPoolConfig(concurrency=args.actors, batch_size=args.micro, num_cpus=1, threads=args.threads,
                           num_gpus=0)
    t0 = time.perf_counter()
    refs = [ray.put(t.slice(s, args.micro)) for s in range(0, t.num_rows, args.micro)]
    ds = map_with_actors(ray.data.from_arrow_refs(refs), DistillGenerator,
                         {"model_path": model, "max_new_tokens": args.new_tokens, "micro_batch": args.micro},
                         pool, "bench")
    got = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got |= dict(zip(b["cluster"].tolist(), b["output"].tolist(), strict=True))
    return time.perf_counter() - t0, [got[i] for i in range(len(texts))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--micro", type=int, default=4, help="prompts per generate call (and per Ray Data batch)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    args = ap.parse_args()
    import ray

    from mixray.models.registry import resolve_model

    model = resolve_model("SmolLM2-135M-Instruct")
    texts = prompts(args.clusters)
    cores = os.cpu_count() or 1
    print(f"{len(texts)} prompts, {args.new_tokens} new tokens, micro-batch {args.micro}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    t_single, out_single = single(model, texts, args.new_tokens, args.micro, cores)
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    t_dist, out_dist = distributed(model, texts, args)
    ray.shutdown()
    same = sum(a == b for a, b in zip(out_single, out_dist, strict=True)) / len(texts)
    print(f"| method | seconds | prompts/s | ratio |\n|---|---:|---:|---:|\n"
          f"| single process, generate loop ({cores} threads) | {t_single:.1f} | {len(texts) / t_single:.2f} | 1.00× |\n"
          f"| mixray map_with_actors ({args.actors} actors × {args.threads} thread), end to end | "
          f"{t_dist:.1f} | {len(texts) / t_dist:.2f} | **{t_single / t_dist:.2f}×** (target ≥ 0.9×) |")
    print(f"identical outputs: {same:.0%}; load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
