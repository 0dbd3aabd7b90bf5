"""IFD arithmetic and pooling on hand-built tensors, against naive references."""

from __future__ import annotations

import math

import torch

from mixray.algorithms.ifd import IGNORE_INDEX, ifd_quality, ifd_ratio, response_mean_loss
from mixray.algorithms.pooling import l2_normalize, last_token, mean_pool


def test_response_mean_loss_matches_hand_computation():
    V = 3
    # logits at position t predict token t+1; uniform logits everywhere except row 0, t=1
    logits = torch.zeros(2, 4, V)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # p(token 1) = 3/5
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1, 2],      # response = tokens at t=2,3
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    out = response_mean_loss(logits, labels)
    expected0 = (-math.log(3 / 5) + math.log(3)) / 2  # t=2 predicted from t=1, t=3 from uniform t=2
    assert math.isclose(out[0].item(), expected0, rel_tol=1e-6)
    assert math.isnan(out[1].item())  # no labelled token


def test_response_mean_loss_equals_naive_loop():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    got = response_mean_loss(logits, labels)
    for b in range(B):
        terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
                 for t in range(T - 1) if labels[b, t + 1] != IGNORE_INDEX]
        assert torch.allclose(got[b], torch.stack(terms).mean(), atol=1e-6)


def test_ifd_ratio_and_quality():
    with_x = torch.tensor([1.0, 2.0, 3.0, 1.0])
    without = torch.tensor([2.0, 2.0, 2.0, 0.0])
    r = ifd_ratio(with_x, without)
    assert torch.allclose(r[:3], torch.tensor([0.5, 1.0, 1.5]))
    assert math.isnan(r[3].item())
    q = ifd_quality(r)
    # IFD < 1 keeps its value (higher = harder-but-helped = better); >= 1 or undefined -> 0
    assert q.tolist() == [0.5, 0.0, 0.0, 0.0]


def test_mean_pool_last_token_normalize():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(mean_pool(x, mask), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    assert torch.equal(last_token(x, mask), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    n = l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(n[0], torch.tensor([0.6, 0.8])) and torch.equal(n[1], torch.zeros(2))
