"""Training engines: the model (+ LoRA), its optimizer and schedule, one step, checkpoints.

Two engines with one interface, chosen by ``make_engine(config, device)``:

- ``DeepSpeedEngine``: DeepSpeed ZeRO 0-3 (+ CPU offload) when ``config["deepspeed"]``
  is set (its ``"config"`` is built on the driver by
  ``mixray.training.deepspeed_config.build_deepspeed_config``);
- ``DDPEngine``: plain PyTorch ``DistributedDataParallel`` otherwise.

The interface a loop (or a new method) drives::

    engine.forward(**model_inputs) -> model output     engine.input_embeddings() -> nn.Embedding
    with engine.accumulate(boundary): engine.backward(loss)
    engine.step(boundary)                              engine.lr(), engine.grad_norm()
    engine.save(dir, rank, step, run_name)             engine.load(dir, rank) -> step
    engine.module                                      the (peft-wrapped) Hugging Face model
    engine.gathered_state_dict()                       collective: ZeRO-3's full state dict (rank 0)
    engine.plain_loading()                             context: from_pretrained loads unpartitioned
    engine.close()

A loss handed to ``backward`` is already a token mean over the whole accumulation
window (the objectives' normalisers), so neither engine scales it by 1/G.

Checkpoints (the on-disk format resume relies on): DeepSpeed's ``save_checkpoint``
under the tag ``state`` (every rank its partitions; LoRA: trainable parameters only),
or ``ddp_state.pt`` (rank 0: trainable parameters, optimizer, scheduler); beside it
the loop's common state (``save_loop_state``): ``trainer_state.json`` (step, run
name) and ``rng/rank<r>.pt`` (each rank's torch RNG state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("mixray.train")

STATE_FILE = "trainer_state.json"
DS_TAG = "state"
DDP_STATE = "ddp_state.pt"


# ----------------------------------------------------------------------------- worker set-up

def setup_worker(config: dict[str, Any]):
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


def worker_device():
    """This Ray Train worker's device (its GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


# ----------------------------------------------------------------------------- model

def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_model(config: dict[str, Any], ds_config: dict | None):
    """The causal LM (+ LoRA) of ``config``. Under ZeRO-3 it is created partitioned (``zero.Init``).

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
    if config.get("lora"):
        model = _add_lora(model, config)
    return model, hf_ds


def _add_lora(model, config: dict[str, Any]):
    import torch
    from peft import LoraConfig, get_peft_model

    lora = config["lora"]
    if config["gradient_checkpointing"]:
        model.enable_input_require_grads()
    targets = lora["target_modules"]
    torch.manual_seed(config["seed"])  # adapters initialised from the seed alone, on every rank
    return get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM"))


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights (as HF Trainer)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up, then cosine.

    ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, then
    ``0.5 · (1 + cos(π · (step − warmup_steps) / (total_steps − warmup_steps)))``. No step
    runs at lr = 0: the warm-up starts at ``lr / (warmup_steps + 1)`` (Hugging Face's
    ``get_cosine_schedule_with_warmup`` starts at 0, a wasted first step) and the cosine
    reaches 0 only after the last step.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _scheduler(config: dict[str, Any]):
    """``LambdaLR`` of :func:`lr_factor` over ``total_steps`` after ``warmup_steps`` of warm-up."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    factor = partial(lr_factor, warmup_steps=config["warmup_steps"], total_steps=config["total_steps"])
    return lambda opt: LambdaLR(opt, factor)


def make_engine(config: dict[str, Any], device):
    """``DeepSpeedEngine`` when ``config["deepspeed"]`` is set, ``DDPEngine`` otherwise."""
    return DeepSpeedEngine(config, device) if config.get("deepspeed") else DDPEngine(config, device)


# ----------------------------------------------------------------------------- the loop's own state

def save_loop_state(d: Path, rank: int, step: int, run_name: str) -> None:
    """The loop's common checkpoint state: step and run name (rank 0) and every rank's RNG state."""
    import torch

    (d / "rng").mkdir(exist_ok=True)
    torch.save(torch.get_rng_state(), d / "rng" / f"rank{rank}.pt")
    if rank == 0:
        (d / STATE_FILE).write_text(json.dumps({"step": step, "run_name": run_name}))


def checkpoint_run_name(d: Path) -> str | None:
    """The run a checkpoint directory belongs to (None: not a mixray checkpoint)."""
    p = d / STATE_FILE
    return json.loads(p.read_text()).get("run_name") if p.is_file() else None


def load_loop_state(d: Path, rank: int) -> int:
    """Restore this rank's RNG state; returns the step the checkpoint was taken at."""
    import torch

    rng = d / "rng" / f"rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return int(json.loads((d / STATE_FILE).read_text())["step"])


# ----------------------------------------------------------------------------- DeepSpeed

class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 (+ offload); a torch AdamW unless the config names an optimizer."""

    def __init__(self, config: dict[str, Any], device):
        import copy

        import deepspeed
        import torch

        self.config = config
        self.ds_config = copy.deepcopy(config["deepspeed"]["config"])
        self.zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        # join DeepSpeed's comm to the process group Ray Train made (zero.Init reads its world size)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        model, self._hf_ds = build_model(config, self.ds_config)
        groups = param_groups(model, config["weight_decay"])
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

    def backward(self, loss) -> None:
        # the loss is already a token mean over the whole window: no 1/G scaling
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, boundary: bool) -> None:
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float:
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else float("nan")

    def save(self, d: Path, rank: int, step: int, run_name: str) -> None:
        lora = bool(self.config.get("lora"))
        self.engine.save_checkpoint(str(d), tag=DS_TAG, exclude_frozen_parameters=lora)
        save_loop_state(d, rank, step, run_name)

    def load(self, d: Path, rank: int) -> int:
        self.engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=not self.config.get("lora"))
        return load_loop_state(d, rank)

    def gathered_state_dict(self) -> dict | None:
        """Collective (every rank calls it): under ZeRO-3 the full state dict on rank 0, else None."""
        if not self.zero3:
            return None
        lora = bool(self.config.get("lora"))
        return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)

    @contextlib.contextmanager
    def plain_loading(self):
        """``from_pretrained`` inside loads a model whole, not under ZeRO-3's ``zero.Init``."""
        if self._hf_ds is None:
            yield
            return
        from transformers.integrations.deepspeed import (
            set_hf_deepspeed_config,
            unset_hf_deepspeed_config,
        )

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            set_hf_deepspeed_config(self._hf_ds)

    def close(self) -> None:
        """Later ``from_pretrained`` calls in this process load normally (not under ZeRO-3)."""
        if self._hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds = None


# ----------------------------------------------------------------------------- DDP

class DDPEngine:
    """Plain PyTorch DistributedDataParallel (``deepspeed.enabled: false``)."""

    def __init__(self, config: dict[str, Any], device):
        import ray.train.torch
        import torch

        self.config = config
        model, _ = build_model(config, None)
        self._module = model
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.opt = torch.optim.AdamW(param_groups(model, config["weight_decay"]), lr=config["lr"],
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

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, boundary: bool) -> None:
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
                        "scheduler": self.sched.state_dict()}, d / DDP_STATE)
        save_loop_state(d, rank, step, run_name)

    def load(self, d: Path, rank: int) -> int:
        import torch

        state = torch.load(d / DDP_STATE, map_location="cpu", weights_only=True)
        missing = self._module.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unknown parameters: {missing.unexpected_keys[:5]}")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return load_loop_state(d, rank)

    def gathered_state_dict(self) -> None:
        """Every rank holds the whole model: nothing to gather."""
        return None

    def plain_loading(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass
