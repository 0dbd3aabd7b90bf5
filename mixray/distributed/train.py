"""Layer 2: fine-tuning on Ray Train — one readable loop over a plain dict, and its TorchTrainer.

``train_loop_per_worker(config)`` runs on every Ray Train worker::

    rows of my shard (get_dataset_shard)  ->  model (+ LoRA)  ->  DeepSpeed ZeRO or DDP
    resume from ray.train.get_checkpoint() if there is one
    for each optimizer step:  G micro-batches (the pure sampler decides which rows),
        loss = ntp | mdit | sftmix (mixray.algorithms.losses), token means over the whole
        accumulation window on all ranks, backward, step
        log metrics (rank 0: CSV + TensorBoard every step; Ray Train every ``report_every_s``);
        every ``checkpoint_every`` steps and at the end, report with a checkpoint
    export the model in Hugging Face format (rank 0 writes; ZeRO-3 gathers first)

Ray owns the workers, restarts them after a failure (``FailureConfig``) and
stores checkpoints (``RunConfig(storage_path)``); the loop only saves and
loads. Every setting arrives in ``config`` (keys: ``LOOP_KEYS``), the DeepSpeed
config too (``config["deepspeed"]["config"]``, from the pure
``build_deepspeed_config``); nothing is read from globals, so the same function
runs from ``mixray train``, a test or a notebook.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mixray.train")

# Keys of the loop config (all plain JSON-able values).
LOOP_KEYS = (
    "run_name", "model_path", "trust_remote_code", "loss", "seed", "pad_id",
    "micro_batch_size", "grad_accum", "steps_per_epoch", "total_steps", "warmup_steps",
    "lr", "weight_decay", "adam_betas", "adam_eps", "max_grad_norm", "precision",
    "gradient_checkpointing", "lora", "deepspeed", "sftmix_alpha", "sftmix_mu", "chunk_rows",
    "checkpoint_every", "report_every_s", "threads", "dataset_prefix",
    "log_dir", "export_dir", "merged_dir", "fault_step", "fault_rank",
)
METRIC_COLUMNS = ("step", "attempt", "epoch", "loss", "ntp", "mix", "lr", "grad_norm",
                  "tokens", "tokens_per_s", "step_time_s", "examples", "time")
_STATE = "trainer_state.json"
_DS_TAG = "state"


# ----------------------------------------------------------------------------- the loop

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The per-worker training loop (see the module docstring)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch = _worker_setup(config)
    import torch.distributed as dist

    from mixray.algorithms.sampling import epoch_micro_batches

    device = _device()
    shard = _read_shard(ray.train.get_dataset_shard(f"{config['dataset_prefix']}{rank}"))
    engine = _make_engine(config, device)

    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if _checkpoint_run(Path(d)) == config["run_name"]:
                step = engine.load(Path(d), rank)
            elif rank == 0:
                log.warning("train: the latest checkpoint belongs to run %r, not %r: starting at step 0",
                            _checkpoint_run(Path(d)), config["run_name"])
    logger = _MetricsLog(Path(config["log_dir"]), resumed_from=step) if rank == 0 else None
    if rank == 0:
        log.info("train: rank 0 of %d, %d examples in my shard, %s, resuming at step %d of %d",
                 world, len(shard["group"]), config["loss"], step, config["total_steps"])

    G, B, spe = config["grad_accum"], config["micro_batch_size"], config["steps_per_epoch"]
    paired = config["loss"] == "sftmix"
    every, total = config["checkpoint_every"], config["total_steps"]
    last_report = time.monotonic()
    while step < total:
        epoch, first = divmod(step, spe)
        batches, lams = epoch_micro_batches(
            shard["group"], epoch=epoch, seed=config["seed"], rank=rank, micro_batch_size=B,
            n_micro=spe * G, paired=paired, alpha=config["sftmix_alpha"])
        for w in range(first, spe):
            t0 = time.perf_counter()
            window = [_make_batch(config, shard, batches[j], None if lams is None else lams[j])
                      for j in range(w * G, (w + 1) * G)]
            # token-mean normalizers of the whole window on all ranks, scaled by the world
            # size because the engine averages gradients over ranks
            norms = torch.tensor([sum(mb["norms"][k] for mb in window) for k in range(2)],
                                 dtype=torch.float64)
            dist.all_reduce(norms)
            norms = (norms / world).tolist()
            lr = engine.lr()
            sums = torch.zeros(6, dtype=torch.float64)  # loss, ntp, mix, tokens, examples, report?
            for i, mb in enumerate(window):
                boundary = i == G - 1
                with engine.accumulate(boundary):
                    loss, ntp, mix = _LOSS_STEPS[config["loss"]](engine, _to(mb, device), norms, config)
                    engine.backward(loss)
                engine.step(boundary)
                sums[:5] += torch.tensor([loss.item(), ntp.item(), mix.item(), mb["tokens"], mb["examples"]],
                                         dtype=torch.float64)
            # Ray Train's controller takes one report per ~2 s and a report blocks until taken:
            # rank 0's clock decides when to report, and the all-reduce tells every rank.
            sums[5] = float(rank == 0 and time.monotonic() - last_report >= config["report_every_s"])
            dist.all_reduce(sums)
            step += 1
            dt = time.perf_counter() - t0
            loss_v, ntp_v, mix_v = (sums[:3] / world).tolist()
            metrics = {"step": step, "epoch": epoch, "loss": loss_v, "ntp": ntp_v, "mix": mix_v,
                       "lr": lr, "grad_norm": engine.grad_norm(), "tokens": int(sums[3]),
                       "tokens_per_s": float(sums[3]) / dt, "step_time_s": dt, "examples": int(sums[4]),
                       "time": time.time()}
            if logger is not None:
                logger.write(metrics)
            if config["fault_step"] == step and rank == config["fault_rank"]:
                _inject_fault(Path(config["log_dir"]), step)
            save = step == total or (every > 0 and step % every == 0)
            if save:
                with tempfile.TemporaryDirectory(prefix="mixray-ckpt-") as d:
                    engine.save(Path(d), rank, step, config["run_name"])
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            elif sums[5] > 0:
                ray.train.report(metrics)
            if save or sums[5] > 0:
                last_report = time.monotonic()
            if step >= total:
                break

    engine.export(config, rank)
    if logger is not None:
        logger.close()
    ray.train.report({"step": step, "done": 1})


# ----------------------------------------------------------------------------- worker setup

def _worker_setup(config: dict[str, Any]):
    """Environment a worker needs before torch/deepspeed are used; returns the torch module."""
    import torch

    try:  # Ray Train logs every report at INFO, one line per step and rank: keep our own log
        from ray.train.v2._internal.execution import context as _ray_ctx

        logging.getLogger(_ray_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass

    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import: CPU when there is no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
    ds = config.get("deepspeed")
    if ds is not None and not torch.cuda.is_available() and not ds.get("cpu_shm_comm"):
        # DeepSpeed's comm backend compiles a shared-memory allreduce op on CPU the first time
        # (~1 min); marking it unavailable keeps gloo's allreduce and compiles nothing.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return torch


def _device():
    import ray.train.torch

    return ray.train.torch.get_device()


def _read_shard(it) -> dict[str, list]:
    """All rows of this worker's shard, in global ``row`` order (block order does not matter)."""
    import numpy as np

    parts: dict[str, list] = {}
    for batch in it.iter_batches(batch_size=4096, batch_format="pyarrow", prefetch_batches=1):
        for name in ("row", "group", "is_mix", "lam", "ids_a", "prompt_a", "ids_b", "prompt_b"):
            parts.setdefault(name, []).extend(batch.column(name).to_pylist())
    order = np.argsort(np.asarray(parts.get("row", []), dtype=np.int64), kind="stable")
    out = {k: [v[i] for i in order] for k, v in parts.items()}
    out["group"] = np.asarray(out.get("group", []), dtype=np.int64)
    return out


