"""Pooling of token vectors into one vector per example."""

from __future__ import annotations

import torch


def mean_pool(token_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the valid token vectors of each row.

    ``token_vectors [B, T, d]``, ``mask [B, T]`` (1 = token, 0 = padding) -> ``[B, d]``:
    ``out[b] = Σ_t mask[b,t]·x[b,t] / max(1, Σ_t mask[b,t])``. This is MDIT's
    per-sample vector when ``x`` is the embedding layer's output.
    """
    m = mask.to(token_vectors.dtype).unsqueeze(-1)
    return (token_vectors * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last valid token (right padding).

    ``hidden [B, T, d]``, ``mask [B, T]`` -> ``[B, d]``: ``hidden[b, Σ_t mask[b,t] − 1]``.
    """
    idx = mask.long().sum(dim=1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm: ``x / max(‖x‖₂, eps)``; ``[N, d] -> [N, d]``."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
