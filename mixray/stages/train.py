"""train: the selected examples (+ MDIT mixes) -> a fine-tuned model, on Ray Train + DeepSpeed.

Inputs (``train.data``):

- ``all``: every example of ``<run_dir>/ingest/examples.parquet``;
- ``select``: the QDIT selection ``<run_dir>/select/selection.parquet`` (``id, rank, ...``);
- ``cluster``: the MDIT selection ``<run_dir>/cluster/selection.parquet`` (``id, rank,
  cluster, dist, is_mix, a_id, b_id, lam``): originals and mixed samples;
- ``auto``: the latest of these that is present (cluster, then select, then all).

``loss: mdit`` with ``all``/``select`` adds the mixes of the mix plan
(``<run_dir>/mix/mix_plan.parquet`` or ``train.mdit.mix_plan``: ``mix_id, a_id,
b_id, lam, ...``) whose two examples are both in the training set.
``loss: sftmix`` needs a confident/unconfident split: ``<run_dir>/dynamics/confidence.parquet``
(the dynamics stage) unless ``train.sftmix.confidence`` names a column or a file. Multi-turn
examples (``messages``) train on every assistant turn (``mixray.models.sft.encode_example``).

Outputs in ``<run_dir>/train/``:

    model/         the fine-tuned model (or LoRA adapter) + tokenizer, Hugging Face format
    merged/        LoRA merged into the base weights (``lora.merge: true``)
    metrics.csv    one row per optimizer step and attempt: loss, ntp, mix, lr, grad_norm, tokens/s
    loss.png       the loss curves
    rows.parquet   the training rows: id, is_mix, a_id, b_id, lam, group, shard, tokens, truncated
    logs/<run>/    the live CSV and TensorBoard events (``tensorboard --logdir``)
    ray/<run>/     Ray Train's checkpoints (resume point of an interrupted run)

Every user error (missing model, unknown LoRA target, batch sizes, missing
split or mix plan, empty training set) is raised here, on the driver, before
any worker starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixray.config import RayConfig, TrainConfig, section_hash
from mixray.console import follow, stage_bar, verbose
from mixray.contracts import (
    CONFIDENCE,
    EXAMPLES,
    MERGED,
    MIX_PLAN,
    SELECTIONS,
    TRAIN_MERGED,
    TRAIN_METRICS,
    TRAIN_MODEL,
    TRAIN_PLOT,
    TRAIN_ROWS,
)
from mixray.errors import ConfigError, InputError
from mixray.io.rundir import completed_output, file_sha256, fingerprint, output_hash, write_table
from mixray.models.registry import check_model, worker_model_ref
from mixray.schema import EXAMPLE_SCHEMA
from mixray.stages.runner import Outputs, Stage
from mixray.training.metrics import last_step, plot_loss_curves, read_metrics

log = logging.getLogger("mixray.train")

_TEXT = ("instruction", "input", "output")
_MESSAGES = EXAMPLE_SCHEMA.field("messages").type  # the turns of a multi-turn example
_GROUP_NAMES = {"confident": True, "unconfident": False}


# ----------------------------------------------------------------------------- inputs

def _complete_output(run_dir: Path, artifact) -> bool:
    return completed_output(run_dir, artifact) is not None


def resolve_data_source(cfg: TrainConfig, run_dir: Path) -> str:
    """``train.data`` -> all | select | cluster (``auto``: the latest selection present)."""
    if cfg.data != "auto":
        return cfg.data
    for artifact in SELECTIONS:
        if _complete_output(run_dir, artifact):
            return artifact.stage
    if _complete_output(run_dir, MERGED):
        return "distilled"
    return "all"


def _read_examples(path: Path) -> pa.Table:
    return pq.read_table(path, columns=["id", *_TEXT, "messages"])


def _take_ids(examples: pa.Table, ids: list[str], where: str) -> pa.Table:
    """Rows of ``examples`` for ``ids`` in that order; unknown ids are an error naming ``where``."""
    index = {v: i for i, v in enumerate(examples.column("id").to_pylist())}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputError(f"{where}: {len(missing)} id(s) are not in {EXAMPLES.stage}/{EXAMPLES.name}, "
                         f"e.g. {missing[:3]}; re-run the stages after ingest")
    return examples.take(pa.array([index[i] for i in ids], pa.int64()))


def _mix_rows(examples: pa.Table, mix_ids: list[str], a_ids: list[str], b_ids: list[str],
              lams: list[float], where: str) -> dict[str, list]:
    a = _take_ids(examples, a_ids, f"{where} (a_id)")
    b = _take_ids(examples, b_ids, f"{where} (b_id)")
    lam = np.asarray(lams, dtype=np.float64)
    if len(lam) and (not np.isfinite(lam).all() or (lam < 0).any() or (lam > 1).any()):
        raise InputError(f"{where}: lam must be in [0, 1]")
    out = {"id": list(mix_ids), "is_mix": [True] * len(mix_ids), "a_id": list(a_ids),
           "b_id": list(b_ids), "lam": lam.tolist()}
    for c in (*_TEXT, "messages"):
        out[f"{c}_a"] = a.column(c).to_pylist()
        out[f"{c}_b"] = b.column(c).to_pylist()
    return out


def _original_rows(t: pa.Table) -> dict[str, list]:
    n = t.num_rows
    out = {"id": t.column("id").to_pylist(), "is_mix": [False] * n, "a_id": t.column("id").to_pylist(),
           "b_id": [None] * n, "lam": [1.0] * n}
    for c in _TEXT:
        out[f"{c}_a"] = t.column(c).to_pylist()
        out[f"{c}_b"] = [""] * n
    out["messages_a"], out["messages_b"] = t.column("messages").to_pylist(), [None] * n
    return out


def _mix_plan_path(cfg: TrainConfig, run_dir: Path) -> tuple[Path, str]:
    if cfg.mdit.mix_plan:
        p = Path(cfg.mdit.mix_plan).expanduser()
        if not p.is_file():
            raise InputError(f"train.mdit.mix_plan: {p} not found")
        return p, file_sha256(p)
    p = MIX_PLAN.path(run_dir)
    if not _complete_output(run_dir, MIX_PLAN):
        raise InputError(f"train.loss=mdit needs a mix plan: {p} not found; run the mix stage "
                         "or set train.mdit.mix_plan")
    return p, output_hash(run_dir / MIX_PLAN.stage, MIX_PLAN.name)


def _confidence_path(cfg: TrainConfig, run_dir: Path, example_columns: list[str]) -> tuple[str, Path | None]:
    spec = cfg.sftmix.confidence
    if spec is None:
        p = CONFIDENCE.path(run_dir)
        if not _complete_output(run_dir, CONFIDENCE):
            raise InputError(
                f"train.loss=sftmix needs a confident/unconfident split: run the dynamics stage (it writes "
                f"{p}), or set train.sftmix.confidence to a column of {EXAMPLES.name} or a parquet file "
                "(id + confidence, or id + split)")
        return "file", p
    if spec in example_columns:
        return "column", None
    p = Path(spec).expanduser()
    if not p.is_file():
        raise InputError(f"train.sftmix.confidence={spec!r} is neither a column of {EXAMPLES.name} "
                         f"({example_columns}) nor an existing parquet file")
    return "file", p


def _confident_mask(values: list, name: str) -> np.ndarray:
    """Split values -> bool (True = confident): booleans, 'confident'/'unconfident', or numbers (median)."""
    from mixray.algorithms.sampling import median_split

    if any(v is None for v in values):
        raise InputError(f"{name}: {sum(v is None for v in values)} training example(s) have no value")
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=bool)
    if all(isinstance(v, str) for v in values):
        bad = sorted({v for v in values if v.lower() not in _GROUP_NAMES})
        if bad:
            raise InputError(f"{name}: split values must be 'confident' or 'unconfident', got {bad[:5]}")
        return np.asarray([_GROUP_NAMES[v.lower()] for v in values], dtype=bool)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        conf = np.asarray(values, dtype=np.float64)
        if not np.isfinite(conf).all():
            raise InputError(f"{name}: confidence values must be finite")
        return median_split(conf)
    raise InputError(f"{name}: expected booleans, 'confident'/'unconfident' or numbers")


def _sftmix_groups(cfg: TrainConfig, run_dir: Path, examples_path: Path, ids: list[str]) -> tuple[np.ndarray, dict]:
    from mixray.algorithms.sampling import CONFIDENT, UNCONFIDENT

    names = pq.ParquetFile(examples_path).schema_arrow.names
    kind, path = _confidence_path(cfg, run_dir, names)
    if kind == "column":
        col = cfg.sftmix.confidence
        t = pq.read_table(examples_path, columns=["id", col])
        values_by_id = dict(zip(t.column("id").to_pylist(), t.column(col).to_pylist(), strict=True))
        where, h = f"{EXAMPLES.name} column {col!r}", {}
    else:
        t = pq.read_table(path)
        cols = t.column_names
        value_col = "split" if "split" in cols else "confidence" if "confidence" in cols else None
        if "id" not in cols or value_col is None:
            raise InputError(f"{path}: expected columns id + split or id + confidence, got {cols}")
        values_by_id = dict(zip(t.column("id").to_pylist(), t.column(value_col).to_pylist(), strict=True))
        where, h = f"{path} ({value_col})", {"confidence": file_sha256(path)}
    missing = [i for i in ids if i not in values_by_id]
    if missing:
        raise InputError(f"{where}: no split value for {len(missing)} training example(s), e.g. {missing[:3]}")
    confident = _confident_mask([values_by_id[i] for i in ids], where)
    return np.where(confident, CONFIDENT, UNCONFIDENT).astype(np.int8), h


def _selection_rows(cfg: TrainConfig, run_dir: Path, examples: pa.Table, source: str,
                    inputs: dict[str, str]) -> tuple[pa.Table, dict[str, list] | None]:
    """(original examples, mixes or None) of a QDIT or MDIT selection, in rank order."""
    artifact = next(a for a in SELECTIONS if a.stage == source)
    sel_path = artifact.path(run_dir)
    inputs["selection"] = output_hash(run_dir / source, artifact.name)
    sel = pq.read_table(sel_path)
    if "id" not in sel.column_names:
        raise InputError(f"{sel_path}: no id column (has {sel.column_names})")
    if "rank" in sel.column_names:
        sel = sel.sort_by("rank")
    if source != "cluster":
        return _take_ids(examples, sel.column("id").to_pylist(), str(sel_path)), None
    need = {"is_mix", "a_id", "b_id", "lam"} - set(sel.column_names)
    if need:
        raise InputError(f"{sel_path}: missing columns {sorted(need)}")
    is_mix = np.asarray(sel.column("is_mix").to_pylist(), dtype=bool)
    orig_ids = [i for i, m in zip(sel.column("id").to_pylist(), is_mix, strict=True) if not m]
    m = sel.filter(pa.array(is_mix))
    if m.num_rows and cfg.loss != "mdit":
        raise ConfigError(
            f"train.data=cluster: {sel_path} holds {m.num_rows} mixed samples, which only "
            f"train.loss=mdit can train on (loss is {cfg.loss}); use train.data=select/all")
    mixes = _mix_rows(examples, m.column("id").to_pylist(), m.column("a_id").to_pylist(),
                      m.column("b_id").to_pylist(), m.column("lam").to_pylist(), str(sel_path))
    return _take_ids(examples, orig_ids, str(sel_path)), mixes


def _plan_mixes(cfg: TrainConfig, run_dir: Path, examples: pa.Table, originals: pa.Table,
                inputs: dict[str, str]) -> dict[str, list]:
    """The mix plan's mixes whose two examples are both in ``originals`` (MDIT on all/select)."""
    plan_path, inputs["mix_plan"] = _mix_plan_path(cfg, run_dir)
    plan = pq.read_table(plan_path)
    need = {"mix_id", "a_id", "b_id", "lam"} - set(plan.column_names)
    if need:
        raise InputError(f"{plan_path}: missing columns {sorted(need)}")
    have = set(originals.column("id").to_pylist())
    keep = [a in have and b in have for a, b in zip(plan.column("a_id").to_pylist(),
                                                     plan.column("b_id").to_pylist(), strict=True)]
    plan = plan.filter(pa.array(keep, pa.bool_()))
    return _mix_rows(examples, plan.column("mix_id").to_pylist(), plan.column("a_id").to_pylist(),
                     plan.column("b_id").to_pylist(), plan.column("lam").to_pylist(), str(plan_path))


