"""Evaluation metrics and the contamination test, as pure functions (no model, no Ray, no I/O).

The evaluate stage turns a model's outputs into scores with these:

- held-out response loss: per example the summed negative log-likelihood of the response
  tokens ``nll_i = −Σ_t log p(y_t | x, y_<t)`` over ``n_i`` tokens; the split's loss is the
  token mean ``L = Σ_i nll_i / Σ_i n_i`` and its perplexity ``exp(L)`` (:func:`perplexity`);
- GSM8K exact match: the number a completion gives as its answer (after ``####``, else after
  "the answer is", else the last number) equals the number after ``####`` in the reference
  (:func:`gsm8k_answer`, :func:`numbers_match`);
- multiple choice by option log-likelihood: the predicted option is ``argmax_j ll_j`` with
  ``ll_j = Σ_t log p(o_jt | context, o_j,<t)`` (``acc``), or ``argmax_j ll_j / chars(o_j)``
  (``acc_norm``, lm-evaluation-harness's length normalisation) (:func:`choose_option`);
- contamination: an evaluation text matches the training pool exactly after
  :func:`normalize_text`, or its embedding's cosine to some pool embedding is at least a
  threshold (:func:`max_cosine`).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch

_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
_CALC = re.compile(r"<<[^>]*>>")


def perplexity(nll_sums: Sequence[float], tokens: Sequence[int]) -> tuple[float, float]:
    """``(L, exp(L))`` with ``L = Σ nll_i / Σ n_i``, the token-mean loss over examples.

    ``nll_sums [N]`` summed response NLL per example (nats), ``tokens [N]`` response tokens each.
    """
    n = float(np.sum(np.asarray(tokens, dtype=np.float64)))
    if n <= 0:
        return math.nan, math.nan
    loss = float(np.sum(np.asarray(nll_sums, dtype=np.float64))) / n
    return loss, math.exp(loss)


def _number(text: str) -> str | None:
    """A number as text, without thousands separators, ``$`` or a trailing ``.``; ``"18.0" -> "18"``."""
    t = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution or completion, as a canonical number (or None).

    The number after the first ``####``; else the number after the last "the answer is";
    else the last number in the text.
    """
    if "####" in text:
        found = _NUMBER.findall(text.split("####", 1)[1])
        return _number(found[0]) if found else None
    m = list(re.finditer(r"answer is", text, flags=re.IGNORECASE))
    if m:
        found = _NUMBER.findall(text[m[-1].end():])
        if found:
            return _number(found[0])
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def numbers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact match of two canonical numbers (a missing prediction never matches)."""
    return predicted is not None and reference is not None and predicted == reference


def gsm8k_solution(answer: str) -> str:
    """A GSM8K reference answer as a few-shot exemplar: calculator annotations ``<<..>>`` removed."""
    return _CALC.sub("", answer).strip()


def gsm8k_prompt(question: str, shots: Sequence[tuple[str, str]]) -> str:
    """``Question: q\\nAnswer: a\\n\\n`` per exemplar, then ``Question: <question>\\nAnswer:``."""
    parts = [f"Question: {q.strip()}\nAnswer: {gsm8k_solution(a)}\n\n" for q, a in shots]
    return "".join(parts) + f"Question: {question.strip()}\nAnswer:"


def choose_option(logliks: Sequence[float], option_chars: Sequence[int]) -> tuple[int, int]:
    """``(argmax_j ll_j, argmax_j ll_j / chars_j)``: the raw and the length-normalised choice.

    ``logliks [J]`` summed log-probabilities of each option's tokens; ``option_chars [J]`` the
    options' lengths in characters (at least 1). Ties go to the first option (``np.argmax``).
    """
    ll = np.asarray(logliks, dtype=np.float64)
    chars = np.maximum(np.asarray(option_chars, dtype=np.float64), 1.0)
    return int(np.argmax(ll)), int(np.argmax(ll / chars))


def question_text(query: str) -> str:
    """The question of an lm-eval style query (``Question: ...\\nAnswer:`` -> ``...``)."""
    text = re.sub(r"^\s*Question:\s*", "", query)
    return re.sub(r"\s*Answer:\s*$", "", text)


def normalize_text(text: str) -> str:
    """Text for the exact-match contamination test: NFKC, lower case, punctuation -> spaces,
    whitespace runs -> one space, stripped."""
    t = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT)
    return " ".join(t.split())


def max_cosine(queries: np.ndarray, keys: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the largest cosine similarity to any key and that key's index.

    ``queries [Q, d]``, ``keys [N, d]`` (any norms; zero vectors have cosine 0) ->
    ``(best [Q] float32, index [Q] int64)``, computed over key blocks of ``block`` rows so
    memory stays ``O(Q·block)``. Naive equivalent: ``(normalize(Q) @ normalize(K).T).max(1)``.
    """
    q = torch.nn.functional.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    k = keys if isinstance(keys, torch.Tensor) else np.asarray(keys)
    best = torch.full((q.shape[0],), -math.inf)
    index = torch.full((q.shape[0],), -1, dtype=torch.long)
    for s in range(0, k.shape[0], block):
        kb = k[s : s + block]  # a copied block: keys read from Parquet are read-only arrays
        kb = kb.float() if isinstance(kb, torch.Tensor) else torch.from_numpy(np.array(kb, dtype=np.float32))
        sims = q @ torch.nn.functional.normalize(kb, dim=1).T
        value, at = sims.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, at + s, index)
    return best.numpy(), index.numpy()


def judge_verdict(logp_first: Sequence[float], logp_second: Sequence[float]) -> np.ndarray:
    """Pairwise preference from a judge's log-probabilities of the two verdict letters.

    Each item is judged twice, answers swapped, to cancel the judge's position bias:
    ``logp_first [N, 2]`` holds (log p("A"), log p("B")) with the candidate as A,
    ``logp_second [N, 2]`` with the candidate as B. Returns ``[N]`` in {0, 0.5, 1}: the share of
    the two orders in which the candidate's letter is the likelier one.
    """
    a = np.asarray(logp_first, dtype=np.float64)
    b = np.asarray(logp_second, dtype=np.float64)
    return ((a[:, 0] > a[:, 1]).astype(np.float64) + (b[:, 1] > b[:, 0]).astype(np.float64)) / 2


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (generation runs past them in a batch)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probability of the target tokens, their number, and whether each is the argmax.

    ``logits [B, T, V]`` and ``targets [B, T]`` aligned as ``mixray.algorithms.batching.sft_batch``
    builds them (``targets[b, t]`` is the token predicted at position t; ``IGNORE_INDEX`` on the
    context and padding) -> ``(sum [B] float64, count [B] int64, greedy [B] bool)``. Only the
    ``M`` target positions are normalised (``[M, V]``, not ``[B, T, V]``). Naive::

        for b: Σ_t log_softmax(logits[b, t])[targets[b, t]] over t with targets[b, t] != -100
    """
    from mixray.algorithms.ifd import IGNORE_INDEX

    valid = targets != IGNORE_INDEX
    rows, cols = valid.nonzero(as_tuple=True)
    picked = logits[rows, cols].float()  # [M, V]
    want = targets[rows, cols]
    lp = torch.log_softmax(picked, dim=-1).gather(-1, want[:, None]).squeeze(-1).double()
    sums = torch.zeros(targets.shape[0], dtype=torch.float64, device=logits.device).index_add_(0, rows, lp)
    greedy = torch.ones(targets.shape[0], dtype=torch.bool, device=logits.device)
    greedy[rows[picked.argmax(-1) != want]] = False
    return sums, valid.sum(1), greedy
