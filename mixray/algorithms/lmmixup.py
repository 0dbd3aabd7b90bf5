"""LM-Mixup (methods.md §4): quality classes, capacity-constrained clusters, the one prompt
template, output parsing, and the rule-based degradation that builds distiller training pairs.

Pure functions on numpy arrays and strings (no Ray, no files). The rewards, group
advantages and the long-tail score are in ``mixray.algorithms.lmmixup_rewards``.

- Quality classes 0–5: ``quality_classes(scores, method)`` — quantiles of any score
  (default: six equal-count classes), five ascending thresholds, or the authors' LLM
  rating 1–10 compressed as ``min(9, max(4, v)) − 4``. Class < 4 is *low quality*.
- Capacity-constrained clusters (``CapacityKMeans``): capacities ``round(N(mean, std))``
  clipped to ``[min_size, max_size]`` are drawn until they sum to N (k = their count),
  KMeans with k centres on the L2-normalised points, then points are visited in
  descending order of their best cosine to a centre and each goes to the most similar
  centre that still has room. The draw's remainder is folded into the capacities
  (``draw_capacities``), so every capacity is in ``[min_size, max_size]``, every
  centre is filled exactly to its capacity, and the authors' last step (merge clusters
  smaller than ``min_size`` into their nearest) has nothing left to merge.
- Prompt: ``distill_messages(members)`` → ``[system, user]`` chat messages; the user turn is
  ``MERGE_INSTRUCTION`` then the members as ``"Q: {instruction}\\n A: {response}"`` joined
  by blank lines. The target/answer format is ``<think>…</think><answer>Q: … A: …</answer>``.
- ``parse_output(text)`` → ``(question, answer)`` or the reason it is malformed.
- ``degrade(text, kind, rng)`` and ``degraded_members``: truncation, dropped sentences,
  typos and near-duplicate rewrites of a high-quality pair, 2–5 per target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixray.choices import LMMIXUP_CLASS_METHODS as CLASS_METHODS
from mixray.choices import LMMIXUP_DEGRADATIONS as DEGRADATIONS
from mixray.errors import ClusteringInputError, InputError

N_CLASSES = 6  # quality classes 0..5
LOW_QUALITY_BELOW = 4  # class < 4 is low quality (the authors' cut)

# ----------------------------------------------------------------------------- quality classes


def compress_rating(rating: np.ndarray) -> np.ndarray:
    """The authors' map of an LLM rating 1–10 to a class 0–5: ``min(9, max(4, round(v))) − 4``."""
    v = np.rint(np.asarray(rating, dtype=np.float64))
    return (np.clip(v, 4, 9) - 4).astype(np.int64)