def _rows_table(rows: dict[str, list], groups: np.ndarray) -> pa.Table:
    n = len(rows["id"])
    cols = {"row": pa.array(np.arange(n, dtype=np.int64)), "group": pa.array(groups),
            "id": pa.array(rows["id"], pa.string()), "is_mix": pa.array(rows["is_mix"], pa.bool_()),
            "a_id": pa.array(rows["a_id"], pa.string()), "b_id": pa.array(rows["b_id"], pa.string()),
            "lam": pa.array(rows["lam"], pa.float32())}
    for side in ("a", "b"):
        cols |= {f"{c}_{side}": pa.array(rows[f"{c}_{side}"], pa.string()) for c in _TEXT}
        cols[f"messages_{side}"] = pa.array(rows[f"messages_{side}"], _MESSAGES)
    if "system_a" in rows:
        cols["system_a"] = pa.array(rows["system_a"], pa.string())
    return pa.table(cols)


def sft_rows(ids: list[str], prompts: list[str], targets: list[str], system: str | None = None) -> pa.Table:
    """Plain SFT rows (prompt -> target, no mixes, one group) in ``build_training_rows``' layout.

    ``system``: a system message before every prompt (the chat template's system turn).
    """
    from mixray.algorithms.sampling import UNPAIRED

    n = len(ids)
    t = pa.table({"id": pa.array(ids, pa.string()), "instruction": pa.array(prompts, pa.string()),
                  "input": pa.array([""] * n, pa.string()), "output": pa.array(targets, pa.string()),
                  "messages": pa.nulls(n, _MESSAGES)})
    rows = _original_rows(t)
    if system is not None:
        rows["system_a"] = [system] * n
    return _rows_table(rows, np.full(n, UNPAIRED, dtype=np.int8))


