"""distill_grpo (LM-Mixup 4): GRPO of the distiller on Ray Train + DeepSpeed (TRL's GRPOTrainer).

Inputs: ``mixture/pairs.parquet`` (prompts and reference answers), the distiller to start
from (``distill_sft/model`` unless ``lmmixup.grpo.model`` names one), and the rated library:
``embed/embeddings.parquet`` + ``imperfect/classes.parquet`` (a seeded sample of at most
``rewards.library_max`` examples; ``T`` computed here, once).

Outputs under ``<run_dir>/distill_grpo/``: ``model/`` (Hugging Face format), ``metrics.csv``
(per step: loss, reward, reward_std, quality, alignment, format, advantage_std, kl, ...),
``rewards.png`` and ``library.npz``. TensorBoard events: ``logs/<run>/tensorboard``.
Resume: the HF Trainer's checkpoints in ``trainer/<run>/`` (every ``grpo.save_steps``);
a killed run continues from the newest; they are removed when the stage completes.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mixray.contracts import (
    EMBEDDINGS,
    GRPO_METRICS,
    GRPO_MODEL,
    GRPO_PLOT,
    MIXTURE_PAIRS,
    QUALITY_CLASSES,
    REWARD_LIBRARY,
    SFT_MODEL,
)
from mixray.errors import InputError
from mixray.io.rundir import output_hash
from mixray.stages.imperfect import check_lmmixup_embeddings
from mixray.stages.runner import Outputs, Stage

log = logging.getLogger("mixray.lmmixup")


def rated_library(run_dir: Path, rewards, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(embeddings [L, d], classes [L], T [6, 6], encoder model)`` of the rated library."""
    from mixray.algorithms.lmmixup_rewards import transition_matrix, unit_rows
    from mixray.io.embeddings import read_embeddings

    meta = check_lmmixup_embeddings(EMBEDDINGS.path(run_dir))
    ids, x, _ = read_embeddings(EMBEDDINGS.path(run_dir))
    t = pq.read_table(QUALITY_CLASSES.path(run_dir), columns=["id", "class"])
    cls = dict(zip(t.column("id").to_pylist(), t.column("class").to_pylist(), strict=True))
    keep = np.array([i in cls for i in ids.tolist()])
    x, classes = x[keep], np.array([cls[i] for i in ids[keep].tolist()], dtype=np.int64)
    if len(classes) > rewards.library_max:
        pick = np.sort(np.random.default_rng([seed, 0x11B]).choice(len(classes), rewards.library_max,
                                                                   replace=False))
        x, classes = x[pick], classes[pick]
    emb = unit_rows(x).astype(np.float32)
    return emb, classes, transition_matrix(emb, classes, rewards.transition_k, smoothing=rewards.smoothing), \
        meta["mixray.model"]


