"""``ntp``: next-token prediction on the response tokens (plain SFT)."""

from __future__ import annotations

from mixray.algorithms.batching import sft_batch
from mixray.algorithms.losses import ntp_loss, token_count
from mixray.training.objectives.base import Objective


class NTPObjective(Objective):
    """Token-mean cross-entropy of the response tokens (``ntp_loss``).

    Micro-batch: ``input_ids, attention_mask, targets [B, T]`` (``sft_batch``);
    normaliser: the window's number of valid targets. Components: ``ntp`` (= the
    loss) and ``mix`` (0; the three SFT losses share one metrics schema).
    """

    name = "ntp"
    columns = ("ids_a", "spans_a")

    def batch(self, shard, rows, lam=None):
        mb = sft_batch([shard["ids_a"][i] for i in rows], [shard["spans_a"][i] for i in rows], self.pad_id)
        mb["tokens"] = int(mb["attention_mask"].sum())
        mb["examples"] = len(rows)
        return mb

    def normalizer_counts(self, mb):
        return float(token_count(mb["targets"])), 0.0

    def step(self, engine, mb, norms):
        logits = engine.forward(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        loss = ntp_loss(logits, mb["targets"], normalizer=norms[0], chunk_rows=self.chunk_rows)
        return loss, {"ntp": loss.detach(), "mix": loss.new_zeros(())}