def build_training_rows(cfg: TrainConfig, run_dir: Path) -> tuple[pa.Table, dict[str, str], dict[str, Any]]:
    """The training rows (text of both sides), the input hashes, and counts.

    Columns: ``row, id, is_mix, a_id, b_id, lam, group, instruction_a, input_a,
    output_a, messages_a, instruction_b, input_b, output_b, messages_b`` (the ``_b``
    side empty for originals; ``messages`` null for single-turn examples).
    """
    from mixray.algorithms.sampling import UNPAIRED

    examples_path = EXAMPLES.path(run_dir)
    inputs = {"examples": output_hash(run_dir / EXAMPLES.stage, EXAMPLES.name)}
    source = resolve_data_source(cfg, run_dir)
    examples = _read_examples(examples_path)
    originals, mixes = examples, None
    if source == "distilled":
        if not _complete_output(run_dir, MERGED):
            raise InputError(f"train.data=distilled needs {MERGED.path(run_dir)}: run the distill stage")
        originals = _read_examples(MERGED.path(run_dir))
        inputs["merged"] = output_hash(run_dir / MERGED.stage, MERGED.name)
    elif source != "all":
        originals, mixes = _selection_rows(cfg, run_dir, examples, source, inputs)
    if cfg.loss == "mdit" and source != "cluster":
        mixes = _plan_mixes(cfg, run_dir, examples, originals, inputs)
    rows = _original_rows(originals)
    for k in rows if mixes else ():
        rows[k].extend(mixes[k])
    n, n_mix = len(rows["id"]), len(mixes["id"]) if mixes else 0
    if n == 0:
        raise InputError(f"train: the training set is empty (train.data={cfg.data} -> {source})")
    if cfg.loss == "mdit" and n_mix == 0:
        raise InputError(f"train.loss=mdit needs mixed samples, but {source} gives none "
                         "(run the mix stage, or the cluster stage with mixes)")
    groups = np.full(n, UNPAIRED, dtype=np.int8)
    if cfg.loss == "sftmix":
        groups, h = _sftmix_groups(cfg, run_dir, examples_path, rows["id"])
        inputs |= h
    counts = {"source": source, "rows": n, "originals": n - n_mix, "mixes": n_mix}
    if cfg.loss == "sftmix":
        counts |= {"confident": int((groups == 1).sum()), "unconfident": int((groups == 2).sum())}
    return _rows_table(rows, groups), inputs, counts


