"""The training losses against naive references (STYLE.md §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixray.algorithms.losses import (
    IGNORE_INDEX,
    mdit_loss,
    mix_embeddings,
    mixed_rows_cross_entropy,
    mixup_cross_entropy,
    mixup_target_mass,
    next_token_targets,
    ntp_loss,
    row_mean_nll,
    sftmix_loss,
    sftmix_pair_positions,
)

IGN = IGNORE_INDEX


def _targets(B, T, V, gen, min_start=1):
    """Random targets with a random prompt part (ignored) and padding at the end."""
    t = torch.randint(0, V, (B, T), generator=gen)
    for b in range(B):
        start = int(torch.randint(min_start, T // 2 + 1, (1,), generator=gen))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=gen))
        t[b, :start] = IGN
        t[b, end:] = IGN
    return t


def _naive_soft_ce(logits, q):
    """−Σ q·log_softmax(logits) / Σ q over an explicit V-wide soft target q [B, T, V]."""
    return -(q * F.log_softmax(logits.double(), -1)).sum() / q.sum()


def _onehot(t, V):
    return F.one_hot(t.clamp_min(0), V).double() * (t != IGN)[..., None]


def test_next_token_targets_shift():
    labels = torch.tensor([[IGN, IGN, 5, 6, 7], [IGN, 3, 4, IGN, IGN]])
    assert next_token_targets(labels).tolist() == [[IGN, 5, 6, 7, IGN], [3, 4, IGN, IGN, IGN]]


def test_ntp_equals_torch_cross_entropy_value_and_grad():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    t = _targets(3, 7, 11, gen)
    ours = ntp_loss(logits, t)
    (g_ours,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits.reshape(-1, 11), t.reshape(-1), ignore_index=IGN)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_mixup_with_lambda_one_is_plain_ce_on_a():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 13, generator=gen)
    ta, tb = _targets(4, 9, 13, gen), _targets(4, 9, 13, gen)
    got = mixup_cross_entropy(logits, ta, tb, torch.ones(4))
    torch.testing.assert_close(got, F.cross_entropy(logits.reshape(-1, 13), ta.reshape(-1), ignore_index=IGN))


def test_mixup_is_symmetric():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, 13, generator=gen)
    ta, tb = _targets(4, 9, 13, gen), _targets(4, 9, 13, gen)
    lam = torch.rand(4, generator=gen)
    torch.testing.assert_close(mixup_cross_entropy(logits, ta, tb, lam),
                               mixup_cross_entropy(logits, tb, ta, 1 - lam))


def test_mixup_equals_explicit_soft_label_ce_value_and_grad():
    gen = torch.Generator().manual_seed(3)
    B, T, V = 5, 8, 17
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    ta, tb = _targets(B, T, V, gen), _targets(B, T, V, gen)
    tb[0] = IGN  # an original example: no b side
    lam = torch.rand(B, generator=gen, dtype=torch.float64)
    lam[0] = 1.0
    q = lam[:, None, None] * _onehot(ta, V) + (1 - lam)[:, None, None] * _onehot(tb, V)
    ref = _naive_soft_ce(logits, q)
    ours = mixup_cross_entropy(logits, ta, tb, lam)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    torch.testing.assert_close(mixup_target_mass(ta, tb, lam), q.sum())


def test_window_normalizer_makes_split_batches_sum_to_the_whole():
    """Σ over 1-example micro-batches with the window's normalizer == one 4-example batch."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 9, 13, generator=gen)
    ta, tb = _targets(4, 9, 13, gen), _targets(4, 9, 13, gen)
    lam = torch.rand(4, generator=gen)
    whole = mixup_cross_entropy(logits, ta, tb, lam)
    mass = mixup_target_mass(ta, tb, lam)
    parts = sum(mixup_cross_entropy(logits[i:i + 1], ta[i:i + 1], tb[i:i + 1], lam[i:i + 1], normalizer=mass)
                for i in range(4))
    torch.testing.assert_close(parts, whole)
    n = (ta != IGN).sum()
    torch.testing.assert_close(sum(ntp_loss(logits[i:i + 1], ta[i:i + 1], normalizer=n) for i in range(4)),
                               ntp_loss(logits, ta))


