"""LM-Mixup GRPO step time: TRL's GRPOTrainer alone in one process vs inside a Ray Train worker.

    make bench-grpo            # or: .venv/bin/python benchmarks/bench_grpo.py --steps 5

The same trainer (``mixray.training.grpo.build_grpo_trainer``: SmolLM2-135M-Instruct, the three
rewards with MiniLM and a rated library, G = 4, 4 completions per step, ``--new-tokens``
completion tokens) on the same cluster prompts, seed 0:

(a) TRL alone: ``trainer.train()`` in a fresh process each round (``--alone-in process``, the
    default: a user's script, cold as (b)'s new Ray Train worker is) or in this process
    (``--alone-in driver``: warmer every round), torch using every core, no DeepSpeed;
(b) mixray: ``fit(..., train_loop=grpo_loop_per_worker)`` — one Ray Train ``TorchTrainer``
    worker with every core (gloo, world size 1), no DeepSpeed: the same work, so the ratio is
    the cost of running inside Ray Train;
(c) for information: 2 workers × 1 core under DeepSpeed ZeRO-2 (what ``configs/lmmixup.yaml``
    runs; 2 × 4 completions per step, so not the same work as (a)).

Every completion is exactly ``--new-tokens`` long (``min_new_tokens``: sampling at temperature
1 draws different texts in (a) and (b), whose lengths would otherwise differ), and the sampler's
seed gives both runs the same prompts in the same order, so both do the same work step by step.
Prompt lengths differ from step to step (576–1,987 characters), and so do step times. Time =
the sum of the per-step wall times after the first step (from the metrics callback: the time
between two logged steps); the median step is printed too. Prints the ratio (b) / (a) of the
sums (target ≤ 1.2×). ``--rounds R`` runs (a) and (b) R times, (b) first in every other round
(Ray is started only for (b)), and reports the median of the R rounds' ratios: this host's speed
drifts by up to ~25% within the hour, which one pair of runs cannot separate from Ray's cost.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _library(path: Path, encoder: str, n: int = 200) -> None:
    """A rated library: MiniLM embeddings of ``n`` real pairs, classes by quantiles of a seeded score."""
    import sys

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from mixray.algorithms.lmmixup import quality_classes
    from mixray.algorithms.lmmixup_rewards import transition_matrix

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from packaged_data import records

    texts = [f"{r['instruction']}\n{r['output']}" for t in ("general", "math") for r in records(t, n // 2)]
    emb = SentenceTransformer(encoder, device="cpu").encode(texts, normalize_embeddings=True)
    classes = quality_classes(np.random.default_rng(0).random(len(texts)))
    np.savez(path, embeddings=emb.astype(np.float32), classes=classes, T=transition_matrix(emb, classes, 16))


def _config(tmp: Path, name: str, args, workers: int, zero: int | None) -> dict:
    from mixray.models.registry import resolve_model
    from mixray.training.grpo import grpo_deepspeed_config

    cores = os.cpu_count() or 1
    return {"model_path": resolve_model("SmolLM2-135M-Instruct"), "encoder_path": resolve_model("all-MiniLM-L6-v2"),
            "library_path": str(tmp / "library.npz"), "output_dir": str(tmp / name / "out"),
            "export_dir": str(tmp / name / "model"), "log_dir": str(tmp / name / "logs"), "seed": 0,
            "num_generations": 4, "per_device_batch_size": 4, "grad_accum": 1, "max_steps": args.steps,
            "lr": 1e-6, "beta": 0.01, "epsilon": 0.2, "epsilon_high": 0.3, "temperature": 1.0,
            "max_completion_length": args.new_tokens, "aggregation": "sum_then_normalize",
            "reward_weights": [0.5, 0.4, 0.1], "loss_type": "dapo", "save_steps": 10**6,
            "deepspeed": grpo_deepspeed_config(zero) if zero is not None else None,
            "threads": max(1, cores // workers), "knn_k": 16, "good_class": 4, "alignment_threshold": 0.8,
            "task": "qa", "reward_model": None, "reward_threshold": 0.0, "warmup_ratio": 0.0,
            "max_grad_norm": 1.0, "repetition_penalty": 1.0,
            "generation_kwargs": {"min_new_tokens": args.new_tokens}}


def _data(n: int):
    from bench_generate import prompts

    from mixray.algorithms.lmmixup import SYSTEM_PROMPT

    return [{"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}],
             "reference": "Q: " + p.split("Q: ", 2)[1][:300]} for p in prompts(n)]


def _step_time(log_dir: str) -> tuple[float, float, list[float]]:
    """(sum, median, list) of the step times after the first, and a check that each completion
    had its fixed length."""
    with open(Path(log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[1:] if len(rows) > 1 else rows
    times = [float(r["step_time_s"]) for r in rows]
    lengths = {float(r["completion_length"]) for r in rows}
    if len(lengths) != 1:
        raise SystemExit(f"completion lengths differ between steps: {sorted(lengths)}")
    return sum(times), statistics.median(times), times


def alone(config: dict, rows: list[dict]) -> tuple[float, float, list[float]]:
    import torch
    from datasets import Dataset

    from mixray.training.grpo import build_grpo_trainer

    torch.set_num_threads(config["threads"])
    build_grpo_trainer(config, Dataset.from_list(rows), 0, 1).train()
    return _step_time(config["log_dir"])


def alone_in_process(config: dict, rows: list[dict]) -> tuple[float, float, list[float]]:
    """:func:`alone` in a fresh (spawned) Python process, as a user's script would run it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(alone, config, rows).result()