# ----------------------------------------------------------------------------- driver-side checks

def check_lora_targets(model_path: str, targets: list[str], trust_remote_code: bool = False) -> None:
    """Every LoRA target must name a module of the model (peft matches names or name suffixes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if targets == ["all-linear"]:
        return
    mc = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(mc, trust_remote_code=trust_remote_code)
    names = [n for n, _ in skeleton.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"train.lora.target_modules: {missing} are not modules of {model_path}; "
                          f"its linear layers are {linear} (or use ['all-linear'])")


def _schedule(cfg: TrainConfig, groups: np.ndarray, world: int, seed: int) -> tuple[np.ndarray, int, int]:
    """(rank of each row, optimizer steps per epoch, total steps)."""
    from mixray.algorithms.sampling import assign_shards, micro_batches_per_epoch

    ranks = assign_shards(groups, world, seed)
    n_micro = micro_batches_per_epoch(groups, ranks, world, cfg.micro_batch_size, cfg.loss == "sftmix")
    per_epoch = n_micro // cfg.accumulation
    if per_epoch == 0:
        unit = "pairs" if cfg.loss == "sftmix" else "examples"
        raise InputError(
            f"train: {len(groups)} training rows are too few for one optimizer step: every step needs "
            f"{cfg.micro_batch_size} × {cfg.accumulation} (micro_batch_size × grad_accum) {unit} on each of "
            f"{world} workers" + (" (half confident, half unconfident)" if cfg.loss == "sftmix" else ""))
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return ranks, per_epoch, total


def resolve_precision(precision: str, use_gpu: bool, key: str = "train") -> str:
    """``auto`` -> bf16 on GPUs, fp32 on CPU; fp16 only with GPUs (``key``: the config section)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision == "fp16" and not use_gpu:
        raise ConfigError(f"{key}.precision=fp16 needs GPUs (no fp16 loss scaling on CPU); use bf16 or fp32")
    return precision


