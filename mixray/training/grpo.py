"""LM-Mixup's GRPO on Ray Train: TRL's ``GRPOTrainer`` inside each ``TorchTrainer`` worker.

``grpo_loop_per_worker(config)`` runs on every Ray Train worker (gloo on CPU, NCCL on
GPUs; Ray Train made the process group and set ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``,
which accelerate picks up — except with one worker and no DeepSpeed, where they are hidden
so that the trainer runs undistributed, see ``_single_process``)::

    prompts of the dataset "grpo" (chat prompt + reference answer), whole on every rank
    rewards = DistillRewards(encoder, library)   -> quality, alignment, format (pure rewards)
    GRPOTrainer(model=<distiller dir>, args=GRPOConfig(deepspeed=<ZeRO dict>), ...)
        G samples per prompt, group advantages (sum_then_normalize | normalize_then_sum),
        clipped ratio (ε_low, ε_high), k3 KL to the starting model (β), token-mean loss
    resume from the newest checkpoint-<step> under the output dir (HF Trainer's own)
    rank 0: metrics.csv + TensorBoard per logged step (per-reward means, reward, advantage spread)
    save the final model (Hugging Face format) to ``export_dir``

Every setting arrives in ``config`` (``GRPO_KEYS``; optional ``precision``: ``bf16`` or
``fp32``, the default, and ``generation_kwargs``: extra ``GenerationConfig`` settings for the
completions, e.g. ``{"min_new_tokens": n}``), a plain dict; the DeepSpeed dict
has ``"auto"`` for batch sizes, precision and clipping, which the HF integration fills
from the ``GRPOConfig``. With ``beta > 0`` TRL loads the reference model from the
model *path* (never an in-memory model), as it must under ZeRO.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from mixray.errors import TrainingConfigError

log = logging.getLogger("mixray.train")

GRPO_KEYS = (
    "model_path", "encoder_path", "library_path", "output_dir", "export_dir", "log_dir", "seed",
    "num_generations", "per_device_batch_size", "grad_accum", "max_steps", "lr", "beta", "epsilon",
    "epsilon_high", "temperature", "max_completion_length", "aggregation", "reward_weights",
    "loss_type", "save_steps", "deepspeed", "threads", "knn_k", "good_class", "alignment_threshold",
    "task", "reward_model", "reward_threshold", "warmup_ratio", "max_grad_norm", "repetition_penalty",
)
REWARD_NAMES = ("quality", "alignment", "format")
GRPO_COLUMNS = ("step", "loss", "reward", "reward_std", *REWARD_NAMES, "advantage_std", "kl",
                "completion_length", "lr", "grad_norm", "step_time_s", "time")


def grpo_deepspeed_config(stage: int, offload_optimizer: bool = False) -> dict[str, Any]:
    """A ZeRO config for the HF Trainer: ``"auto"`` wherever the ``GRPOConfig`` decides
    (batch sizes, accumulation, bf16/fp16, clipping), the stage and offload fixed here.

    Bucket sizes follow the model (``"auto"``: hidden_size², as the HF integration sets
    them) instead of DeepSpeed's default of 5e8 elements, whose fp32 buffers alone take
    2 GB per bucket and per worker (a 135M distiller ran out of memory with them)."""
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero |= {"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                 "reduce_bucket_size": "auto"}
    if stage in (1, 2):
        zero["allgather_bucket_size"] = 5e7
    if stage == 3:
        # the exported model (Trainer.save_model) is gathered from the partitions; without
        # this flag the HF Trainer writes only a DeepSpeed checkpoint and no model weights
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                 "stage3_gather_16bit_weights_on_model_save": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def check_grpo_config(config: dict[str, Any]) -> dict[str, Any]:
    missing = set(GRPO_KEYS) - set(config)
    if missing:
        raise TrainingConfigError(f"the GRPO loop config misses {sorted(missing)}", where="loop config")
    if len(config["reward_weights"]) != len(REWARD_NAMES):
        raise TrainingConfigError(f"reward_weights needs {len(REWARD_NAMES)} weights {REWARD_NAMES}",
                                  where="reward_weights")
    return config


def grpo_args(config: dict[str, Any], world: int):
    """The ``GRPOConfig`` of the loop config (methods.md §4's GRPO settings)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=config["output_dir"], seed=config["seed"], learning_rate=config["lr"],
        per_device_train_batch_size=config["per_device_batch_size"],
        gradient_accumulation_steps=config["grad_accum"], max_steps=config["max_steps"],
        num_generations=config["num_generations"], temperature=config["temperature"],
        repetition_penalty=config["repetition_penalty"],
        max_completion_length=config["max_completion_length"], beta=config["beta"],
        epsilon=config["epsilon"], epsilon_high=config["epsilon_high"], loss_type=config["loss_type"],
        scale_rewards="group", multi_objective_aggregation=config["aggregation"],
        reward_weights=list(config["reward_weights"]), warmup_steps=float(config["warmup_ratio"]),
        max_grad_norm=config["max_grad_norm"], lr_scheduler_type="cosine",
        logging_steps=1, save_strategy="steps", save_steps=config["save_steps"], save_total_limit=2,
        report_to=[], deepspeed=config["deepspeed"], bf16=config.get("precision") == "bf16", fp16=False,
        use_cpu=not _cuda(), disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False, remove_unused_columns=False, log_completions=False,
        generation_kwargs=config.get("generation_kwargs"),
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_trainer_class():
    """``GRPOTrainer`` that also logs the spread (std) of the advantages of every generation batch."""
    from trl import GRPOTrainer

    class MixrayGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            adv = self.accelerator.gather(out["advantages"].float())  # collective: every rank
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["advantage_std"].append(float(adv.std()) if adv.numel() > 1 else 0.0)
            return out

    return MixrayGRPOTrainer


def metrics_callback(log_dir: Path, rank: int):
    """A ``TrainerCallback``: rank 0 writes one ``GRPO_COLUMNS`` row per logged step (CSV + TensorBoard)."""
    from transformers import TrainerCallback

    class GRPOMetrics(TrainerCallback):
        def __init__(self):
            self.rows, self.last, self._csv = [], time.time(), None

        def on_log(self, args, state, control, logs=None, **kw):
            if rank != 0 or not logs or "loss" not in logs:
                return
            now = time.time()
            row = grpo_row(state.global_step, logs, now - self.last, now)
            self.last = now
            self._write(row)

        def _write(self, row: dict[str, float]) -> None:
            if self._csv is None:
                from torch.utils.tensorboard import SummaryWriter

                log_dir.mkdir(parents=True, exist_ok=True)
                path = log_dir / "metrics.csv"
                new = not path.is_file()
                self._f = open(path, "a", newline="")
                self._csv = csv.DictWriter(self._f, fieldnames=GRPO_COLUMNS)
                if new:
                    self._csv.writeheader()
                self._tb = SummaryWriter(str(log_dir / "tensorboard"))
            self._csv.writerow(row)
            self._f.flush()
            for k in GRPO_COLUMNS[1:-1]:
                if not math.isnan(row[k]):
                    self._tb.add_scalar(f"grpo/{k}", row[k], row["step"])
            self._tb.flush()
            log.info("grpo step %d: reward %.3f (quality %.3f, alignment %.3f, format %.3f), "
                     "advantage std %.3f, kl %.4f", row["step"], row["reward"], row["quality"],
                     row["alignment"], row["format"], row["advantage_std"], row["kl"])

    return GRPOMetrics()


def grpo_row(step: int, logs: dict[str, float], dt: float, now: float) -> dict[str, float]:
    """One metrics row from the HF Trainer's log dict (TRL's keys)."""
    def get(key: str) -> float:
        v = logs.get(key)
        return float(v) if v is not None else math.nan

    row = {"step": step, "loss": get("loss"), "reward": get("reward"), "reward_std": get("reward_std"),
           "advantage_std": get("advantage_std"), "kl": get("kl"),
           "completion_length": get("completions/mean_length"), "lr": get("learning_rate"),
           "grad_norm": get("grad_norm"), "step_time_s": dt, "time": now}
    row |= {name: get(f"rewards/{name}/mean") for name in REWARD_NAMES}
    return row


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest ``checkpoint-<step>`` directory of an HF Trainer run, or None."""
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    return str(ckpts[-1]) if ckpts else None


def build_grpo_trainer(config: dict[str, Any], data, rank: int, world: int):
    """TRL's trainer (with the three rewards and the metrics callback) for ``config`` on ``data``
    (a ``datasets.Dataset`` of ``prompt`` + ``reference``); the same in a Ray Train worker and in
    a plain process (``benchmarks/bench_grpo.py``)."""
    from mixray.models.distill import DistillRewards
    from mixray.models.sft import load_tokenizer

    rewards = DistillRewards(config["encoder_path"], config["library_path"], k=config["knn_k"],
                             good_class=config["good_class"], task=config["task"],
                             alignment_threshold=config["alignment_threshold"],
                             reward_model=config["reward_model"],
                             reward_threshold=config["reward_threshold"], threads=config["threads"])
    return make_trainer_class()(
        model=config["model_path"], reward_funcs=rewards.functions(), args=grpo_args(config, world),
        train_dataset=data, processing_class=load_tokenizer(config["model_path"]),
        callbacks=[metrics_callback(Path(config["log_dir"]), rank)])


def grpo_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker GRPO loop (see the module docstring)."""
    import ray.train
    from datasets import Dataset

    from mixray.training.engines import setup_worker

    config = check_grpo_config(config)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    setup_worker(config)  # DS_ACCELERATOR=cpu, threads, no shm-comm compile
    ds = config["deepspeed"]
    if ds and ds["zero_optimization"]["stage"] == 3:
        import deepspeed
        import torch.distributed as dist

        # ZeRO-3 partitions the model while it is built: DeepSpeed's comm must join Ray Train's
        # process group before the trainer (and its zero.Init) exists
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    rows = list(ray.train.get_dataset_shard("grpo").iter_rows())
    data = Dataset.from_list([{"prompt": list(r["prompt"]), "reference": r["reference"]} for r in rows])
    with _single_process(alone=world == 1 and not ds):
        steps = _train(config, data, rank, world)
    ray.train.report({"step": steps, "done": 1})


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def _single_process(alone: bool):
    """With one worker and no DeepSpeed, hide Ray Train's distributed environment from Accelerate.

    A Ray Train worker always runs in a ``torch.distributed`` group with ``RANK``/``LOCAL_RANK``
    set, so Accelerate picks ``MULTI_CPU``/``MULTI_GPU`` and wraps the model in DDP even at world
    size 1 — measured 1.18x the step time of TRL alone (0.599 vs 0.509 s per completion token,
    benchmarks/README.md). Without those variables Accelerate runs undistributed (0.496 s)."""
    saved = {k: os.environ.pop(k) for k in _DIST_ENV if alone and k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _train(config: dict[str, Any], data, rank: int, world: int) -> int:
    """Build, resume, train and export; returns the final step."""
    from mixray.models.sft import load_tokenizer

    trainer = build_grpo_trainer(config, data, rank, world)
    if os.environ.get("MIXRAY_VERBOSE") != "1":  # (mixray.console.VERBOSE_ENV) each step is in
        # metrics.csv and the driver's progress bar: no dict printed per step
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    resume = latest_checkpoint(Path(config["output_dir"]))
    if rank == 0:
        log.info("grpo: %d prompts, G=%d, %d workers, %s", len(data), config["num_generations"], world,
                 f"resuming from {resume}" if resume else "from the start")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config["export_dir"])  # rank 0 writes (ZeRO-2: whole weights on every rank)
    if rank == 0:
        load_tokenizer(config["model_path"]).save_pretrained(config["export_dir"])
    return trainer.state.global_step


def read_grpo_metrics(path: Path) -> list[dict[str, float]]:
    """The GRPO curve: for each step, its last row (a resumed run logs a step again)."""
    with open(path, newline="") as f:
        rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
                for r in csv.DictReader(f)]
    return list({int(r["step"]): r for r in rows}.values())


def plot_reward_curves(rows: list[dict[str, float]], out: Path, title: str) -> None:
    """PNG: per-reward means and the total reward (top), the advantage spread and KL (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
    for key, style in (("reward", "-"), ("quality", "--"), ("alignment", "--"), ("format", "--")):
        ax.plot(steps, [r[key] for r in rows], style, marker="o", ms=3, label=key,
                lw=2 if key == "reward" else 1)
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.plot(steps, [r["advantage_std"] for r in rows], marker="o", ms=3, label="advantage std")
    ax2.plot(steps, [r["kl"] for r in rows], marker="o", ms=3, label="KL to the SFT model")
    ax2.set_xlabel("GRPO step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
