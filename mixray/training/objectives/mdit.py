"""``mdit``: MDIT's mix at the input-embedding layer with mixed-target cross-entropy."""

from __future__ import annotations

import torch

from mixray.algorithms.batching import mix_batch
from mixray.algorithms.losses import mdit_loss, mix_embeddings, mixup_target_mass
from mixray.training.objectives.base import Objective


class MDITObjective(Objective):
    """Originals and mixes; ``H = λ·E(x_a) + (1−λ)·E(x_b)`` fed as ``inputs_embeds``, ``mdit_loss``.

    Micro-batch: both sides left-aligned and padded to one T (``mix_batch``),
    ``lam [B]`` (1 for an original, whose b side is empty), ``is_mix [B]``.
    Normaliser: the window's soft-target mass ``Σ λ·N_a + (1−λ)·N_b``.
    Components: ``ntp`` (the originals' share) and ``mix`` (the mixes'); loss = ntp + mix.
    """

    name = "mdit"
    columns = ("ids_a", "spans_a", "ids_b", "spans_b", "lam", "is_mix")

    def batch(self, shard, rows, lam=None):
        mb = mix_batch([shard["ids_a"][i] for i in rows], [shard["spans_a"][i] for i in rows],
                       [shard["ids_b"][i] for i in rows], [shard["spans_b"][i] for i in rows],
                       [shard["lam"][i] for i in rows], self.pad_id)
        mb["is_mix"] = torch.tensor([bool(shard["is_mix"][i]) for i in rows])
        mb["tokens"] = int((mb["attention_mask_a"].bool() | mb["attention_mask_b"].bool()).sum())
        mb["examples"] = len(rows)
        return mb

    def normalizer_counts(self, mb):
        return float(mixup_target_mass(mb["targets_a"], mb["targets_b"], mb["lam"].double())), 0.0

    def step(self, engine, mb, norms):
        """Embed both sides with the model's own input embeddings, mix, forward ``inputs_embeds``."""
        B = mb["input_ids_a"].shape[0]
        emb = engine.input_embeddings()(torch.cat([mb["input_ids_a"], mb["input_ids_b"]]))
        h, mask = mix_embeddings(emb[:B], mb["attention_mask_a"], emb[B:], mb["attention_mask_b"], mb["lam"])
        logits = engine.forward(inputs_embeds=h, attention_mask=mask).logits
        total, orig, mix = mdit_loss(logits, mb["targets_a"], mb["targets_b"], mb["lam"], mb["is_mix"],
                                     normalizer=norms[0], chunk_rows=self.chunk_rows)
        return total, {"ntp": orig.detach(), "mix": mix.detach()}