def worker_resources(cfg: Any, ray_cfg: RayConfig, key: str = "train") -> tuple[bool, dict[str, float]]:
    """``(use_gpu, resources per worker)`` of a Ray Train run from a section with ``use_gpu``,
    ``resources_per_worker`` and ``num_workers`` (``key``: its config path, for the errors);
    on a local Ray, fails at once when the workers cannot all be placed."""
    import ray

    have = ray.cluster_resources()
    use_gpu = have.get("GPU", 0) >= 1 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    res = dict(cfg.resources_per_worker or ({"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}))
    if use_gpu:
        res.setdefault("GPU", 1.0)
    elif res.get("GPU"):
        raise ConfigError(f"{key}.resources_per_worker asks for GPUs but {key}.use_gpu is false")
    local = not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))
    for k, v in res.items():
        need = v * cfg.num_workers
        if local and have.get(k, 0) < need:
            raise ConfigError(f"{key}: {cfg.num_workers} workers × {k}={v} need {need:g} {k}, but the "
                              f"local Ray has {have.get(k, 0):g}; lower {key}.num_workers or "
                              f"{key}.resources_per_worker")
    return use_gpu, res



# ----------------------------------------------------------------------------- tokenizing (Ray Data)

def tokenize_rows(table: pa.Table, cfg: TrainConfig, model: str | None = None) -> pa.Table:
    """Token ids of both sides of every row, by a Ray Data actor pool; rows in ``row`` order.

    ``model`` (default ``train.model``): a directory or an offline alias, which the
    actors resolve on their own nodes (``worker_model_ref``).
    """
    import ray

    from mixray.models.sft import SFTEncoder

    batch = 256
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=batch)
    ds = ds.map_batches(
        SFTEncoder, fn_constructor_kwargs={"model_path": worker_model_ref(model or cfg.model),
                                           "max_length": cfg.max_length,
                                           "trust_remote_code": cfg.trust_remote_code},
        batch_size=batch, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.tokenize_concurrency), num_cpus=1)
    parts = [ray.get(ref) for ref in ds.to_arrow_refs()]
    return pa.concat_tables(parts).sort_by("row")


# ----------------------------------------------------------------------------- the job