# ----------------------------------------------------------------------------- batches and losses

def _make_batch(config, shard, idx, lam) -> dict[str, Any]:
    """Rows ``idx`` of the shard -> tensors (CPU), the window-normalizer counts, token count."""
    import torch

    from mixray.algorithms.batching import mix_batch, sft_batch
    from mixray.algorithms.losses import mixup_target_mass, sftmix_pair_positions, token_count

    rows = [int(i) for i in idx]
    pad = config["pad_id"]
    if config["loss"] == "mdit":
        mb = mix_batch([shard["ids_a"][i] for i in rows], [shard["prompt_a"][i] for i in rows],
                       [shard["ids_b"][i] for i in rows], [shard["prompt_b"][i] for i in rows],
                       [shard["lam"][i] for i in rows], pad)
        mb["is_mix"] = torch.tensor([bool(shard["is_mix"][i]) for i in rows])
        mass = float(mixup_target_mass(mb["targets_a"], mb["targets_b"], mb["lam"].double()))
        mb["norms"] = (mass, 0.0)
        mb["tokens"] = int((mb["attention_mask_a"].bool() | mb["attention_mask_b"].bool()).sum())
    else:
        mb = sft_batch([shard["ids_a"][i] for i in rows], [shard["prompt_a"][i] for i in rows], pad)
        n_mix = 0.0
        if config["loss"] == "sftmix":
            b = len(rows) // 2
            mb["conf_rows"], mb["unconf_rows"] = torch.arange(b), torch.arange(b, 2 * b)
            mb["lam"] = torch.as_tensor(lam, dtype=torch.float32)
            n_mix = float(sftmix_pair_positions(mb["targets"], mb["conf_rows"], mb["unconf_rows"])[0].numel())
        mb["norms"] = (float(token_count(mb["targets"])), n_mix)
        mb["tokens"] = int(mb["attention_mask"].sum())
    mb["examples"] = len(rows)
    return mb