def quality_classes(scores: np.ndarray, method: str = "quantiles",
                    cuts: Sequence[float] | None = None) -> np.ndarray:
    """Quality classes ``[N] int64`` in 0..5 from any score ``[N]`` (higher is better).

    ``quantiles``: the cut points are the scores' quantiles at ``cuts`` (five ascending
    levels in (0, 1); default ``1/6 … 5/6``: six equal-count classes); ``thresholds``:
    ``cuts`` are five ascending score values; ``rating``: ``compress_rating``. A score
    equal to a cut point goes to the upper class (``class = #{cuts ≤ score}``).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise InputError("quality scores must be a 1-d array of finite numbers")
    if method == "rating":
        return compress_rating(s)
    if method not in CLASS_METHODS:
        raise InputError(f"class method {method!r}; allowed: {', '.join(CLASS_METHODS)}")
    if method == "quantiles":
        levels = np.arange(1, N_CLASSES) / N_CLASSES if cuts is None else np.asarray(cuts, float)
        if len(levels) != N_CLASSES - 1 or (levels <= 0).any() or (levels >= 1).any():
            raise InputError(f"quantile levels must be {N_CLASSES - 1} numbers in (0, 1), got {cuts}")
        points = np.quantile(s, np.sort(levels)) if len(s) else np.zeros(N_CLASSES - 1)
    else:
        if cuts is None or len(cuts) != N_CLASSES - 1:
            raise InputError(f"thresholds must be {N_CLASSES - 1} ascending numbers, got {cuts}")
        points = np.asarray(cuts, dtype=np.float64)
    if (np.diff(points) < 0).any():
        raise InputError(f"cut points must be ascending, got {list(points)}")
    return np.searchsorted(points, s, side="right").astype(np.int64)


# ----------------------------------------------------------------------------- capacity-constrained clusters


def _check_sizes(n: int, min_size: int, max_size: int) -> None:
    if not 1 <= min_size <= max_size:
        raise ClusteringInputError(f"cluster sizes need 1 <= min_size <= max_size, got "
                                   f"min_size={min_size}, max_size={max_size}")
    if n < min_size:
        raise ClusteringInputError(f"{n} point(s) cannot make a cluster of at least min_size={min_size}")


def draw_capacities(n: int, rng: np.random.Generator, mean: float = 3.0, std: float = 1.0,
                    min_size: int = 2, max_size: int = 5) -> np.ndarray:
    """Capacities ``[k] int64`` in ``[min_size, max_size]`` that sum to ``n``.

    Draw ``round(N(mean, std))`` clipped to the bounds until the sum reaches ``n``; the
    last one is cut to the remainder ``r``. If ``r < min_size``, units move to it from
    capacities above ``min_size`` (largest first); if none is left, the remainder's units
    go one by one to capacities below ``max_size``.
    """
    _check_sizes(n, min_size, max_size)
    caps: list[int] = []
    while sum(caps) < n:
        caps.append(int(np.clip(np.rint(rng.normal(mean, std)), min_size, max_size)))
    caps[-1] -= sum(caps) - n
    need = min_size - caps[-1]
    for i in sorted(range(len(caps) - 1), key=lambda j: -caps[j]):
        if need <= 0:
            break
        take = min(caps[i] - min_size, need)
        caps[i] -= take
        caps[-1] += take
        need -= take
    if need > 0:  # every other capacity is at min_size: spread the remainder over them
        rest = caps.pop()
        for i in range(len(caps)):
            give = min(max_size - caps[i], rest)
            caps[i] += give
            rest -= give
        if rest:
            raise ClusteringInputError(f"{n} points cannot be cut into clusters of "
                                       f"{min_size}..{max_size} points")
    return np.asarray(caps, dtype=np.int64)


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _top_centres(X: np.ndarray, C: np.ndarray, top: int, block: int = 8192):
    """Per point, its ``top`` most similar centres (by cosine), best first: ``(idx, sim) [n, top]``."""
    top = min(top, C.shape[0])
    idx = np.empty((X.shape[0], top), dtype=np.int64)
    sim = np.empty((X.shape[0], top), dtype=np.float64)
    for s in range(0, X.shape[0], block):
        S = X[s : s + block] @ C.T
        part = np.argpartition(-S, top - 1, axis=1)[:, :top] if top < C.shape[0] else \
            np.tile(np.arange(C.shape[0]), (S.shape[0], 1))
        ps = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[s : s + block] = np.take_along_axis(part, order, axis=1)
        sim[s : s + block] = np.take_along_axis(ps, order, axis=1)
    return idx, sim


def capacity_assign(X: np.ndarray, centres: np.ndarray, capacities: np.ndarray,
                    top: int = 8) -> np.ndarray:
    """Greedy capacity-constrained assignment ``labels [n]`` of points ``X [n, d]`` to ``centres [k, d]``.

    Cosine similarity (rows are normalised here). Points are visited in descending order
    of their best similarity (ties: lower index first); each takes the most similar centre
    with room left. Only each point's ``top`` best centres are kept; a point whose ``top``
    are all full gets its full row. Requires ``Σ capacities ≥ n``.
    """
    X, C = _unit(np.asarray(X, np.float64)), _unit(np.asarray(centres, np.float64))
    room = np.asarray(capacities, dtype=np.int64).copy()
    if room.shape != (C.shape[0],) or room.sum() < X.shape[0]:
        raise ClusteringInputError(f"capacities {room.shape} must give one per centre "
                                   f"({C.shape[0]}) and sum to at least n={X.shape[0]}")
    idx, sim = _top_centres(X, C, top)
    labels = np.full(X.shape[0], -1, dtype=np.int64)
    for i in np.argsort(-sim[:, 0], kind="stable"):
        free = [j for j in idx[i] if room[j] > 0]
        if free:
            j = free[0]
        else:
            row = C @ X[i]
            row[room <= 0] = -np.inf
            j = int(np.argmax(row))
        labels[i] = j
        room[j] -= 1
    return labels


@dataclass
class CapacityKMeans:
    """LM-Mixup's clusters of imperfect examples (see the module docstring), sklearn-shaped.

    ``fit(X [n, d])`` sets ``capacities_ [k]``, ``cluster_centers_ [k, d]`` (KMeans on the
    normalised points), ``labels_ [n]`` and ``sizes_ [k]`` (= capacities). ``plan(n)``
    gives the capacities alone, so a caller may fit the centres elsewhere (distributed
    KMeans with ``k = len(plan(n))``) and pass them to ``fit(X, centres=...)``.
    """

    min_size: int = 2
    max_size: int = 5
    mean: float = 3.0
    std: float = 1.0
    random_state: int = 0
    max_iter: int = 100
    top: int = 8

    def plan(self, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.random_state, 0x1A7])
        return draw_capacities(n, rng, self.mean, self.std, self.min_size, self.max_size)

    def fit(self, X: np.ndarray, centres: np.ndarray | None = None) -> CapacityKMeans:
        from mixray.algorithms.kmeans import KMeans

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or not np.isfinite(X).all():
            raise ClusteringInputError(f"points must be a finite [n, d] array, got shape {X.shape}")
        caps = self.plan(X.shape[0])
        Xn = _unit(X.astype(np.float64)).astype(np.float32)
        if centres is None:
            centres = KMeans(len(caps), random_state=self.random_state, max_iter=self.max_iter).fit(Xn).cluster_centers_
        if centres.shape != (len(caps), X.shape[1]):
            raise ClusteringInputError(f"centres have shape {centres.shape}; expected "
                                       f"({len(caps)}, {X.shape[1]}) (k = len(plan(n)))")
        self.capacities_ = caps
        self.cluster_centers_ = np.asarray(centres, dtype=np.float32)
        self.labels_ = capacity_assign(Xn, self.cluster_centers_, caps, self.top)
        self.sizes_ = np.bincount(self.labels_, minlength=len(caps))
        return self


# ----------------------------------------------------------------------------- the prompt template

MERGE_INSTRUCTION = ("Given some related question-answer pairs, merge them into a single coherent "
                     "question-answer pair that preserves all essential information from the originals.")
SYSTEM_PROMPT = (
    "You are an expert in data mix-up. Your task is to merge the provided content into a single "
    "coherent and high-quality output. You MUST ALWAYS follow this exact format:\n"
    "1. First, provide your reasoning wrapped in <think> tags\n"
    "2. Then, provide your final answer wrapped in <answer> tags\n"
    "NEVER output anything outside these tags.\n\n"
    "Example format:\n<think>\n[Your step-by-step reasoning about how and why the merge makes sense]\n"
    "</think>\n\n<answer>\nQ: [the merged question]\nA: [the merged answer]\n</answer>")


def member_text(instruction: str, response: str) -> str:
    """One cluster member: ``"Q: {instruction}\\n A: {response}"`` (stripped, newlines normalised)."""
    def clean(t: str) -> str:
        return (t or "").replace("\r\n", "\n").replace("\r", "\n").strip()
    return f"Q: {clean(instruction)}\n A: {clean(response)}"


def cluster_prompt(members: Sequence[tuple[str, str]]) -> str:
    """The user turn: the merge instruction, then the members joined by blank lines."""
    return MERGE_INSTRUCTION + "\n\n" + "\n\n".join(member_text(q, a) for q, a in members)


def distill_messages(members: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """``[system, user]`` chat messages of a cluster (SFT, GRPO and generation use these)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": cluster_prompt(members)}]