@dataclass
class TrainingJob:
    """Everything the driver decides before any worker starts (all checks done)."""

    cfg: TrainConfig
    seed: int
    rows: pa.Table  # build_training_rows + the ``shard`` (rank) of every row
    counts: dict[str, Any]
    inputs: dict[str, str]
    config_hash: str
    steps_per_epoch: int
    total_steps: int
    template: dict | None
    model_path: str = ""
    use_gpu: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    pad_id: int = 0
    ds_config: dict | None = None  # what deepspeed.initialize reads (built by resolve_job)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config_hash, self.inputs)

    @property
    def run_name(self) -> str:
        return f"run-{self.fingerprint[:12]}"

    def loop_config(self, log_dir: Path, export_dir: Path, merged_dir: Path | None = None,
                    dataset_prefix: str = "train_") -> dict[str, Any]:
        """The plain dict ``train_loop_per_worker`` runs on."""
        cfg = self.cfg
        ds = None
        if cfg.deepspeed.enabled:
            ds = {"config": self.ds_config, "cpu_shm_comm": cfg.deepspeed.cpu_shm_comm}
        lora = None
        if cfg.lora.enabled:
            lora = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                    "target_modules": list(cfg.lora.target_modules)}
        return {
            "run_name": self.run_name, "model_path": worker_model_ref(cfg.model),
            "trust_remote_code": cfg.trust_remote_code, "loss": cfg.loss, "seed": self.seed,
            "pad_id": self.pad_id, "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.accumulation,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "warmup_steps": math.ceil(cfg.warmup_ratio * self.total_steps), "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "adam_betas": list(cfg.adam_betas), "adam_eps": cfg.adam_eps,
            "max_grad_norm": cfg.max_grad_norm, "precision": self.precision,
            "gradient_checkpointing": cfg.gradient_checkpointing, "lora": lora, "deepspeed": ds,
            "sftmix_alpha": cfg.sftmix.alpha, "sftmix_mu": cfg.sftmix.mu,
            "sftmix_normalizer": cfg.sftmix.normalizer, "chunk_rows": cfg.loss_chunk_rows,
            "checkpoint_every": cfg.checkpoint_every, "report_every_s": cfg.report_every_s,
            "threads": None if self.use_gpu else (cfg.threads or max(1, int(self.resources.get("CPU", 1)))),
            "dataset_prefix": dataset_prefix, "log_dir": str(log_dir), "export_dir": str(export_dir),
            "merged_dir": str(merged_dir) if merged_dir else None,
            "fault_step": cfg.fault_injection.fail_at_step, "fault_rank": cfg.fault_injection.rank,
        }

    def deepspeed_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"zero_stage": cfg.deepspeed.stage, "offload_optimizer": cfg.deepspeed.offload_optimizer,
                "offload_params": cfg.deepspeed.offload_params, "template": self.template,
                "precision": self.precision, "micro_batch_size": cfg.micro_batch_size,
                "grad_accum": cfg.accumulation, "world_size": cfg.num_workers,
                "max_grad_norm": cfg.max_grad_norm, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "adam_betas": list(cfg.adam_betas), "adam_eps": cfg.adam_eps, "on_gpu": self.use_gpu}


def plan_job(cfg: TrainConfig, run_dir: Path, seed: int = 0,
             rows: tuple[pa.Table, dict[str, str], dict[str, Any]] | None = None,
             setting: str = "train") -> TrainingJob:
    """The checks and decisions that need neither Ray nor the model's weights.

    ``rows``: training rows built elsewhere (``build_training_rows``' table, input hashes
    and counts), e.g. LM-Mixup's distiller pairs; default: ``build_training_rows``.
    ``setting``: the config section named in errors (``train``, ``lmmixup.sft``).
    """
    check_model(cfg.model, f"{setting}.model", need="model")
    table, inputs, counts = rows if rows is not None else build_training_rows(cfg, run_dir)
    template = None
    if cfg.deepspeed.enabled and cfg.deepspeed.config_file:
        template = _read_template(cfg.deepspeed.config_file)
    ranks, per_epoch, total = _schedule(cfg, table.column("group").to_numpy(), cfg.num_workers, seed)
    table = table.append_column("shard", pa.array(ranks.astype(np.int32)))
    config_hash = section_hash(cfg.model_dump(mode="json") | {"seed": seed})
    return TrainingJob(cfg, seed, table, counts, inputs, config_hash, per_epoch, total, template)


