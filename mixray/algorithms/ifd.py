"""Instruction-following difficulty (IFD), a model-based quality signal.

For an example with instruction x and response y = (y_1..y_n) and a causal LM p:

    L(y|x) = −(1/n) Σ_t log p(y_t | x, y_<t)        (response loss with the instruction)
    L(y)   = −(1/n) Σ_t log p(y_t | y_<t)           (response loss without it)
    IFD    = L(y|x) / L(y)

Low IFD: the instruction makes the response much easier to predict. IFD ≥ 1:
the instruction does not help at all (Li et al., "From Quantity to Quality",
treat these as misaligned). Both losses are over the same n response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def response_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token cross-entropy over the labelled positions.

    ``logits [B, T, V]`` (position t predicts token t+1), ``labels [B, T]`` with
    ``IGNORE_INDEX`` on prompt and padding -> ``[B]``. Naive equivalent::

        for b: mean over t with labels[b, t+1] != -100 of −log_softmax(logits[b, t])[labels[b, t+1]]

    A row without any labelled token gets NaN.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    tok = tok * valid
    n = valid.sum(dim=1)
    out = tok.sum(dim=1) / n.clamp_min(1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def ifd_ratio(loss_with: torch.Tensor, loss_without: torch.Tensor) -> torch.Tensor:
    """``IFD = L(y|x) / L(y)``, elementwise ``[B] -> [B]`` (NaN where L(y) = 0)."""
    return torch.where(loss_without > 0, loss_with / loss_without, torch.full_like(loss_with, float("nan")))


def ifd_quality(ifd: torch.Tensor) -> torch.Tensor:
    """Quality proxy from IFD (higher = better): IFD where IFD < 1, else 0.

    Follows the IFD paper's selection rule (prefer high IFD, discard IFD ≥ 1).
    It is a proxy for a reward model, not a reward model.
    """
    return torch.where(torch.isfinite(ifd) & (ifd < 1), ifd, torch.zeros_like(ifd))