def _hand_built():
    """2 pairs over 4 rows (T=6, V=5): rows 0,1 confident, rows 2,3 unconfident."""
    targets = torch.tensor([
        [IGN, IGN, 1, 2, 3, IGN],  # conf 0: response positions 2,3,4   (N=3)
        [IGN, 4, 0, 1, 2, 3],  # conf 1: positions 1..5             (N=5)
        [IGN, 0, 4, IGN, IGN, IGN],  # unconf 0: positions 1,2            (N=2)
        [IGN, IGN, IGN, 2, 3, 1],  # unconf 1: positions 3,4,5          (N=3)
    ])
    return targets, torch.tensor([0, 1]), torch.tensor([2, 3])


def test_sftmix_pairs_first_response_positions_only():
    targets, c, u = _hand_built()
    flat_c, flat_u, pair = sftmix_pair_positions(targets, c, u)
    T = 6
    # pair 0: N' = min(3, 2) = 2 -> (row0,pos2)&(row2,pos1), (row0,pos3)&(row2,pos2)
    # pair 1: N' = min(5, 3) = 3 -> (row1,pos1..3)&(row3,pos3..5)
    assert flat_c.tolist() == [0 * T + 2, 0 * T + 3, 1 * T + 1, 1 * T + 2, 1 * T + 3]
    assert flat_u.tolist() == [2 * T + 1, 2 * T + 2, 3 * T + 3, 3 * T + 4, 3 * T + 5]
    assert pair.tolist() == [0, 0, 1, 1, 1]


def test_sftmix_matches_naive_loop_and_ignores_positions_beyond_n_prime():
    targets, c, u = _hand_built()
    gen = torch.Generator().manual_seed(5)
    V = 5
    logits = torch.randn(4, 6, V, generator=gen, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64)
    total, ntp, mix = sftmix_loss(logits, targets, c, u, lam, mu=0.2, normalization="separate")
    # naive: explicit soft labels over V on the gathered, mixed logits
    pairs = [((0, [2, 3]), (2, [1, 2])), ((1, [1, 2, 3]), (3, [3, 4, 5]))]
    terms = []
    for i, ((rc, pc), (ru, pu)) in enumerate(pairs):
        for n in range(len(pc)):
            z = lam[i] * logits[rc, pc[n]] + (1 - lam[i]) * logits[ru, pu[n]]
            y = lam[i] * F.one_hot(targets[rc, pc[n]], V) + (1 - lam[i]) * F.one_hot(targets[ru, pu[n]], V)
            terms.append(-(y * F.log_softmax(z, -1)).sum())
    ref_mix = torch.stack(terms).mean()
    ref_ntp = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGN)
    torch.testing.assert_close(mix, ref_mix)
    torch.testing.assert_close(ntp, ref_ntp)
    torch.testing.assert_close(total, ref_ntp + 0.2 * ref_mix)
    # the Mixup term's gradient: d(NTP + 0.2·Mixup) − d(NTP + 0·Mixup) = 0.2·d Mixup
    (g_02,) = torch.autograd.grad(total, logits)
    (g_0,) = torch.autograd.grad(sftmix_loss(logits, targets, c, u, lam, mu=0.0, normalization="separate")[0],
                                 logits)
    g_mix = (g_02 - g_0) / 0.2
    torch.testing.assert_close(g_mix, torch.autograd.grad(ref_mix, logits)[0])
    torch.testing.assert_close(g_0, torch.autograd.grad(ref_ntp, logits)[0])
    # conf row 0 position 4 and conf row 1 positions 4,5 are beyond N': no Mixup gradient
    assert g_mix[0, 4].abs().sum() == 0 and g_mix[1, 4:].abs().sum() == 0
    # ... and prompt positions get none either
    assert g_mix[2, 0].abs().sum() == 0 and g_mix[3, :3].abs().sum() == 0


