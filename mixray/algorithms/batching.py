"""Token sequences -> padded training tensors (right padding, next-token targets).

A training example is ``ids`` (prompt tokens then response tokens) and
``n_prompt``. Its next-token targets are the response tokens, each placed at
the position that predicts it: ``targets[t] = ids[t+1]`` for
``n_prompt ≤ t+1 < len(ids)``, ``IGNORE_INDEX`` elsewhere (prompt, padding,
last position). Loss is therefore only ever taken on response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixray.algorithms.ifd import IGNORE_INDEX
from mixray.errors import TrainingConfigError


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n:
            ids[i, :n] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[i, :n] = 1
    return ids, mask


def _targets(ids: torch.Tensor, mask: torch.Tensor, n_prompt: Sequence[int]) -> torch.Tensor:
    B, T = ids.shape
    nxt = torch.full_like(ids, IGNORE_INDEX)
    nxt[:, :-1] = ids[:, 1:]
    pos = torch.arange(T)[None, :] + 1  # the position of the token predicted at t
    lengths = mask.sum(1, keepdim=True)
    start = torch.as_tensor(np.asarray(n_prompt, dtype=np.int64))[:, None]
    ok = (pos >= start) & (pos < lengths)
    return torch.where(ok, nxt, torch.full_like(nxt, IGNORE_INDEX))


def sft_batch(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """``B`` sequences -> ``input_ids, attention_mask, targets`` each ``[B, T]`` (T = longest)."""
    width = max((len(s) for s in seqs), default=0)
    ids, mask = _pad(seqs, pad_id, width)
    return {"input_ids": ids, "attention_mask": mask, "targets": _targets(ids, mask, n_prompt)}


def mix_batch(
    seqs_a: Sequence[Sequence[int]],
    n_prompt_a: Sequence[int],
    seqs_b: Sequence[Sequence[int]],
    n_prompt_b: Sequence[int],
    lam: Sequence[float],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """MDIT rows -> both sides left-aligned and padded to one ``T``, and ``lam [B]``.

    An original example has an empty ``seqs_b`` row and ``lam = 1``. Returns
    ``input_ids_a, attention_mask_a, targets_a, input_ids_b, attention_mask_b,
    targets_b`` (each ``[B, T]``, T = the longest of either side) and ``lam [B]``.
    """
    width = max([len(s) for s in seqs_a] + [len(s) for s in seqs_b] + [0])
    ids_a, mask_a = _pad(seqs_a, pad_id, width)
    ids_b, mask_b = _pad(seqs_b, pad_id, width)
    return {
        "input_ids_a": ids_a, "attention_mask_a": mask_a, "targets_a": _targets(ids_a, mask_a, n_prompt_a),
        "input_ids_b": ids_b, "attention_mask_b": mask_b, "targets_b": _targets(ids_b, mask_b, n_prompt_b),
        "lam": torch.as_tensor(np.asarray(lam, dtype=np.float32)),
    }


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Fit ``prompt + response`` into ``max_length`` tokens; returns ``(prompt, response, truncated)``.

    The response keeps at least half the budget (its end is cut); the prompt
    keeps its end (the instruction's last words and the template's response
    header stay next to the response). Every example keeps ≥ 1 response token.
    """
    if max_length < 2:
        raise TrainingConfigError(f"max_length must be >= 2, got {max_length}")
    n = len(prompt) + len(response)
    if n <= max_length:
        return prompt, response, False
    response = response[: max(1, max_length - min(len(prompt), max_length // 2))]
    prompt = prompt[max(0, len(prompt) + len(response) - max_length):]
    return prompt, response, True