def resolve_job(job: TrainingJob, ray_cfg: RayConfig) -> TrainingJob:
    """Model path (building an offline alias once), LoRA targets, workers' resources, precision."""
    from mixray.distributed.runtime import init_ray
    from mixray.models.registry import resolve_model
    from mixray.models.sft import load_tokenizer

    cfg = job.cfg
    job.model_path = resolve_model(cfg.model, "train.model")
    if cfg.lora.enabled:
        check_lora_targets(job.model_path, cfg.lora.target_modules, cfg.trust_remote_code)
    job.pad_id = int(load_tokenizer(job.model_path, cfg.trust_remote_code).pad_token_id)
    init_ray(ray_cfg)
    job.use_gpu, job.resources = worker_resources(cfg, ray_cfg)
    job.precision = resolve_precision(cfg.precision, job.use_gpu)
    if cfg.deepspeed.enabled:
        from mixray.training.deepspeed_config import build_deepspeed_config

        try:  # built here, once: a bad setting fails before any worker starts
            job.ds_config = build_deepspeed_config(job.deepspeed_settings())
        except ValueError as e:
            raise ConfigError(f"train.deepspeed: {e}") from None
    return job


def rank_datasets(tokens: pa.Table, num_workers: int, prefix: str = "train_") -> dict[str, Any]:
    """One Ray Dataset per rank (``<prefix><rank>``) from the tokenized rows' ``shard`` column."""
    import ray

    shard = tokens.column("shard").to_numpy()
    return {f"{prefix}{r}": ray.data.from_arrow(tokens.filter(pa.array(shard == r)))
            for r in range(num_workers)}


@contextlib.contextmanager
def training_console(stage: str, total_steps: int, log_dir: Path) -> Iterator[None]:
    """The driver's console while Ray Train runs: Ray Data's bars off (one per worker per
    epoch otherwise) and one bar for ``stage`` that follows the steps rank 0 writes to
    ``log_dir/metrics.csv``."""
    import ray

    metrics_csv = log_dir / "metrics.csv"
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        with stage_bar(stage, total_steps, unit="steps") as bar, follow(bar, lambda: last_step(metrics_csv)):
            yield
    finally:
        ctx.enable_progress_bars = bars


