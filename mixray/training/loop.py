"""The Ray Train loop — one readable function over an engine and an objective — and its TorchTrainer.

``train_loop_per_worker(config)`` runs on every Ray Train worker::

    rows of my shard (get_dataset_shard)  ->  engine: model (+ LoRA), DeepSpeed ZeRO or DDP
    resume from the newest checkpoint of this run that every rank verifies
        (mixray.training.checkpoints: signed sha256 records, checked before loading)
    for each optimizer step:  G micro-batches (the pure sampler decides which rows),
        the objective's loss (ntp | mdit | sftmix), token means over the whole window on
        all ranks, backward, step; log (rank 0: CSV + TensorBoard every step; Ray Train
        every ``report_every_s``); every ``checkpoint_every`` steps and at the end,
        report with a checkpoint (each rank signs what it saved); at the steps of ``export_steps``, a Hugging Face export
    export the model in Hugging Face format (rank 0 writes; ZeRO-3 gathers first)

Ray owns the workers, restarts them after a failure (``FailureConfig``) and
stores checkpoints (``RunConfig(storage_path)``); the loop only saves and loads.
Every setting arrives in ``config``, a plain dict of JSON values (required keys:
``LOOP_KEYS``; optional: ``LOOP_DEFAULTS``), the DeepSpeed config too
(``config["deepspeed"]["config"]``, from the pure ``build_deepspeed_config``);
nothing is read from globals, so the same function runs from ``mixray train``,
a test or a notebook.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from mixray.errors import TrainingConfigError

log = logging.getLogger("mixray.train")

# Required keys of the loop config (all plain JSON values). ``model_path``: a model directory
# (the same path on every node) or an offline alias, which each worker resolves on its node.
LOOP_KEYS = (
    "run_name", "model_path", "trust_remote_code", "loss", "seed", "pad_id",
    "micro_batch_size", "grad_accum", "steps_per_epoch", "total_steps", "warmup_steps",
    "lr", "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "precision",
    "gradient_checkpointing", "lora", "deepspeed", "sftmix_alpha", "sftmix_mu", "chunk_rows",
    "checkpoint_every", "report_every_s", "threads", "dataset_prefix",
    "log_dir", "export_dir", "merged_dir", "fault_step", "fault_rank",
)
# Optional keys and their defaults:
#   export_steps       optimizer steps after which to export the model (Hugging Face format)
#   export_steps_dir   where: <export_steps_dir>/step-<n> (None: <export_dir>/../checkpoints)
#   sftmix_normalizer  shared (both SFTMix terms over the NTP token count) | separate
#   checkpoint_key     hex of the key checkpoints are signed with (None: the key file in the
#                      mixray cache, mixray.io.checkpoints; ``fit`` passes the driver's)
LOOP_DEFAULTS: dict[str, Any] = {
    "export_steps": [], "export_steps_dir": None, "sftmix_normalizer": "shared", "checkpoint_key": None,
}


def check_loop_config(config: dict[str, Any]) -> dict[str, Any]:
    """The loop config with its optional keys filled; a missing key or a bad export step is an error."""
    missing = set(LOOP_KEYS) - set(config)
    if missing:
        raise TrainingConfigError(f"the loop config misses {sorted(missing)}", where="loop config")
    config = LOOP_DEFAULTS | config
    steps, total = config["export_steps"], config["total_steps"]
    if not isinstance(steps, list) or not all(isinstance(s, int) and 1 <= s <= total for s in steps):
        raise TrainingConfigError(f"export_steps must be a list of optimizer steps in [1, {total}] "
                                  f"(total_steps), got {steps!r}", where="export_steps")
    return config


def step_export_dir(config: dict[str, Any], step: int) -> Path:
    """Where the export at optimizer step ``step`` goes: ``<export_steps_dir>/step-<step>``."""
    root = config.get("export_steps_dir") or Path(config["export_dir"]).parent / "checkpoints"
    return Path(root) / f"step-{step}"


# ----------------------------------------------------------------------------- the loop

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker training loop (see the module docstring)."""
    import ray.train

    from mixray.models.registry import resolve_model
    from mixray.training.checkpoints import resume_step
    from mixray.training.engines import make_engine, setup_worker, worker_device
    from mixray.training.export import export
    from mixray.training.metrics import MetricsLog
    from mixray.training.objectives import make_objective

    config = check_loop_config(config)
    # an offline alias is resolved here, on this worker's node (its $MIXRAY_CACHE), not on the driver's
    config["model_path"] = resolve_model(config["model_path"], "train.model")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_worker(config)
    objective = make_objective(config)
    shard = read_shard(ray.train.get_dataset_shard(f"{config['dataset_prefix']}{rank}"), objective.columns)
    device = worker_device()
    engine = make_engine(config, device)
    key = _checkpoint_key(config)
    step = start = resume_step(engine, config, rank, world, key, device)
    logger = MetricsLog(Path(config["log_dir"]), start, objective.components) if rank == 0 else None
    if rank == 0:
        log.info("train: rank 0 of %d, %d examples in my shard, %s, %s at step %d of %d", world,
                 len(shard["group"]), config["loss"], "resuming" if start else "starting", start,
                 config["total_steps"])
    clock = _ReportClock(config["report_every_s"])
    for step, epoch, window in _windows(config, shard, rank, start, objective.paired):
        t0 = time.perf_counter()
        lr = engine.lr()
        batches = [objective.batch(shard, rows, lam) for rows, lam in window]
        sums = _optimizer_step(engine, objective, batches, device, world,
                               report_due=lambda: rank == 0 and clock.due())
        metrics = _metrics(step, epoch, sums, world, objective.components, lr, engine.grad_norm(),
                           time.perf_counter() - t0)
        if logger is not None:
            logger.write(metrics)
        if config["fault_step"] == step and rank == config["fault_rank"]:
            _inject_fault(Path(config["log_dir"]), step)
        _checkpoint_and_report(engine, config, (rank, world, key), step, metrics, clock,
                               asked=bool(sums[-1] > 0))
        if step in config["export_steps"]:
            export(engine, step_export_dir(config, step), rank)
    export(engine, config["export_dir"], rank, merged_dir=config["merged_dir"])
    engine.close()
    if logger is not None:
        logger.close()
    ray.train.report({"step": step, "done": 1})