def _naive_eq5(logits, targets, pairs, lam, mu):
    """SFTMix's eq. 5 in its sum form, with explicit V-wide soft labels::

        ℓ = Σ_{i, n: response tokens of all rows} CE(z, y)  +  μ·Σ_pairs Σ_{n ≤ N'} H(Ỹ_n, softmax(Z̃_n))
    """
    V = logits.shape[-1]
    ntp = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGN, reduction="sum")
    mix = logits.new_zeros(())
    for i, ((rc, pc), (ru, pu)) in enumerate(pairs):
        for n in range(len(pc)):
            z = lam[i] * logits[rc, pc[n]] + (1 - lam[i]) * logits[ru, pu[n]]
            y = lam[i] * F.one_hot(targets[rc, pc[n]], V) + (1 - lam[i]) * F.one_hot(targets[ru, pu[n]], V)
            mix = mix - (y * F.log_softmax(z, -1)).sum()
    return ntp + mu * mix


def test_sftmix_shared_is_eq5_sum_form_times_one_constant():
    """``normalization="shared"`` (the default) is eq. 5 times 1/N, N = the NTP token count, for every μ
    and λ: the value, its gradient, and ``NTP + μ·Mixup``; the window normaliser replaces N."""
    targets, c, u = _hand_built()
    pairs = [((0, [2, 3]), (2, [1, 2])), ((1, [1, 2, 3]), (3, [3, 4, 5]))]  # the first N' response positions
    n_ntp = int((targets != IGN).sum())
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    constants = []
    for mu, lam in ((0.2, [0.3, 0.8]), (1.0, [0.5, 0.5]), (0.0, [0.1, 0.6]), (3.0, [0.9, 0.05])):
        lam = torch.tensor(lam, dtype=torch.float64)
        total, ntp, mix = sftmix_loss(logits, targets, c, u, lam, mu=mu)
        ref = _naive_eq5(logits, targets, pairs, lam, mu)
        constants.append((total / ref).item())
        torch.testing.assert_close(total, ntp + mu * mix)
        torch.testing.assert_close(torch.autograd.grad(total, logits)[0],
                                   torch.autograd.grad(ref, logits)[0] / n_ntp)
    assert constants == pytest.approx([1 / n_ntp] * 4, rel=1e-12)
    lam = torch.tensor([0.3, 0.8], dtype=torch.float64)
    window = sftmix_loss(logits, targets, c, u, lam, ntp_normalizer=40.0, mix_normalizer=7.0)[0]
    torch.testing.assert_close(window, _naive_eq5(logits, targets, pairs, lam, 0.2) / 40.0)
    # separate: the same sums, the Mixup one over Σ N' = 5 instead of N = 13
    _, _, mix_sep = sftmix_loss(logits, targets, c, u, lam, normalization="separate")
    _, _, mix_shared = sftmix_loss(logits, targets, c, u, lam)
    torch.testing.assert_close(mix_sep * 5, mix_shared * n_ntp)
    with pytest.raises(ValueError, match="allowed"):
        sftmix_loss(logits, targets, c, u, lam, normalization="token-mean")


