"""Deterministic data-parallel sampling: which rank holds which example, and each epoch's batches.

Two pure steps, so that a resumed or restarted run sees exactly the batches it
would have seen:

1. ``assign_shards`` (driver, once): every example gets a rank. Within each
   group (SFTMix: confident / unconfident) a seeded permutation is dealt round
   robin, so every rank holds ⌊n_g/W⌋ or ⌈n_g/W⌉ examples of each group.
2. ``epoch_micro_batches`` (each rank, every epoch): a permutation of the
   rank's own examples seeded by ``(seed, epoch, rank)``, cut into
   micro-batches. For SFTMix a micro-batch is b confident examples followed by
   b unconfident ones, row i paired with row b+i, with λ ~ Beta(α, α) per pair:
   pairs never straddle ranks.

``micro_batches_per_epoch`` is the same on every rank (the minimum over
ranks), so all ranks step together; the few examples beyond it are left out
of that epoch only (a different few each epoch).
"""

from __future__ import annotations

import numpy as np

from mixray.errors import InputError, TrainingConfigError

UNPAIRED, CONFIDENT, UNCONFIDENT = 0, 1, 2
_SHARD_STREAM = 0x5EED


def median_split(confidence: np.ndarray) -> np.ndarray:
    """SFTMix's split: ``True`` for the confident half ``[N] float -> [N] bool``.

    The ⌊N/2⌋ examples of highest confidence are confident, the rest (with odd
    N, one more) unconfident; ties go to the lower index first.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.ndim != 1 or not np.isfinite(conf).all():
        raise InputError("confidence must be a 1-d array of finite numbers")
    order = np.argsort(-conf, kind="stable")
    out = np.zeros(len(conf), dtype=bool)
    out[order[: len(conf) // 2]] = True
    return out


def assign_shards(groups: np.ndarray, world_size: int, seed: int) -> np.ndarray:
    """The rank of every example: ``groups [N] int -> ranks [N] int64`` in ``[0, world_size)``.

    Per group, a permutation seeded by ``seed`` is dealt round robin.
    """
    groups = np.asarray(groups)
    if world_size < 1:
        raise TrainingConfigError(f"world_size must be >= 1, got {world_size}")
    rng = np.random.default_rng([seed, _SHARD_STREAM])
    out = np.empty(len(groups), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % world_size
    return out


def micro_batches_per_epoch(groups: np.ndarray, ranks: np.ndarray, world_size: int,
                            micro_batch_size: int, paired: bool) -> int:
    """Micro-batches every rank runs per epoch: the minimum over ranks.

    Unpaired: ``⌊n_r / B⌋``. Paired (SFTMix): ``⌊min(c_r, u_r) / (B/2)⌋`` with
    c_r, u_r the rank's confident / unconfident counts.
    """
    groups, ranks = np.asarray(groups), np.asarray(ranks)
    _check_batch(micro_batch_size, paired)
    per_rank = []
    for r in range(world_size):
        mine = groups[ranks == r]
        if paired:
            pairs = min(int((mine == CONFIDENT).sum()), int((mine == UNCONFIDENT).sum()))
            per_rank.append(pairs // (micro_batch_size // 2))
        else:
            per_rank.append(len(mine) // micro_batch_size)
    return min(per_rank) if per_rank else 0


def epoch_micro_batches(
    groups: np.ndarray,
    *,
    epoch: int,
    seed: int,
    rank: int,
    micro_batch_size: int,
    n_micro: int,
    paired: bool,
    alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One rank's micro-batches for one epoch, as indices into its own examples.

    ``groups [n]`` (this rank's examples) -> ``(batches [n_micro, B] int64,
    lam [n_micro, B/2] float64 | None)``. Deterministic in ``(seed, epoch,
    rank)``; no example appears twice in an epoch. Paired: row i of a batch
    (confident) is paired with row ``B/2 + i`` (unconfident) and mixed with
    weight ``lam[:, i]`` ~ Beta(α, α).
    """
    groups = np.asarray(groups)
    _check_batch(micro_batch_size, paired)
    rng = np.random.default_rng([seed, epoch, rank])
    if not paired:
        if n_micro * micro_batch_size > len(groups):
            raise TrainingConfigError(f"{n_micro} micro-batches of {micro_batch_size} need more than {len(groups)} examples")
        perm = rng.permutation(len(groups))
        return perm[: n_micro * micro_batch_size].reshape(n_micro, micro_batch_size), None
    b = micro_batch_size // 2
    conf = np.flatnonzero(groups == CONFIDENT)
    unconf = np.flatnonzero(groups == UNCONFIDENT)
    if n_micro * b > min(len(conf), len(unconf)):
        raise TrainingConfigError(f"{n_micro} micro-batches of {b} pairs need more than "
                         f"{len(conf)} confident / {len(unconf)} unconfident examples")
    conf = conf[rng.permutation(len(conf))][: n_micro * b].reshape(n_micro, b)
    unconf = unconf[rng.permutation(len(unconf))][: n_micro * b].reshape(n_micro, b)
    lam = rng.beta(alpha, alpha, size=(n_micro, b))
    return np.concatenate([conf, unconf], axis=1), lam


def _check_batch(micro_batch_size: int, paired: bool) -> None:
    if micro_batch_size < 1:
        raise TrainingConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if paired and micro_batch_size % 2:
        raise TrainingConfigError(f"a paired micro-batch holds b confident + b unconfident examples: "
                         f"micro_batch_size must be even, got {micro_batch_size}")
