"""Sampler invariants: whole pairs per rank, determinism by (seed, epoch), equal steps on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixray.algorithms.batching import mix_batch, response_spans, sft_batch, truncate_pair
from mixray.algorithms.losses import IGNORE_INDEX as IGN
from mixray.algorithms.sampling import (
    CONFIDENT,
    UNCONFIDENT,
    UNPAIRED,
    assign_shards,
    epoch_micro_batches,
    median_split,
    micro_batches_per_epoch,
)


def _paired_groups(n_conf=23, n_unconf=24):
    g = np.array([CONFIDENT] * n_conf + [UNCONFIDENT] * n_unconf)
    return np.random.default_rng(0).permutation(g)


def test_median_split_halves_with_extra_to_unconfident():
    conf = np.array([0.5, -1.0, 3.0, 2.0, 2.0])
    # top ⌊5/2⌋ = 2: index 2 (3.0), then the tie at 2.0 goes to the lower index (3)
    assert median_split(conf).tolist() == [False, False, True, True, False]
    with pytest.raises(ValueError, match="finite"):
        median_split(np.array([1.0, np.nan]))


def test_shards_balance_each_group_and_are_seeded():
    g = _paired_groups()
    r = assign_shards(g, 3, seed=7)
    for grp in (CONFIDENT, UNCONFIDENT):
        counts = np.bincount(r[g == grp], minlength=3)
        assert counts.max() - counts.min() <= 1 and counts.sum() == (g == grp).sum()
    assert (assign_shards(g, 3, seed=7) == r).all()
    assert (assign_shards(g, 3, seed=8) != r).any()


def test_paired_batches_hold_whole_pairs_on_each_rank():
    g = _paired_groups()
    W, B = 2, 4
    ranks = assign_shards(g, W, seed=1)
    n_micro = micro_batches_per_epoch(g, ranks, W, B, paired=True)
    assert n_micro == min(min((g[ranks == r] == CONFIDENT).sum(), (g[ranks == r] == UNCONFIDENT).sum()) // 2
                          for r in range(W))
    seen = []
    for r in range(W):
        mine = np.flatnonzero(ranks == r)
        batches, lam = epoch_micro_batches(g[mine], epoch=0, seed=1, rank=r, micro_batch_size=B,
                                           n_micro=n_micro, paired=True, alpha=0.5)
        assert batches.shape == (n_micro, B) and lam.shape == (n_micro, B // 2)
        assert ((lam > 0) & (lam < 1)).all()
        # first b rows confident, last b unconfident: row i pairs with row b + i, both on this rank
        assert (g[mine][batches[:, : B // 2]] == CONFIDENT).all()
        assert (g[mine][batches[:, B // 2:]] == UNCONFIDENT).all()
        seen.append(mine[batches.reshape(-1)])
    allseen = np.concatenate(seen)
    assert len(np.unique(allseen)) == len(allseen)  # no example twice in an epoch, across ranks


def test_epochs_are_deterministic_and_differ():
    g = np.full(40, UNPAIRED)
    a0, _ = epoch_micro_batches(g, epoch=0, seed=3, rank=1, micro_batch_size=4, n_micro=10, paired=False)
    again, _ = epoch_micro_batches(g, epoch=0, seed=3, rank=1, micro_batch_size=4, n_micro=10, paired=False)
    a1, _ = epoch_micro_batches(g, epoch=1, seed=3, rank=1, micro_batch_size=4, n_micro=10, paired=False)
    assert (a0 == again).all()  # a resumed run re-creates the epoch and skips what it has done
    assert (a0 != a1).any()
    assert sorted(a0.reshape(-1).tolist()) == list(range(40))


def test_equal_micro_batches_on_every_rank_and_odd_batch_rejected():
    g = np.full(11, UNPAIRED)
    ranks = assign_shards(g, 2, seed=0)  # 6 and 5 examples
    assert micro_batches_per_epoch(g, ranks, 2, 2, paired=False) == 2
    with pytest.raises(ValueError, match="must be even"):
        micro_batches_per_epoch(_paired_groups(), ranks[:0], 1, 3, paired=True)


def test_sft_batch_targets_are_response_tokens_only():
    b = sft_batch([[10, 11, 12, 13], [20, 21, 22]], [2, 1], pad_id=0)
    assert b["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, 22, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # position t predicts token t+1; only response tokens (index >= n_prompt) are targets
    assert b["targets"].tolist() == [[IGN, 12, 13, IGN], [21, 22, IGN, IGN]]


def test_multi_turn_spans_make_every_response_a_target_and_nothing_else():
    """Flat spans [s0, e0, s1, e1]: the tokens of both responses are predicted, the user turn between
    them, the prompt, the padding and the last position are not; n_prompt is the one-span case."""
    seq = [1, 2, 30, 31, 3, 4, 5, 40, 41, 42]  # prompt 1 2 | reply 30 31 | user turn 3 4 5 | reply 40 41 42
    b = sft_batch([seq, seq, [7, 8, 9]], [[2, 4, 7, 10], [2, 10], 1], pad_id=0)
    assert b["targets"][0].tolist() == [IGN, 30, 31, IGN, IGN, IGN, 40, 41, 42, IGN]
    assert b["targets"][1].tolist() == [IGN, 30, 31, 3, 4, 5, 40, 41, 42, IGN]  # one span: all of it
    assert b["targets"][2].tolist() == [8, 9] + [IGN] * 8
    assert response_spans([2, 4, 7, 10], 10) == [(2, 4), (7, 10)]
    assert response_spans(3, 5) == [(3, 5)] and response_spans([4, 9, 9, 9], 6) == [(4, 6)]
    with pytest.raises(ValueError, match="pairs"):
        response_spans([1, 2, 3], 5)
    m = mix_batch([seq], [[2, 4, 7, 10]], [[5, 6, 7]], [[1, 3]], [0.5], pad_id=0)
    assert m["targets_a"][0].tolist() == b["targets"][0].tolist()
    assert m["targets_b"][0].tolist() == [6, 7] + [IGN] * 8


def test_mix_batch_pads_both_sides_to_one_length():
    b = mix_batch([[1, 2, 3], [4, 5]], [1, 1], [[6, 7, 8, 9, 10], []], [2, 0], [0.4, 1.0], pad_id=0)
    assert b["input_ids_a"].shape == b["input_ids_b"].shape == (2, 5)
    assert b["targets_b"][1].tolist() == [IGN] * 5
    assert b["targets_b"][0].tolist() == [IGN, 8, 9, 10, IGN]
    torch.testing.assert_close(b["lam"], torch.tensor([0.4, 1.0]))


def test_truncate_pair_keeps_response_and_prompt_end():
    p, r, cut = truncate_pair(list(range(10)), list(range(100, 120)), 16)
    assert cut and len(p) + len(r) == 16 and r == list(range(100, 108)) and p == list(range(2, 10))
    assert truncate_pair([1, 2], [3], 8) == ([1, 2], [3], False)
    p, r, cut = truncate_pair(list(range(50)), [7, 8], 8)
    assert r == [7, 8] and p == list(range(44, 50)) and cut