def answer_pair(question: str, answer: str) -> str:
    """The answer body ``"Q: …\\nA: …"``."""
    return f"Q: {question.strip()}\nA: {answer.strip()}"


def target_text(question: str, answer: str, think: str) -> str:
    """A distillation in the required format: ``<think>…</think>\\n<answer>Q: … A: …</answer>``."""
    return f"<think>\n{think.strip()}\n</think>\n<answer>\n{answer_pair(question, answer)}\n</answer>"


# ----------------------------------------------------------------------------- parsing

THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
QA_SPLIT = re.compile(r"Q:\s*(.*?)\s*\bA:\s*(.*)", re.DOTALL)
REJECT_REASONS = ("no_answer_tag", "text_outside_tags", "no_question_answer", "empty_question",
                  "empty_answer")


def answer_text(output: str) -> str | None:
    """The text inside the first ``<answer>…</answer>``, or None."""
    m = ANSWER.search(output or "")
    return m.group(1) if m else None


@dataclass(frozen=True)
class Parsed:
    """A parsed distillation: ``question``/``answer`` when ``ok``, else the ``reason`` (REJECT_REASONS)."""

    question: str = ""
    answer: str = ""
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def parse_output(output: str) -> Parsed:
    """``<think>…</think><answer>Q: … A: …</answer>`` → the question and answer, or why not.

    Reasons, checked in this order: ``no_answer_tag``; ``text_outside_tags`` (the whole
    output, stripped, is not exactly think-then-answer); ``no_question_answer`` (the
    answer has no ``Q: … A:``); ``empty_question``; ``empty_answer``.
    """
    body = answer_text(output)
    if body is None:
        return Parsed(reason="no_answer_tag")
    if not THINK_ANSWER.fullmatch((output or "").strip()):
        return Parsed(reason="text_outside_tags")
    m = QA_SPLIT.search(body)
    if m is None:
        return Parsed(reason="no_question_answer")
    q, a = m.group(1).strip(), m.group(2).strip()
    if not q:
        return Parsed(reason="empty_question")
    if not a:
        return Parsed(reason="empty_answer")
    return Parsed(q, a)