def _to(mb: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in mb.items()}


def _ntp_step(engine, mb, norms, config):
    from mixray.algorithms.losses import ntp_loss

    logits = engine.forward(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    loss = ntp_loss(logits, mb["targets"], normalizer=norms[0], chunk_rows=config["chunk_rows"])
    return loss, loss.detach(), loss.new_zeros(())


def _mdit_step(engine, mb, norms, config):
    """Embed both sides with the model's own input embeddings, mix, forward ``inputs_embeds``."""
    import torch

    from mixray.algorithms.losses import mdit_loss, mix_embeddings

    B = mb["input_ids_a"].shape[0]
    emb = engine.input_embeddings()(torch.cat([mb["input_ids_a"], mb["input_ids_b"]]))
    h, mask = mix_embeddings(emb[:B], mb["attention_mask_a"], emb[B:], mb["attention_mask_b"], mb["lam"])
    logits = engine.forward(inputs_embeds=h, attention_mask=mask).logits
    total, orig, mix = mdit_loss(logits, mb["targets_a"], mb["targets_b"], mb["lam"], mb["is_mix"],
                                 normalizer=norms[0], chunk_rows=config["chunk_rows"])
    return total, orig.detach(), mix.detach()


def _sftmix_step(engine, mb, norms, config):
    """One forward over b confident + b unconfident examples; NTP + μ·Mixup of their logits."""
    from mixray.algorithms.losses import sftmix_loss

    logits = engine.forward(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
    total, ntp, mix = sftmix_loss(logits, mb["targets"], mb["conf_rows"], mb["unconf_rows"], mb["lam"],
                                  mu=config["sftmix_mu"], ntp_normalizer=norms[0],
                                  mix_normalizer=norms[1], chunk_rows=config["chunk_rows"])
    return total, ntp.detach(), mix.detach()


_LOSS_STEPS = {"ntp": _ntp_step, "mdit": _mdit_step, "sftmix": _sftmix_step}


# ----------------------------------------------------------------------------- model and engines

def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _build_model(config: dict[str, Any], ds_config: dict | None):
    """The causal LM (+ LoRA). Under ZeRO-3 it is created partitioned (``zero.Init``).

    Returns ``(model, hf_ds_config)``; keep the second alive while the model is used
    (transformers consults it for ZeRO-3 loading and saving).
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf_ds = None
    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        import torch._dynamo  # noqa: F401  (deepspeed.zero.Init needs it imported first)
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # from_pretrained now loads under zero.Init
    dtype = _dtype(config["precision"]) if ds_config is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"], dtype=dtype, trust_remote_code=config["trust_remote_code"])
    model.config.use_cache = False
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = config.get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        if config["gradient_checkpointing"]:
            model.enable_input_require_grads()
        targets = lora["target_modules"]
        torch.manual_seed(config["seed"])  # adapters initialised from the seed alone, on every rank
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM"))
    return model, hf_ds


def _param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (as HF Trainer)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler(config):
    from transformers import get_cosine_schedule_with_warmup

    return lambda opt: get_cosine_schedule_with_warmup(opt, config["warmup_steps"], config["total_steps"])


def _make_engine(config: dict[str, Any], device):
    return _DeepSpeedEngine(config, device) if config.get("deepspeed") else _DDPEngine(config, device)


class _DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 (+ offload); a torch AdamW unless the config names an optimizer."""

    def __init__(self, config, device):
        import copy

        import deepspeed
        import torch

        self.config = config
        # built on the driver by build_deepspeed_config (mixray.distributed.deepspeed_config)
        self.ds_config = copy.deepcopy(config["deepspeed"]["config"])
        self.zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        # join DeepSpeed's comm to the process group Ray Train made (zero.Init reads its world size)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        model, self._hf_ds = _build_model(config, self.ds_config)
        groups = _param_groups(model, config["weight_decay"])
        opt = None  # an "optimizer" section (CPU offload, or a template's) makes DeepSpeed build it
        if "optimizer" not in self.ds_config:
            opt = torch.optim.AdamW(groups, lr=config["lr"], betas=tuple(config["adam_betas"]),
                                    eps=config["adam_eps"])
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, model_parameters=groups, config=self.ds_config,
            lr_scheduler=_scheduler(config))

    @property
    def module(self):
        return self.engine.module

    def input_embeddings(self):
        return self.engine.module.get_input_embeddings()

    def forward(self, **kw):
        return self.engine(**kw, use_cache=False)

    @contextlib.contextmanager
    def accumulate(self, boundary: bool):
        self.engine.set_gradient_accumulation_boundary(boundary)
        yield

    def backward(self, loss):
        # the loss is already a token mean over the whole window: no 1/G scaling
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, boundary: bool):
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def save(self, d: Path, rank: int, step: int, run_name: str) -> None:
        lora = bool(self.config.get("lora"))
        self.engine.save_checkpoint(str(d), tag=_DS_TAG, exclude_frozen_parameters=lora)
        _save_common(d, rank, step, run_name)

    def load(self, d: Path, rank: int) -> int:
        self.engine.load_checkpoint(str(d), tag=_DS_TAG, load_module_strict=not self.config.get("lora"))
        return _load_common(d, rank)

    def export(self, config, rank) -> None:
        sd = None
        if self.zero3:  # every rank takes part in the gather; rank 0 gets the full state dict
            sd = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=bool(config.get("lora")))
        if rank == 0:
            if self._hf_ds is not None:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()  # later from_pretrained calls load normally
            _export_hf(self.engine.module, config, sd)
        import torch.distributed as dist

        dist.barrier()


