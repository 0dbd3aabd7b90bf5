"""LM-Mixup's GRPO rewards, group advantages and long-tail score (methods.md §4), as pure functions.

All on numpy arrays; embeddings are rows, L2-normalised here where a cosine is meant.

- ``format_reward(output)``: 0.5 if the whole output is ``<think>.*?</think>\\s*<answer>.*?</answer>``
  plus 0.5 if the answer matches the task pattern (``Q:.*A:`` for QA).
- ``alignment_reward(a [B, d], ref [B, d])``: ``1`` if ``cos(a_b, ref_b) ≥ 0.8`` else ``0``.
- ``KnnBayesRater``: the quality reward. For a query, ``h [C]`` = class histogram of its
  ``k = 16`` nearest rated library items (cosine); the class-transition matrix ``T [C, C]``
  counts, for every library item of class i, the classes j of its own ``k_t`` nearest
  other items, smoothed by ``1e-2`` and row-normalised; the prior ``p [C]`` is the class
  frequency. Posterior ``π ∝ exp(log p_i + Σ_j h_j · log T[i, j])``; the reward is 1 if the
  expected class ``Σ_i i · π_i ≥ 4`` else 0.
- ``group_advantages(R [N, K], w [K], G, mode)``: rows in groups of G consecutive samples
  of one prompt. ``sum_then_normalize`` (default, the authors'): ``r = R·w``,
  ``A = (r − mean_g r) / (std_g r + ε)``. ``normalize_then_sum``: each reward is z-scored
  within its group, the weighted sum ``s`` is z-scored over the batch. ``std`` is the
  sample standard deviation (ddof 1) and ``ε = 1e-4``, as TRL's ``GRPOTrainer`` computes them.
- ``long_tail_scores(E [N, d], k = 15)``: mean cosine distance ``1 − cos`` to the k nearest
  other rows, min-max normalised to [0, 1] (higher = rarer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mixray.algorithms.lmmixup import LOW_QUALITY_BELOW, N_CLASSES, THINK_ANSWER, answer_text
from mixray.choices import LMMIXUP_AGGREGATIONS as AGGREGATIONS
from mixray.errors import InputError

TASK_PATTERNS = {"qa": re.compile(r"Q:.*A:", re.DOTALL)}  # keys: mixray.choices.LMMIXUP_TASKS
REWARDS = ("quality", "alignment", "format")  # the order of weights and of R's columns
DEFAULT_WEIGHTS = (0.5, 0.4, 0.1)
ADV_EPS = 1e-4


def format_reward(output: str, task: str = "qa") -> float:
    """0.5 · [whole output is think-then-answer] + 0.5 · [the answer matches the task pattern]."""
    text = (output or "").strip()
    whole = THINK_ANSWER.fullmatch(text) is not None
    ans = answer_text(text)
    return 0.5 * whole + 0.5 * (ans is not None and TASK_PATTERNS[task].search(ans) is not None)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): ``[n, d] -> [n, d]`` float64."""
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / np.where(n > 0, n, 1.0)