def fit_job(job: TrainingJob, tokens: pa.Table, storage: Path, loop_config: dict[str, Any],
            stage: str = "train"):
    """Train ``job`` on its tokenized rows with ``fit`` (Ray Train); returns the ``Result``.

    ``loop_config``: ``job.loop_config(...)`` plus any optional loop keys (``export_steps``).
    The run is named ``job.run_name`` under ``storage``: re-running the same job resumes it.
    The console shows one bar for ``stage`` that follows the steps rank 0 logs.
    Fails unless the final export (``loop_config["export_dir"]``) holds a model.
    """
    from mixray.training.loop import fit

    cfg = job.cfg
    with training_console(stage, job.total_steps, Path(loop_config["log_dir"])):
        result = fit(loop_config, rank_datasets(tokens, cfg.num_workers), num_workers=cfg.num_workers,
                     use_gpu=job.use_gpu, resources_per_worker=job.resources, storage_path=str(storage),
                     name=job.run_name, max_failures=cfg.max_failures, keep_checkpoints=cfg.keep_checkpoints,
                     log_level="INFO" if verbose() else "WARNING")
    export_dir = Path(loop_config["export_dir"])
    if not any((export_dir / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise RuntimeError(f"training finished without exporting a model to {export_dir}")
    return result


class Train(Stage):
    """``train``: the selection (+ mixes, + SFTMix split) -> a fine-tuned model on Ray Train."""

    name = "train"
    # what run() writes (a subclass training another model on other rows names its own)
    model_out, merged_out, metrics_out, plot_out, rows_out = (
        TRAIN_MODEL, TRAIN_MERGED, TRAIN_METRICS, TRAIN_PLOT, TRAIN_ROWS)
    outputs = (TRAIN_MODEL, TRAIN_MERGED, TRAIN_METRICS, TRAIN_PLOT, TRAIN_ROWS)
    summary = "{steps} steps"
    seeded = True
    memory_knobs = ("micro_batch_size", "max_length", "num_workers", "gradient_checkpointing")

    def check(self) -> None:
        # paths go to Ray workers, whose working directory differs
        self.run_dir, self.stage_dir = self.run_dir.resolve(), self.stage_dir.resolve()
        self.job = plan_job(self.section, self.run_dir, self.cfg.seed)  # every check, no Ray

    def input_hashes(self) -> dict[str, str]:
        return self.job.inputs

    @property
    def _dirs(self) -> tuple[Path, Path]:
        """(Ray Train storage, this run's log dir)."""
        return self.stage_dir / "ray", self.stage_dir / "logs" / self.job.run_name

    def reset(self) -> None:
        storage, log_dir = self._dirs
        shutil.rmtree(storage / self.job.run_name, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)

    def run(self, out: Outputs) -> None:
        cfg, job = self.section, resolve_job(self.job, self.cfg.ray)
        t0 = time.time()
        tokens = tokenize_rows(job.rows, cfg)
        n_trunc = int(np.count_nonzero(tokens.column("truncated").to_numpy()))
        if n_trunc:
            log.warning("%s: %d of %d rows were cut to max_length=%d tokens", self.name, n_trunc,
                        len(tokens), cfg.max_length)
        export_dir = out.path(self.model_out)
        merged_dir = out.path(self.merged_out) if cfg.lora.enabled and cfg.lora.merge else None
        result = self._fit(job, tokens, export_dir, merged_dir)
        metrics = self._write_outputs(out, job, tokens)
        out.counts = job.counts | {
            "truncated": n_trunc, "steps": job.total_steps, "steps_per_epoch": job.steps_per_epoch,
            "epochs": cfg.epochs, "tokens_trained": int(sum(m["tokens"] for m in metrics)),
            "restarts": int(max((m["attempt"] for m in metrics), default=0))}
        out.extra = {"loss": cfg.loss, "final_loss": metrics[-1]["loss"] if metrics else None,
                     "ray_run": job.run_name,
                     "checkpoint": result.checkpoint.path if result.checkpoint else None,
                     "tensorboard": str(self._dirs[1] / "tensorboard"), "precision": job.precision,
                     "workers": cfg.num_workers, "use_gpu": job.use_gpu, "lora": cfg.lora.enabled}
        log.info("%s[%s]: %d steps on %d rows (%d mixes, %d truncated) in %.1f s; final loss %.4f -> %s",
                 self.name, cfg.loss, job.total_steps, job.counts["rows"], job.counts["mixes"], n_trunc,
                 time.time() - t0, out.extra["final_loss"] or math.nan, self.model_out.path(self.run_dir))

    def _fit(self, job: TrainingJob, tokens: pa.Table, export_dir: Path, merged_dir: Path | None):
        storage, log_dir = self._dirs
        return fit_job(job, tokens, storage, job.loop_config(log_dir, export_dir, merged_dir), self.name)

    def _write_outputs(self, out: Outputs, job: TrainingJob, tokens: pa.Table) -> list[dict]:
        """metrics.csv, loss.png and rows.parquet; returns the metrics."""
        log_dir = self._dirs[1]
        metrics = read_metrics(log_dir / "metrics.csv")
        shutil.copyfile(log_dir / "metrics.csv", out.path(self.metrics_out))
        plot_loss_curves(metrics, out.path(self.plot_out), _title(self.section, job.counts))
        n_tok = (pc.list_value_length(tokens.column("ids_a")).to_numpy()
                 + pc.list_value_length(tokens.column("ids_b")).to_numpy())
        keep = ["row", "id", "is_mix", "a_id", "b_id", "lam", "group", "shard", "truncated"]
        write_table(tokens.select(keep).append_column("tokens", pa.array(n_tok.astype(np.int32))),
                    out.path(self.rows_out))
        return metrics


def _title(cfg: TrainConfig, counts: dict) -> str:
    mode = "LoRA" if cfg.lora.enabled else "full"
    eng = f"ZeRO-{cfg.deepspeed.stage}" if cfg.deepspeed.enabled else "DDP"
    return f"{cfg.loss} · {mode} · {eng} · {cfg.num_workers} workers · {counts['rows']} rows"


def _read_template(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"train.deepspeed.config_file: {p} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"train.deepspeed.config_file: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"train.deepspeed.config_file: {p} must hold a JSON object")
    return data