class _DDPEngine:
    """Plain PyTorch DistributedDataParallel (``deepspeed.enabled: false``)."""

    def __init__(self, config, device):
        import ray.train.torch
        import torch

        self.config = config
        model, _ = _build_model(config, None)
        self._module = model
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.opt = torch.optim.AdamW(_param_groups(model, config["weight_decay"]), lr=config["lr"],
                                     betas=tuple(config["adam_betas"]), eps=config["adam_eps"])
        self.sched = _scheduler(config)(self.opt)
        self.autocast = config["precision"] == "bf16"
        self.device = device
        self._grad_norm = float("nan")

    @property
    def module(self):
        return self._module

    def input_embeddings(self):
        return self._module.get_input_embeddings()

    def forward(self, **kw):
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(**kw, use_cache=False)

    @contextlib.contextmanager
    def accumulate(self, boundary: bool):
        sync = boundary or not hasattr(self.model, "no_sync")
        with contextlib.nullcontext() if sync else self.model.no_sync():
            yield

    def backward(self, loss):
        loss.backward()

    def step(self, boundary: bool):
        import torch

        if not boundary:
            return
        params = [p for p in self._module.parameters() if p.requires_grad]
        max_norm = self.config["max_grad_norm"] or float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    def grad_norm(self) -> float:
        return self._grad_norm

    def save(self, d: Path, rank: int, step: int, run_name: str) -> None:
        import torch

        if rank == 0:
            trainable = {n for n, p in self._module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in self._module.state_dict().items() if k in trainable}
            torch.save({"model": state, "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict()}, d / "ddp_state.pt")
        _save_common(d, rank, step, run_name)

    def load(self, d: Path, rank: int) -> int:
        import torch

        state = torch.load(d / "ddp_state.pt", map_location="cpu", weights_only=True)
        missing = self._module.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unknown parameters: {missing.unexpected_keys[:5]}")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return _load_common(d, rank)

    def export(self, config, rank) -> None:
        if rank == 0:
            _export_hf(self._module, config, None)
        import torch.distributed as dist

        dist.barrier()


def _save_common(d: Path, rank: int, step: int, run_name: str) -> None:
    """The loop's own state: step and run name (rank 0) and every rank's RNG state."""
    import torch

    (d / "rng").mkdir(exist_ok=True)
    torch.save(torch.get_rng_state(), d / "rng" / f"rank{rank}.pt")
    if rank == 0:
        (d / _STATE).write_text(json.dumps({"step": step, "run_name": run_name}))


def _checkpoint_run(d: Path) -> str | None:
    p = d / _STATE
    return json.loads(p.read_text()).get("run_name") if p.is_file() else None


def _load_common(d: Path, rank: int) -> int:
    import torch

    rng = d / "rng" / f"rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return int(json.loads((d / _STATE).read_text())["step"])


def _export_hf(module, config, state_dict) -> None:
    """Rank 0: the model (or LoRA adapter) + tokenizer as a Hugging Face directory."""
    from mixray.models.sft import load_tokenizer

    out = Path(config["export_dir"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        module.save_pretrained(tmp, state_dict=state_dict)
    else:
        module.save_pretrained(tmp)
    tok = load_tokenizer(config["model_path"], config["trust_remote_code"])
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if config.get("lora") and config.get("merged_dir"):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32,
                                                    trust_remote_code=config["trust_remote_code"])
        merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
        mtmp = Path(config["merged_dir"] + ".partial")
        shutil.rmtree(mtmp, ignore_errors=True)
        merged.save_pretrained(mtmp)
        tok.save_pretrained(mtmp)
        shutil.rmtree(config["merged_dir"], ignore_errors=True)
        os.replace(mtmp, config["merged_dir"])
    log.info("train: exported %s%s", out, " (+ merged weights)" if config.get("merged_dir") else "")


# ----------------------------------------------------------------------------- metrics, faults

class _MetricsLog:
    """Rank 0: one CSV row and TensorBoard scalars per optimizer step, in ``log_dir``.

    Rows of earlier attempts (before a restart) stay, tagged by ``attempt``; the
    curve of a run is the last attempt's row for each step.
    """

    def __init__(self, log_dir: Path, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.csv"
        self.attempt = 0
        if self.path.is_file():
            with open(self.path, newline="") as f:
                attempts = [int(r["attempt"]) for r in csv.DictReader(f)]
            self.attempt = max(attempts, default=-1) + 1
        new = not self.path.is_file()
        self._f = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._f, fieldnames=METRIC_COLUMNS)
        if new:
            self._csv.writeheader()
        self._tb = SummaryWriter(str(log_dir / "tensorboard"), purge_step=resumed_from + 1 if resumed_from else None)
        self.resumed_from = resumed_from

    def write(self, m: dict[str, Any]) -> None:
        self._csv.writerow({k: m.get(k, self.attempt if k == "attempt" else "") for k in METRIC_COLUMNS})
        self._f.flush()
        for k in ("loss", "ntp", "mix", "lr", "grad_norm", "tokens_per_s"):
            self._tb.add_scalar(f"train/{k}", m[k], m["step"])
        if m["step"] % 10 == 0 or m["step"] == 1:
            log.info("step %d: loss %.4f (ntp %.4f, mix %.4f) lr %.2e, %.0f tok/s", m["step"], m["loss"],
                     m["ntp"], m["mix"], m["lr"], m["tokens_per_s"])

    def close(self) -> None:
        self._tb.close()
        self._f.close()


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

def fit(
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    resources_per_worker: dict[str, float] | None,
    storage_path: str,
    name: str,
    max_failures: int,
    keep_checkpoints: int,
):
    """Run ``train_loop_per_worker`` on a ``TorchTrainer``; returns the Ray Train ``Result``.

    A run with the same ``name`` under ``storage_path`` resumes from its latest
    checkpoint (Ray restores the run's checkpoint state), as does a worker group
    restarted after a failure. ``datasets``: one Ray Dataset per rank
    (``<dataset_prefix><rank>``), given whole to every worker (the loop reads
    only its own): the shard assignment is the pure sampler's, not Ray's.
    """
    missing = set(LOOP_KEYS) - set(loop_config)
    if missing:
        raise ValueError(f"loop config misses {sorted(missing)}")
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    return trainer.fit()