def alignment_reward(answer: np.ndarray, reference: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """``[B, d], [B, d] -> [B]``: 1.0 where ``cos(answer_b, reference_b) ≥ threshold``, else 0.0."""
    cos = np.einsum("bd,bd->b", unit_rows(answer), unit_rows(reference))
    return (cos >= threshold).astype(np.float64)


def nearest(query: np.ndarray, library: np.ndarray, k: int, exclude_self: bool = False,
            block: int = 4096) -> np.ndarray:
    """Indices ``[B, k]`` of the ``k`` most cosine-similar library rows (best first; ties: lower index).

    ``exclude_self``: the query *is* the library (row b never counts as its own neighbour).
    """
    Q, L = unit_rows(query), unit_rows(library)
    k = min(k, L.shape[0] - int(exclude_self))
    if k < 1:
        raise InputError(f"a library of {L.shape[0]} item(s) has no neighbours to use")
    out = np.empty((Q.shape[0], k), dtype=np.int64)
    for s in range(0, Q.shape[0], block):
        S = Q[s : s + block] @ L.T
        if exclude_self:
            S[np.arange(S.shape[0]), np.arange(s, s + S.shape[0])] = -np.inf
        out[s : s + block] = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return out


def class_histograms(neighbours: np.ndarray, classes: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """``[B, k]`` neighbour indices -> ``[B, C]`` counts of their classes."""
    c = np.asarray(classes, dtype=np.int64)[neighbours]
    return np.stack([np.bincount(row, minlength=n_classes) for row in c]).astype(np.float64)


def transition_matrix(library: np.ndarray, classes: np.ndarray, k_t: int = 16,
                      n_classes: int = N_CLASSES, smoothing: float = 1e-2) -> np.ndarray:
    """``T [C, C]``: row i = classes of the ``k_t`` nearest other items of every class-i item,
    ``+ smoothing``, row-normalised."""
    classes = np.asarray(classes, dtype=np.int64)
    h = class_histograms(nearest(library, library, k_t, exclude_self=True), classes, n_classes)
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, classes, h)
    counts += smoothing
    return counts / counts.sum(axis=1, keepdims=True)


def class_posterior(hist: np.ndarray, prior: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``π [B, C] ∝ exp(log p_i + Σ_j h_j · log T[i, j])`` (a softmax over i)."""
    logits = np.log(np.asarray(prior, np.float64))[None, :] + np.asarray(hist, np.float64) @ np.log(T).T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


class KnnBayesRater:
    """The quality reward over a rated embedding library ``[L, d]`` with classes ``[L]`` in 0..C-1.

    ``T`` and the prior are computed once here (or passed, e.g. loaded from a file);
    ``expected_class(Q [B, d]) -> [B]`` and ``reward(Q) -> [B]`` (1 if ≥ ``good_class``).
    """

    def __init__(self, library: np.ndarray, classes: np.ndarray, k: int = 16, k_t: int = 16,
                 smoothing: float = 1e-2, n_classes: int = N_CLASSES, good_class: int = LOW_QUALITY_BELOW,
                 T: np.ndarray | None = None):
        self.library = unit_rows(library)
        self.classes = np.asarray(classes, dtype=np.int64)
        if self.library.shape[0] != len(self.classes) or len(self.classes) < 2:
            raise InputError(f"the rated library needs >= 2 items and one class per item, got "
                             f"{self.library.shape[0]} embeddings and {len(self.classes)} classes")
        if self.classes.min() < 0 or self.classes.max() >= n_classes:
            raise InputError(f"library classes must be in 0..{n_classes - 1}")
        self.k, self.n_classes, self.good_class = k, n_classes, good_class
        self.prior = (np.bincount(self.classes, minlength=n_classes) + smoothing) / (
            len(self.classes) + n_classes * smoothing)
        self.T = transition_matrix(self.library, self.classes, k_t, n_classes, smoothing) if T is None \
            else np.asarray(T, np.float64)

    def posterior(self, query: np.ndarray) -> np.ndarray:
        h = class_histograms(nearest(query, self.library, self.k), self.classes, self.n_classes)
        return class_posterior(h, self.prior, self.T)

    def expected_class(self, query: np.ndarray) -> np.ndarray:
        return self.posterior(query) @ np.arange(self.n_classes, dtype=np.float64)

    def reward(self, query: np.ndarray) -> np.ndarray:
        return (self.expected_class(query) >= self.good_class).astype(np.float64)


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1 (methods.md: 0.5 / 0.4 / 0.1)."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise InputError(f"reward weights must be >= 0 with a positive sum, got {list(weights)}")
    return w / w.sum()


def _std(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    n = x.size if axis is None else x.shape[axis]
    return np.std(x, axis=axis, keepdims=keepdims, ddof=1) if n > 1 else np.zeros_like(
        np.mean(x, axis=axis, keepdims=keepdims))


def group_advantages(rewards: np.ndarray, weights: Sequence[float], group_size: int,
                     mode: str = "sum_then_normalize", eps: float = ADV_EPS) -> np.ndarray:
    """GRPO advantages ``[N]`` of rewards ``[N, K]`` (rows: groups of ``group_size`` consecutive
    samples of one prompt), under ``mode`` (see the module docstring)."""
    R = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] != len(w) or R.shape[0] % group_size:
        raise InputError(f"rewards {R.shape} must be [N, {len(w)}] with N a multiple of G={group_size}")
    grouped = R.reshape(-1, group_size, R.shape[1])
    if mode == "sum_then_normalize":
        r = grouped @ w  # [P, G]
        adv = (r - r.mean(axis=1, keepdims=True)) / (_std(r, axis=1, keepdims=True) + eps)
        return adv.reshape(-1)
    if mode == "normalize_then_sum":
        z = (grouped - grouped.mean(axis=1, keepdims=True)) / (_std(grouped, axis=1, keepdims=True) + eps)
        s = (z @ w).reshape(-1)
        return (s - s.mean()) / (_std(s) + eps)
    raise InputError(f"aggregation {mode!r}; allowed: {', '.join(AGGREGATIONS)}")


def minmax(x: np.ndarray) -> np.ndarray:
    """``(x − min) / (max − min)``; a constant array maps to zeros."""
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return x
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def long_tail_scores(embeddings: np.ndarray, k: int = 15) -> np.ndarray:
    """Mean cosine distance of each row to its ``k`` nearest other rows, min-max normalised ``[N]``.

    With fewer than ``k + 1`` rows every other row is a neighbour; one row scores 0.
    """
    E = unit_rows(embeddings)
    if E.shape[0] < 2:
        return np.zeros(E.shape[0])
    nb = nearest(E, E, k, exclude_self=True)
    cos = np.einsum("nd,nkd->nk", E, E[nb])
    return minmax((1.0 - cos).mean(axis=1))