def _windows(config: dict[str, Any], shard: dict[str, Any], rank: int, start: int, paired: bool):
    """``(step, epoch, [(rows, λ | None)] * G)`` for each optimizer step after ``start``.

    The pure sampler (``epoch_micro_batches``) decides every epoch's micro-batches from
    ``(seed, epoch, rank)`` alone, so a resumed run sees the batches it would have seen.
    """
    from mixray.algorithms.sampling import epoch_micro_batches

    G, spe, total = config["grad_accum"], config["steps_per_epoch"], config["total_steps"]
    step = start
    while step < total:
        epoch, first = divmod(step, spe)
        batches, lams = epoch_micro_batches(
            shard["group"], epoch=epoch, seed=config["seed"], rank=rank,
            micro_batch_size=config["micro_batch_size"], n_micro=spe * G, paired=paired,
            alpha=config["sftmix_alpha"])
        for w in range(first, spe):
            step += 1
            yield step, epoch, [([int(i) for i in batches[j]], None if lams is None else lams[j])
                                for j in range(w * G, (w + 1) * G)]
            if step >= total:
                return


def _optimizer_step(engine, objective, window: list[dict[str, Any]], device, world: int, report_due):
    """Forward/backward over the window's micro-batches and one optimizer step.

    Returns the all-reduced float64 sums ``[loss, *components, tokens, examples, report]``.
    Ray Train's controller takes one report per ~2 s and a report blocks until taken:
    rank 0's clock (``report_due()``, asked after the step) decides when to report, and
    the all-reduce tells every rank (``report`` > 0).
    """
    import torch
    import torch.distributed as dist

    from mixray.training.objectives import to_device

    counts = [objective.normalizer_counts(mb) for mb in window]
    # token-mean normalisers of the whole window on all ranks, divided by the world size
    # because the engine averages gradients over ranks
    norms = torch.tensor([sum(c[k] for c in counts) for k in range(len(counts[0]))], dtype=torch.float64)
    dist.all_reduce(norms)
    norms = (norms / world).tolist()
    n = len(objective.components)
    sums = torch.zeros(n + 4, dtype=torch.float64)
    for i, mb in enumerate(window):
        boundary = i == len(window) - 1
        with engine.accumulate(boundary):
            loss, parts = objective.step(engine, to_device(mb, device), norms)
            engine.backward(loss)
        engine.step(boundary)
        values = [loss.item(), *(parts[k].item() for k in objective.components), mb["tokens"], mb["examples"]]
        sums[: n + 3] += torch.tensor(values, dtype=torch.float64)
    sums[n + 3] = float(report_due())
    dist.all_reduce(sums)
    return sums


