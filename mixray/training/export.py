"""Hugging Face export of a training engine's model, at any step, to any directory.

``export(engine, out_dir, rank)`` is called on **every rank** (under ZeRO-3 the
ranks gather the partitioned weights together; rank 0 receives them) and writes,
from rank 0:

    out_dir/      the model (``model.safetensors`` + ``config.json``), or the LoRA adapter
                  (``adapter_model.safetensors`` + ``adapter_config.json``, whose
                  ``base_model_name_or_path`` is the model trained from), + the tokenizer
    merged_dir/   (optional, LoRA only) the adapter merged into the base weights

Each directory appears whole or not at all: it is written as ``<name>.partial``
and renamed over any earlier one. ``AutoModelForCausalLM.from_pretrained`` loads
either kind (for an adapter it loads the base model and applies the adapter).
Training may continue after an export: the loop exports at the optimizer steps
of ``export_steps`` (SFTMix's training dynamics keep C checkpoints of one run)
and once at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("mixray.train")


def export(engine, out_dir: str | Path, rank: int, *, merged_dir: str | Path | None = None) -> None:
    """Collective: every rank calls it; rank 0 writes ``out_dir`` (and ``merged_dir`` for LoRA)."""
    import torch.distributed as dist

    state_dict = engine.gathered_state_dict()  # ZeRO-3: all ranks take part in the gather
    if rank == 0:
        c = engine.config
        with engine.plain_loading():  # the merge's from_pretrained must not partition the base model
            export_hf(engine.module, out_dir, model_path=c["model_path"],
                      trust_remote_code=c["trust_remote_code"], state_dict=state_dict,
                      merged_dir=merged_dir if c.get("lora") else None)
    dist.barrier()


def export_hf(module, out_dir: str | Path, *, model_path: str, trust_remote_code: bool = False,
              state_dict: dict[str, Any] | None = None, merged_dir: str | Path | None = None) -> None:
    """One process: ``module`` (a model or a peft model) + the tokenizer of ``model_path`` to ``out_dir``.

    ``state_dict``: the weights to write instead of the module's own (ZeRO-3's
    gathered ones). ``merged_dir``: also write the adapter merged into the base
    model of ``model_path`` (peft models only).
    """
    from mixray.models.sft import load_tokenizer

    out = Path(out_dir)
    tok = load_tokenizer(model_path, trust_remote_code)

    def write(tmp: Path) -> None:
        if state_dict is not None:
            module.save_pretrained(tmp, state_dict=state_dict)
        else:
            module.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _replace_dir(out, write)
    if merged_dir:
        merged = merge_adapter(out, model_path, trust_remote_code)
        _replace_dir(Path(merged_dir), lambda tmp: (merged.save_pretrained(tmp), tok.save_pretrained(tmp)))
    log.info("train: exported %s%s", out, " (+ merged weights)" if merged_dir else "")


def merge_adapter(adapter_dir: str | Path, model_path: str, trust_remote_code: bool = False):
    """The base model of ``model_path`` (float32) with the LoRA adapter of ``adapter_dir`` merged in."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _replace_dir(out: Path, write) -> None:
    """``write(tmp)`` into ``<out>.partial``, then put it in place of ``out`` (created if missing)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
