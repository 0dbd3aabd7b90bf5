"""distill_sft (LM-Mixup 3): supervised fine-tuning of the distiller on the mixture pairs.

The train stage's machinery (``mixray.stages.train``: ``plan_job``, ``resolve_job``,
``tokenize_rows``, the training package's loop on Ray Train + DeepSpeed) on other rows:
each pair is the system turn (``SYSTEM_PROMPT``), the user turn (the cluster) and the
target ``<think>…</think><answer>Q: … A: …</answer>``; the loss (``ntp``) covers the
target only (the prompt is masked). Settings: ``lmmixup.sft`` (a ``train`` section;
the authors: full fine-tuning, lr 2e-5, 3 epochs, warm-up 0.05).

Outputs under ``<run_dir>/distill_sft/``: ``model/`` (Hugging Face format), ``metrics.csv``,
``loss.png``, ``rows.parquet`` (+ ``merged/`` for LoRA with ``merge``), as ``train/``.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from mixray.contracts import MIXTURE_PAIRS, SFT_MERGED, SFT_METRICS, SFT_MODEL, SFT_PLOT, SFT_ROWS
from mixray.io.rundir import output_hash
from mixray.stages.train import Train, plan_job, sft_rows


class DistillSFT(Train):
    """``distill_sft``: the mixture pairs -> the SFT distiller (Ray Train + DeepSpeed, prompt masked)."""

    name = "distill_sft"
    requires = (MIXTURE_PAIRS,)
    model_out, merged_out, metrics_out, plot_out, rows_out = (
        SFT_MODEL, SFT_MERGED, SFT_METRICS, SFT_PLOT, SFT_ROWS)
    outputs = (SFT_MODEL, SFT_MERGED, SFT_METRICS, SFT_PLOT, SFT_ROWS)

    config_path = "lmmixup.sft"  # its settings: cfg.lmmixup.sft

    def check(self) -> None:
        from mixray.algorithms.lmmixup import SYSTEM_PROMPT

        self.run_dir, self.stage_dir = self.run_dir.resolve(), self.stage_dir.resolve()
        inputs = {"pairs": output_hash(self.run_dir / MIXTURE_PAIRS.stage, MIXTURE_PAIRS.name)}
        t = pq.read_table(MIXTURE_PAIRS.path(self.run_dir), columns=["id", "prompt", "target"])
        table = sft_rows(t.column("id").to_pylist(), t.column("prompt").to_pylist(),
                         t.column("target").to_pylist(), system=SYSTEM_PROMPT)
        counts = {"source": "mixture", "rows": table.num_rows, "originals": table.num_rows, "mixes": 0}
        self.job = plan_job(self.section, self.run_dir, self.cfg.seed, rows=(table, inputs, counts),
                            setting="lmmixup.sft")
