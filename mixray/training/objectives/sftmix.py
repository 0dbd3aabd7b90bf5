"""``sftmix``: NTP + μ·Mixup of the LM-head logits of confident/unconfident pairs (SFTMix)."""

from __future__ import annotations

import torch

from mixray.algorithms.batching import sft_batch
from mixray.algorithms.losses import sftmix_loss, sftmix_pair_positions, token_count
from mixray.training.objectives.base import Objective


class SFTMixObjective(Objective):
    """One forward over b confident + b unconfident examples; ``sftmix_loss`` of the pairs.

    Micro-batch (``paired``): rows ``0..b-1`` confident, ``b..2b-1`` unconfident, row
    i paired with row b+i, ``lam [b]`` ~ Beta(α, α). Normalisers: the window's NTP
    token count and its Mixup position count ``Σ_i N'_i`` (``N'_i = min(N^c_i, N^u_i)``);
    ``sftmix_normalizer`` (loop config, default ``shared``) divides both terms by the
    NTP count (the paper's eq. 5 times a constant), ``separate`` each by its own.
    Components: ``ntp`` and ``mix`` (loss = ntp + μ·mix, under either normaliser).
    """

    name = "sftmix"
    columns = ("ids_a", "spans_a")
    paired = True

    def __init__(self, config):
        super().__init__(config)
        self.mu = float(config["sftmix_mu"])
        self.normalization = config.get("sftmix_normalizer", "shared")

    def batch(self, shard, rows, lam=None):
        mb = sft_batch([shard["ids_a"][i] for i in rows], [shard["spans_a"][i] for i in rows], self.pad_id)
        b = len(rows) // 2
        mb["conf_rows"], mb["unconf_rows"] = torch.arange(b), torch.arange(b, 2 * b)
        mb["lam"] = torch.as_tensor(lam, dtype=torch.float32)
        mb["tokens"] = int(mb["attention_mask"].sum())
        mb["examples"] = len(rows)
        return mb

    def normalizer_counts(self, mb):
        pairs = sftmix_pair_positions(mb["targets"], mb["conf_rows"], mb["unconf_rows"])[0]
        return float(token_count(mb["targets"])), float(pairs.numel())

    def step(self, engine, mb, norms):
        logits = engine.forward(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        total, ntp, mix = sftmix_loss(logits, mb["targets"], mb["conf_rows"], mb["unconf_rows"], mb["lam"],
                                      mu=self.mu, ntp_normalizer=norms[0], mix_normalizer=norms[1],
                                      chunk_rows=self.chunk_rows, normalization=self.normalization)
        return total, {"ntp": ntp.detach(), "mix": mix.detach()}
