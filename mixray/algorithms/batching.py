"""Token sequences -> padded training tensors (right padding, next-token targets).

A training example is ``ids`` (prompt tokens and response tokens) and its
*response*: which tokens the loss covers. A response is given either as

- an int ``n_prompt``: the single-turn case, the response is ``ids[n_prompt:]``; or
- a flat sequence of token spans ``[s_0, e_0, s_1, e_1, ...]``: the response is
  ``ids[s_0:e_0] + ids[s_1:e_1] + ...`` (a multi-turn conversation: one span per
  assistant turn; the user turns and templates between them are not trained on).

Its next-token targets are the response tokens, each placed at the position
that predicts it: ``targets[t] = ids[t+1]`` when position ``t+1`` is inside a
response span, ``IGNORE_INDEX`` elsewhere (prompt, user turns, padding, last
position). Loss is therefore only ever taken on response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixray.algorithms.ifd import IGNORE_INDEX
from mixray.errors import TrainingConfigError

Response = int | Sequence[int]  # n_prompt, or flat spans [s0, e0, s1, e1, ...]


def response_spans(response: Response, length: int) -> list[tuple[int, int]]:
    """A response (``n_prompt`` or flat spans) of a sequence of ``length`` tokens -> ``[(start, end)]``.

    Spans are clipped to the sequence; an empty span is dropped.
    """
    if isinstance(response, int | np.integer):
        flat = [int(response), length]
    else:
        flat = [int(x) for x in response]
    if len(flat) % 2:
        raise ValueError(f"response spans must come in (start, end) pairs, got {flat}")
    spans = [(max(0, s), min(e, length)) for s, e in zip(flat[::2], flat[1::2], strict=True)]
    return [(s, e) for s, e in spans if e > s]


def response_mask(responses: Sequence[Response], lengths: Sequence[int], width: int) -> torch.Tensor:
    """``[B, width]`` bool: True at the token positions inside each row's response spans."""
    mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, (resp, n) in enumerate(zip(responses, lengths, strict=True)):
        for s, e in response_spans(resp, n):
            mask[i, s:e] = True
    return mask


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        if n:
            ids[i, :n] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[i, :n] = 1
    return ids, mask


def _targets(ids: torch.Tensor, mask: torch.Tensor, responses: Sequence[Response]) -> torch.Tensor:
    """``targets[b, t] = ids[b, t+1]`` where token t+1 is a response token, else IGNORE_INDEX."""
    nxt = torch.full_like(ids, IGNORE_INDEX)
    nxt[:, :-1] = ids[:, 1:]
    lengths = mask.sum(1).tolist()
    predicted = torch.zeros_like(mask, dtype=torch.bool)  # position t predicts a response token
    predicted[:, :-1] = response_mask(responses, lengths, ids.shape[1])[:, 1:]
    return torch.where(predicted, nxt, torch.full_like(nxt, IGNORE_INDEX))


def sft_batch(seqs: Sequence[Sequence[int]], responses: Sequence[Response], pad_id: int) -> dict[str, torch.Tensor]:
    """``B`` sequences -> ``input_ids, attention_mask, targets`` each ``[B, T]`` (T = longest).

    ``responses[i]``: row i's response, ``n_prompt`` or flat spans (module docstring).
    """
    width = max((len(s) for s in seqs), default=0)
    ids, mask = _pad(seqs, pad_id, width)
    return {"input_ids": ids, "attention_mask": mask, "targets": _targets(ids, mask, responses)}


def mix_batch(
    seqs_a: Sequence[Sequence[int]],
    responses_a: Sequence[Response],
    seqs_b: Sequence[Sequence[int]],
    responses_b: Sequence[Response],
    lam: Sequence[float],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """MDIT rows -> both sides left-aligned and padded to one ``T``, and ``lam [B]``.

    An original example has an empty ``seqs_b`` row and ``lam = 1``. ``responses_*``
    as in ``sft_batch`` (``n_prompt`` or flat spans). Returns
    ``input_ids_a, attention_mask_a, targets_a, input_ids_b, attention_mask_b,
    targets_b`` (each ``[B, T]``, T = the longest of either side) and ``lam [B]``.
    """
    width = max([len(s) for s in seqs_a] + [len(s) for s in seqs_b] + [0])
    ids_a, mask_a = _pad(seqs_a, pad_id, width)
    ids_b, mask_b = _pad(seqs_b, pad_id, width)
    return {
        "input_ids_a": ids_a, "attention_mask_a": mask_a, "targets_a": _targets(ids_a, mask_a, responses_a),
        "input_ids_b": ids_b, "attention_mask_b": mask_b, "targets_b": _targets(ids_b, mask_b, responses_b),
        "lam": torch.as_tensor(np.asarray(lam, dtype=np.float32)),
    }


def length_sorted_chunks(lengths: Sequence[int], size: int) -> list[np.ndarray]:
    """Row indices in chunks of ``size`` rows, longest rows first: each chunk pads only to its own longest row.

    ``lengths [B]`` (token counts) -> chunks of indices into ``[0, B)``, every index once; ties
    keep input order. Forwarding the chunks one by one costs ``sum_c |c| * max_{i in c} L_i``
    padded tokens, against ``sum_i L_i`` real ones; neighbours in length order keep the two
    close. Callers scatter each chunk's outputs back to its indices.
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[s : s + size] for s in range(0, len(order), size)]


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