def _metrics(step: int, epoch: int, sums, world: int, components: tuple[str, ...], lr: float,
             grad_norm: float, dt: float) -> dict[str, Any]:
    """One step's metrics row from the all-reduced sums (losses are means over ranks)."""
    n = len(components)
    means = (sums[: n + 1] / world).tolist()
    tokens, examples = float(sums[n + 1]), int(sums[n + 2])
    return {"step": step, "epoch": epoch, "loss": means[0], **dict(zip(components, means[1:], strict=True)),
            "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / dt,
            "step_time_s": dt, "examples": examples, "time": time.time()}


class _ReportClock:
    """When the last report to Ray Train (with or without a checkpoint) was made."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = time.monotonic()


def _checkpoint_and_report(engine, config: dict[str, Any], who: tuple[int, int, bytes], step: int,
                           metrics: dict[str, Any], clock: _ReportClock, asked: bool) -> None:
    """Every ``checkpoint_every`` steps and at the last: save, sign what this rank saved
    (``who`` = rank, world size, key) and report with the checkpoint; otherwise report
    the metrics alone when the clock ``asked`` for it."""
    import ray.train

    from mixray.training.checkpoints import record_checkpoint

    rank, world, key = who
    every, total = config["checkpoint_every"], config["total_steps"]
    save = step == total or (every > 0 and step % every == 0)
    if save:
        with tempfile.TemporaryDirectory(prefix="mixray-ckpt-") as d:
            engine.save(Path(d), rank, step, config["run_name"])
            record_checkpoint(Path(d), rank, world, step, config["run_name"], key)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    elif asked:
        ray.train.report(metrics)
    if save or asked:
        clock.reset()


def _checkpoint_key(config: dict[str, Any]) -> bytes:
    from mixray.io.checkpoints import checkpoint_key

    return bytes.fromhex(config["checkpoint_key"]) if config["checkpoint_key"] else checkpoint_key()


def read_shard(it, columns: tuple[str, ...]) -> dict[str, Any]:
    """``row``, ``group`` and ``columns`` of all rows of this worker's shard, in global ``row`` order.

    Block order does not matter; ``group`` comes back as an int64 array (the sampler's input).
    """
    import numpy as np

    parts: dict[str, list] = {}
    for batch in it.iter_batches(batch_size=4096, batch_format="pyarrow", prefetch_batches=1):
        for name in ("row", "group", *columns):
            parts.setdefault(name, []).extend(batch.column(name).to_pylist())
    order = np.argsort(np.asarray(parts.get("row", []), dtype=np.int64), kind="stable")
    out = {k: [v[i] for i in order] for k, v in parts.items()}
    out["group"] = np.asarray(out.get("group", []), dtype=np.int64)
    return out


class InjectedFault(RuntimeError):
    """Raised once by ``fault_injection`` (a testing aid) to exercise restart and resume."""


def _inject_fault(log_dir: Path, step: int) -> None:
    marker = log_dir / f"fault-injected-at-step-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFault(f"train.fault_injection: this worker fails once at step {step}")


# ----------------------------------------------------------------------------- the trainer

def fit(loop_config: dict[str, Any], datasets: dict[str, Any], *, num_workers: int, use_gpu: bool,
        resources_per_worker: dict[str, float] | None, storage_path: str, name: str, max_failures: int,
        keep_checkpoints: int, log_level: str = "INFO", train_loop=None):
    """Run ``train_loop_per_worker`` on a ``TorchTrainer``; returns the Ray Train ``Result``.

    ``log_level``: of Ray Train's console lines (its log files keep everything).
    ``train_loop``: another per-worker loop (``mixray.training.grpo.grpo_loop_per_worker``),
    given its config as it is (``check_loop_config`` is the default loop's).

    A run with the same ``name`` under ``storage_path`` resumes from its newest
    checkpoint that verifies (``mixray.training.checkpoints``), as does a worker group
    restarted after a failure; a Ray checkpoint list that would stop Ray from
    starting (cut short by a kill, naming a removed checkpoint) is dropped first. ``datasets``: one Ray Dataset per rank
    (``<dataset_prefix><rank>``), given whole to every worker (the loop reads
    only its own): the shard assignment is the pure sampler's, not Ray's.
    """
    if train_loop is None:
        train_loop, loop_config = train_loop_per_worker, check_loop_config(loop_config)
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from mixray.io.checkpoints import checkpoint_key
    from mixray.training.checkpoints import repair_snapshot

    if not loop_config.get("checkpoint_key"):  # the driver's key: workers on other nodes sign with it too
        loop_config = loop_config | {"checkpoint_key": checkpoint_key().hex()}
    repair_snapshot(storage_path, name)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            logging_config=LoggingConfig(log_level=log_level)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    return trainer.fit()