def in_ray_train(config: dict, rows: list[dict], workers: int, tmp: Path,
                 name: str) -> tuple[float, float, list[float]]:
    import pyarrow as pa
    import ray

    from mixray.training.grpo import grpo_loop_per_worker
    from mixray.training.loop import fit

    fit(config, {"grpo": ray.data.from_arrow(pa.Table.from_pylist(rows))}, num_workers=workers,
        use_gpu=False, resources_per_worker={"CPU": (os.cpu_count() or 1) // workers},
        storage_path=str(tmp / "ray"), name=name, max_failures=0, keep_checkpoints=1,
        train_loop=grpo_loop_per_worker)
    return _step_time(config["log_dir"])


def in_local_ray(config: dict, rows: list[dict], workers: int, tmp: Path,
                 name: str) -> tuple[float, float, list[float]]:
    """``in_ray_train`` on a local Ray started for it and shut down after."""
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        return in_ray_train(config, rows, workers, tmp, name)
    finally:
        ray.shutdown()


def _round(tmp: Path, args, rows: list[dict], rnd: int) -> tuple:
    """One round: (a) then (b), or (b) then (a) in odd rounds; Ray runs only during (b)."""

    def a():
        run = alone_in_process if args.alone_in == "process" else alone
        return run(_config(tmp, f"alone{rnd}", args, 1, None), rows)

    def b():
        return in_local_ray(_config(tmp, f"ray{rnd}", args, 1, None), rows, 1, tmp, f"ray{rnd}")

    if rnd % 2 == 0:
        ra = a()
        return ra, b()
    rb = b()
    return a(), rb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of (a) and (b), the order alternating; the ratio is the median "
                         "of the rounds' ratios")
    ap.add_argument("--no-zero2", action="store_true", help="skip (c)")
    ap.add_argument("--alone-in", choices=["process", "driver"], default="process",
                    help="(a) in a fresh process per round (default) or in this one")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    from mixray.models.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as d:
        tmp = Path(d)
        _library(tmp / "library.npz", resolve_model("all-MiniLM-L6-v2"))
        rows = _data(8)
        print(f"{args.steps} GRPO steps, G=4, 4 completions/step/worker, {args.new_tokens} new tokens, "
              f"{args.rounds} round(s), TRL alone in: {args.alone_in}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.time()
        rounds = []
        for rnd in range(args.rounds):
            rounds.append(_round(tmp, args, rows, rnd))
            print(f"round {rnd + 1}: TRL alone {rounds[-1][0][0]:.1f} s, inside Ray Train "
                  f"{rounds[-1][1][0]:.1f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
        c = None if args.no_zero2 else in_local_ray(_config(tmp, "ray2", args, 2, 2), rows, 2, tmp, "ray2")
    print("| round | run | steps 2.. (s, sum) | ratio | step time (s, median) | ratio | steps (s) |")
    print("|---|---|---:|---:|---:|---:|---|")

    def line(rnd: str, name: str, r, a) -> str:
        return (f"| {rnd} | {name} | {r[0]:.1f} | {r[0] / a[0]:.2f}× | {r[1]:.2f} | {r[1] / a[1]:.2f}× "
                f"| {', '.join(f'{t:.1f}' for t in r[2])} |")

    for i, (a, b) in enumerate(rounds, 1):
        print(line(str(i), "TRL GRPOTrainer alone, one process", a, a))
        print(line(str(i), "inside Ray Train, 1 worker (same work)", b, a))
    if c is not None:
        print(line("1", "inside Ray Train, 2 workers × 1 core, ZeRO-2 (2× the completions)", c, rounds[0][0]))
    ratios = [b[0] / a[0] for a, b in rounds]
    print(f"ratio inside Ray Train / TRL alone, median of {len(ratios)} round(s) "
          f"({', '.join(f'{r:.2f}' for r in ratios)}): **{statistics.median(ratios):.2f}×** (target ≤ 1.2×)")
    print(f"total {time.time() - t0:.0f} s; load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