# ----------------------------------------------------------------------------- rule-based degradation

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PREFIXES = ("Quick question: ", "Please tell me: ", "I was wondering: ", "Can you help? ", "Hi, ")
_SWAPS = {"the": "teh", "and": "&", "you": "u", "are": "r", "with": "w/", "because": "cuz",
          "number": "num", "please": "pls", "information": "info", "example": "e.g."}


def _truncate(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    if len(words) < 4:
        return text
    keep = max(2, int(len(words) * rng.uniform(0.4, 0.8)))
    return " ".join(words[:keep])


def _drop_sentences(text: str, rng: np.random.Generator) -> str:
    parts = [p for p in _SENTENCE.split(text.strip()) if p]
    if len(parts) < 2:
        return _truncate(text, rng)
    keep = [p for p in parts if rng.random() > 0.4] or [parts[int(rng.integers(len(parts)))]]
    if len(keep) == len(parts):
        keep.pop(int(rng.integers(len(keep))))
    return " ".join(keep)


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(len(word) - 1))
    op = int(rng.integers(3))
    if op == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def _typos(text: str, rng: np.random.Generator, rate: float = 0.12) -> str:
    words = text.split(" ")
    hit = rng.random(len(words)) < rate
    if not hit.any() and words:
        hit[int(rng.integers(len(words)))] = True
    return " ".join(_typo(w, rng) if h else w for w, h in zip(words, hit, strict=True))


def _rewrite(text: str, rng: np.random.Generator) -> str:
    """A near-duplicate: a chatty prefix, informal abbreviations, lower-case start."""
    words = [_SWAPS.get(w.lower(), w) if rng.random() < 0.5 else w for w in text.split(" ")]
    out = " ".join(words)
    prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
    return prefix + (out[:1].lower() + out[1:] if out else out)


_DEGRADE = {"truncate": _truncate, "drop_sentences": _drop_sentences, "typos": _typos,
            "rewrite": _rewrite}


def degrade(text: str, kind: str, rng: np.random.Generator) -> str:
    """``text`` made worse by one rule of ``DEGRADATIONS`` (seeded by ``rng``)."""
    if kind not in _DEGRADE:
        raise InputError(f"degradation {kind!r}; allowed: {', '.join(DEGRADATIONS)}")
    return _DEGRADE[kind](text, rng)


def degraded_members(instruction: str, output: str, n: int, rng: np.random.Generator,
                     kinds: Sequence[str] = DEGRADATIONS) -> list[tuple[str, str]]:
    """``n`` imperfect versions of one high-quality pair (a synthetic cluster for its target).

    Member i applies kind ``kinds[(start + i) % len(kinds)]`` to the response and a
    second, random kind to the question with probability 1/2, so the members differ in
    how they are wrong; each member differs from the original in at least one field.
    """
    kinds = list(kinds)
    start = int(rng.integers(len(kinds)))
    out = []
    for i in range(n):
        kind = kinds[(start + i) % len(kinds)]
        a = degrade(output, kind, rng)
        q = degrade(instruction, kinds[int(rng.integers(len(kinds)))], rng) if rng.random() < 0.5 else instruction
        if (q, a) == (instruction, output):
            a = _typos(output, rng, rate=0.3)
        out.append((q, a))
    return out


THINK_DEGRADED = ("The {n} pairs ask the same question; some are cut off, misspelled or padded. "
                  "Keep every essential fact once, in clean wording.")