def test_chunking_does_not_change_values_or_grads():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 10, 19, generator=gen, requires_grad=True)
    t = _targets(6, 10, 19, gen)
    lam = torch.rand(3, generator=gen)
    c, u = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    a = sftmix_loss(logits, t, c, u, lam, chunk_rows=1)[0]
    b = sftmix_loss(logits, t, c, u, lam, chunk_rows=10_000)[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, logits)[0], torch.autograd.grad(b, logits)[0])


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    B, T, V = 4, 5, 6
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64, requires_grad=True)
    t = _targets(B, T, V, gen)
    tb = _targets(B, T, V, gen)
    lam = torch.rand(B, generator=gen, dtype=torch.float64)
    c, u = torch.tensor([0, 1]), torch.tensor([2, 3])
    assert torch.autograd.gradcheck(lambda x: ntp_loss(x, t, chunk_rows=3), (logits,))
    assert torch.autograd.gradcheck(lambda x: mixup_cross_entropy(x, t, tb, lam, chunk_rows=3), (logits,))
    assert torch.autograd.gradcheck(lambda x: sftmix_loss(x, t, c, u, lam[:2], chunk_rows=3)[0], (logits,))
    # the raw kernel with two groups, mixed rows and two targets
    rows_a, rows_b = torch.tensor([0, 3, 7, 7]), torch.tensor([1, 3, 2, 9])
    x2 = torch.randn(10, V, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(rows_b=rows_b, alpha=torch.tensor([0.2, 1.0, 0.7, 0.5], dtype=torch.float64),
              targets_b=torch.tensor([1, 2, 3, 4]), weight_b=torch.tensor([0.5, 0.0, 0.3, 1.0], dtype=torch.float64),
              group=torch.tensor([0, 1, 1, 0]), n_groups=2, coef=(1.0, 3.0), chunk_rows=3)
    w = torch.tensor([1.0, 0.5, 0.25, 2.0], dtype=torch.float64)
    tgt = torch.tensor([5, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda x: mixed_rows_cross_entropy(x, rows_a, tgt, w, **kw)[0], (x2,))
    # a downstream scale reaches the kernel's backward as a non-unit incoming gradient
    assert torch.autograd.gradcheck(lambda x: 2.5 * mixed_rows_cross_entropy(x, rows_a, tgt, w, **kw)[0], (x2,))
    total, parts = mixed_rows_cross_entropy(x2, rows_a, tgt, w, **kw)
    torch.testing.assert_close(total, parts[0] + 3.0 * parts[1])
    assert not parts.requires_grad


def test_bf16_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 6, 50, generator=gen).bfloat16().requires_grad_()
    t = _targets(4, 6, 50, gen)
    ours = sftmix_loss(logits, t, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.3, 0.6]))[0]
    up = logits.detach().float().requires_grad_()
    ref = sftmix_loss(up, t, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.3, 0.6]))[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)  # same values: bf16 logits upcast chunk by chunk
    (g,) = torch.autograd.grad(ours, logits)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), torch.autograd.grad(ref, up)[0], atol=1e-3, rtol=1e-2)


def test_mix_embeddings_values_and_mask_union():
    gen = torch.Generator().manual_seed(9)
    ea, eb = torch.randn(2, 4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    ma = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mb = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    lam = torch.tensor([0.25, 1.0])
    h, m = mix_embeddings(ea, ma, eb, mb, lam)
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    torch.testing.assert_close(h[0, :2], 0.25 * ea[0, :2] + 0.75 * eb[0, :2])
    torch.testing.assert_close(h[0, 2], 0.25 * ea[0, 2])  # b is padding there: zero, not E(pad)
    torch.testing.assert_close(h[0, 3], torch.zeros(3))
    torch.testing.assert_close(h[1], ea[1])  # λ = 1 and no b: the original sequence


def test_kernel_rejects_inconsistent_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="alpha"):
        mixed_rows_cross_entropy(x, torch.tensor([0]), torch.tensor([1]), torch.ones(1), rows_b=torch.tensor([1]))
    with pytest.raises(ValueError, match="targets_b and weight_b"):
        mixed_rows_cross_entropy(x, torch.tensor([0]), torch.tensor([1]), torch.ones(1), targets_b=torch.tensor([1]))


def test_mdit_loss_splits_originals_and_mixes():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 9, 13, generator=gen)
    ta, tb = _targets(4, 9, 13, gen), _targets(4, 9, 13, gen)
    tb[:2] = IGN
    lam = torch.tensor([1.0, 1.0, 0.3, 0.6])
    is_mix = torch.tensor([False, False, True, True])
    total, orig, mix = mdit_loss(logits, ta, tb, lam, is_mix)
    torch.testing.assert_close(total, mixup_cross_entropy(logits, ta, tb, lam))
    torch.testing.assert_close(orig + mix, total)
    mass = mixup_target_mass(ta, tb, lam)
    torch.testing.assert_close(orig, ntp_loss(logits[:2], ta[:2], normalizer=mass))


def test_row_mean_nll_is_each_rows_cross_entropy():
    """The per-example response loss (SFTMix's Perp_c, IFD's losses) against F.cross_entropy row by row."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 8, 17, generator=gen)
    t = _targets(4, 8, 17, gen)
    t[3] = IGN  # no response token: NaN, not 0
    got = row_mean_nll(logits, t, chunk_rows=3)
    for b in range(3):
        torch.testing.assert_close(got[b], F.cross_entropy(logits[b], t[b], ignore_index=IGN))
    assert torch.isnan(got[3])
    torch.testing.assert_close(got[:3], row_mean_nll(logits, t)[:3])  # chunking changes nothing