class DistillGRPO(Stage):
    """``distill_grpo``: the distiller -> GRPO with quality / alignment / format rewards on Ray Train."""

    name = "distill_grpo"
    requires = (MIXTURE_PAIRS, EMBEDDINGS, QUALITY_CLASSES)
    outputs = (GRPO_MODEL, GRPO_METRICS, GRPO_PLOT, REWARD_LIBRARY)
    summary = "{steps} GRPO steps"
    seeded = True
    memory_knobs = ("grpo.per_device_batch_size", "grpo.max_completion_length", "grpo.num_workers")

    config_path = "lmmixup"  # its settings: cfg.lmmixup

    def config(self) -> dict:
        s = self.section
        return {"grpo": s.grpo.model_dump(mode="json"), "rewards": s.rewards.model_dump(mode="json"),
                "low_below": s.classes.low_below, "seed": self.cfg.seed}

    def check(self) -> None:
        from mixray.models.registry import check_model

        self.run_dir, self.stage_dir = self.run_dir.resolve(), self.stage_dir.resolve()
        g = self.section.grpo
        if g.model is not None:
            check_model(g.model, "lmmixup.grpo.model")
        if self.section.rewards.reward_model:
            check_model(self.section.rewards.reward_model, "lmmixup.rewards.reward_model")

    def input_hashes(self) -> dict[str, str]:
        h = super().input_hashes()
        if self.section.grpo.model is None:
            h["distiller"] = output_hash(self.run_dir / SFT_MODEL.stage, SFT_MODEL.name)
        return h

    @property
    def _dirs(self) -> tuple[Path, Path, Path]:
        """(HF Trainer checkpoints, logs, Ray Train storage) of this config + inputs."""
        run = f"run-{self.fingerprint[:12]}"
        return self.stage_dir / "trainer" / run, self.stage_dir / "logs" / run, self.stage_dir / "ray"

    def reset(self) -> None:
        for d in self._dirs[:2]:
            shutil.rmtree(d, ignore_errors=True)

    def finished(self) -> None:
        shutil.rmtree(self.stage_dir / "trainer", ignore_errors=True)  # checkpoints only serve a resume

    def run(self, out: Outputs) -> None:
        from mixray.distributed.runtime import init_ray
        from mixray.models.registry import resolve_model, worker_model_ref
        from mixray.training.grpo import plot_reward_curves, read_grpo_metrics

        s, t0 = self.section, time.time()
        emb, classes, T, encoder = rated_library(self.run_dir, s.rewards, self.cfg.seed)
        with open(out.path(REWARD_LIBRARY), "wb") as f:  # a file, not a name: savez would add ".npz"
            np.savez(f, embeddings=emb, classes=classes, T=T)  # to the runner's temporary name
        model = str(SFT_MODEL.path(self.run_dir)) if s.grpo.model is None else \
            resolve_model(s.grpo.model, "lmmixup.grpo.model")
        init_ray(self.cfg.ray)
        prompts = self._prompts()
        config = self._loop_config(model, worker_model_ref(encoder), out)  # resolved on each node
        self._fit(config, prompts)
        rows = read_grpo_metrics(Path(config["log_dir"]) / "metrics.csv")
        shutil.copyfile(Path(config["log_dir"]) / "metrics.csv", out.path(GRPO_METRICS))
        g = s.grpo
        plot_reward_curves(rows, out.path(GRPO_PLOT), f"LM-Mixup GRPO · G={g.num_generations} · "
                           f"{g.num_workers} workers · ZeRO-{g.zero_stage} · {len(prompts)} prompts")
        last = rows[-1] if rows else {}
        out.counts = {"steps": len(rows), "prompts": len(prompts), "library": len(classes)}
        out.extra = {"final": {k: last.get(k) for k in ("reward", "quality", "alignment", "format",
                                                         "advantage_std", "kl")},
                     "start_model": model, "encoder": encoder, "seconds": round(time.time() - t0, 1),
                     "tensorboard": str(Path(config["log_dir"]) / "tensorboard")}

    def _prompts(self) -> pa.Table:
        from mixray.algorithms.lmmixup import SYSTEM_PROMPT

        t = pq.read_table(MIXTURE_PAIRS.path(self.run_dir), columns=["prompt", "reference"])
        n = self.section.grpo.prompts
        if n is not None and n < t.num_rows:
            t = t.take(np.sort(np.random.default_rng([self.cfg.seed, 0x6290]).choice(t.num_rows, n, replace=False)))
        msgs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}]
                for p in t.column("prompt").to_pylist()]
        if not msgs:
            raise InputError("distill_grpo: no prompts in mixture/pairs.parquet")
        return pa.table({"prompt": msgs, "reference": t.column("reference")})

    def _loop_config(self, model: str, encoder: str, out: Outputs) -> dict:
        from mixray.training.grpo import grpo_deepspeed_config

        s, g, r = self.section, self.section.grpo, self.section.rewards
        trainer_dir, log_dir, _ = self._dirs
        threads = g.threads or max(1, int((g.resources_per_worker or {}).get("CPU", 1)))
        return {"model_path": model, "encoder_path": encoder, "library_path": str(out.path(REWARD_LIBRARY)),
                "output_dir": str(trainer_dir), "export_dir": str(out.path(GRPO_MODEL)),
                "log_dir": str(log_dir), "seed": self.cfg.seed, "num_generations": g.num_generations,
                "per_device_batch_size": g.per_device_batch_size, "grad_accum": g.grad_accum,
                "max_steps": g.max_steps, "lr": g.lr, "beta": g.beta, "epsilon": g.epsilon,
                "epsilon_high": g.epsilon_high, "temperature": g.temperature,
                "repetition_penalty": g.repetition_penalty,
                "max_completion_length": g.max_completion_length, "aggregation": r.aggregation,
                "reward_weights": r.weights, "loss_type": g.loss_type, "save_steps": g.save_steps,
                "deepspeed": grpo_deepspeed_config(g.zero_stage, g.offload_optimizer) if g.zero_stage else None,
                "threads": threads, "knn_k": r.knn_k, "good_class": s.classes.low_below,
                "alignment_threshold": r.alignment_threshold, "task": r.task,
                "reward_model": r.reward_model, "reward_threshold": r.reward_threshold,
                "warmup_ratio": g.warmup_ratio, "max_grad_norm": g.max_grad_norm}

    def _fit(self, config: dict, prompts: pa.Table) -> None:
        import ray

        from mixray.console import verbose
        from mixray.stages.train import resolve_precision, training_console, worker_resources
        from mixray.training.grpo import grpo_loop_per_worker
        from mixray.training.loop import fit

        g = self.section.grpo
        use_gpu, res = worker_resources(g, self.cfg.ray, "lmmixup.grpo")
        config["precision"] = resolve_precision(g.precision, use_gpu, "lmmixup.grpo")
        with training_console(self.name, g.max_steps, Path(config["log_dir"])):
            fit(config, {"grpo": ray.data.from_arrow(prompts)}, num_workers=g.num_workers,
                use_gpu=use_gpu, resources_per_worker=res, storage_path=str(self._dirs[2]),
                name=Path(config["output_dir"]).name, max_failures=g.max_failures, keep_checkpoints=1,
                log_level="INFO" if verbose() else "WARNING", train_loop=grpo_loop_per_worker)
        if not (Path(config["export_dir"]) / "config.json").is_file():
            raise RuntimeError(f"GRPO finished without exporting a model to {config['export_dir']}")
