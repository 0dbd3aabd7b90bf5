"""Training losses: NTP, MDIT's mixed-target CE, SFTMix's logit Mixup; the MDIT embedding mix.

Conventions (every function here):

- ``logits [B, T, V]``: position t predicts the token at t+1.
- ``targets [B, T]``: the *next-token targets*, aligned with the logits
  (``targets[:, t] = labels[:, t+1]``, see ``next_token_targets``), with
  ``IGNORE_INDEX`` on prompt, padding and the last position. Loss is only ever
  taken on response tokens.
- Every loss is a **token mean**: a sum of per-token cross-entropies divided by
  a ``normalizer``. By default the normalizer is this batch's own token count;
  the training loop passes the count of the whole accumulation window (all
  micro-batches, all ranks), so micro-batch 1 × accumulation 4 gives the same
  gradient as micro-batch 4 × accumulation 1. Both SFTMix terms are token means,
  so μ keeps its meaning whatever the batch size or response lengths.

All V-wide work runs through ``mixed_rows_cross_entropy``: a chunked
cross-entropy over selected logit rows that never materialises a V-wide soft
target, a second ``[B, T, V]`` logits tensor, or a ``log_softmax`` copy. Its
backward recomputes each chunk and writes one gradient buffer, so peak memory
is ``logits + grad(logits) + one chunk`` whichever loss is used (a 128K
vocabulary does not double it).
"""

from __future__ import annotations

import torch

from mixray.algorithms.ifd import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "default_chunk_rows",
    "mdit_loss",
    "mix_embeddings",
    "mixed_rows_cross_entropy",
    "mixup_cross_entropy",
    "mixup_target_mass",
    "next_token_targets",
    "ntp_loss",
    "sftmix_loss",
    "sftmix_pair_positions",
    "token_count",
]

_CHUNK_ELEMENTS = 1 << 26  # 64 M float32 = 256 MB of V-wide temporaries per chunk


def default_chunk_rows(vocab_size: int) -> int:
    """Logit rows per chunk so one chunk's ``[rows, V]`` float32 temporaries stay ≈256 MB."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_size))


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels [B, T]`` (IGNORE_INDEX on prompt/padding) -> ``targets [B, T]``.

    ``targets[:, t] = labels[:, t+1]``; the last position gets IGNORE_INDEX.
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def token_count(targets: torch.Tensor) -> torch.Tensor:
    """Number of valid (non-ignored) targets: the NTP normalizer of a batch."""
    return (targets != IGNORE_INDEX).sum()


class _MixedRowsCE(torch.autograd.Function):
    """Sum over terms m of ``w_a[m]·CE(z̃_m, t_a[m]) + w_b[m]·CE(z̃_m, t_b[m])`` per group.

    ``z̃_m = α_m·z[rows_a[m]] + (1−α_m)·z[rows_b[m]]`` (just ``z[rows_a[m]]`` when
    ``rows_b`` is None). Forward and backward run over chunks of terms; backward
    recomputes the chunk and accumulates into one ``[R, V]`` gradient.
    """

    @staticmethod
    def forward(ctx, logits, rows_a, rows_b, alpha, t_a, t_b, w_a, w_b, group, n_groups, chunk):
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.zeros(n_groups, dtype=cdtype, device=logits.device)
        for s in range(0, rows_a.numel(), chunk):
            sl = slice(s, s + chunk)
            z = _mixed_chunk(logits, rows_a, rows_b, alpha, sl, cdtype)
            lse = torch.logsumexp(z, dim=-1)
            term = w_a[sl].to(cdtype) * (lse - z.gather(1, t_a[sl, None]).squeeze(1))
            if t_b is not None:
                term = term + w_b[sl].to(cdtype) * (lse - z.gather(1, t_b[sl, None]).squeeze(1))
            out.index_add_(0, group[sl], term)
        ctx.save_for_backward(logits, rows_a, rows_b, alpha, t_a, t_b, w_a, w_b, group)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, rows_a, rows_b, alpha, t_a, t_b, w_a, w_b, group = ctx.saved_tensors
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        grad = torch.zeros_like(logits)
        g_term = grad_out.to(cdtype)[group]  # [M]: d total / d term
        for s in range(0, rows_a.numel(), ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            z = _mixed_chunk(logits, rows_a, rows_b, alpha, sl, cdtype)
            wa = w_a[sl].to(cdtype) * g_term[sl]
            wb = w_b[sl].to(cdtype) * g_term[sl] if t_b is not None else torch.zeros_like(wa)
            # d/dz̃ [wa·CE(z̃, a) + wb·CE(z̃, b)] = (wa + wb)·softmax(z̃) − wa·e_a − wb·e_b
            gz = torch.softmax(z, dim=-1).mul_((wa + wb)[:, None])
            gz.scatter_add_(1, t_a[sl, None], -wa[:, None])
            if t_b is not None:
                gz.scatter_add_(1, t_b[sl, None], -wb[:, None])
            if rows_b is None:
                grad.index_add_(0, rows_a[sl], gz.to(grad.dtype))
            else:
                a = alpha[sl].to(cdtype)[:, None]
                grad.index_add_(0, rows_a[sl], (a * gz).to(grad.dtype))
                grad.index_add_(0, rows_b[sl], ((1 - a) * gz).to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None, None, None


def _mixed_chunk(logits, rows_a, rows_b, alpha, sl, cdtype):
    z = logits.index_select(0, rows_a[sl]).to(cdtype)
    if rows_b is None:
        return z
    a = alpha[sl].to(cdtype)[:, None]
    return z.mul_(a).add_(logits.index_select(0, rows_b[sl]).to(cdtype) * (1 - a))


def mixed_rows_cross_entropy(
    logits2d: torch.Tensor,
    rows_a: torch.Tensor,
    targets_a: torch.Tensor,
    weight_a: torch.Tensor,
    *,
    rows_b: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    targets_b: torch.Tensor | None = None,
    weight_b: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    n_groups: int = 1,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The one V-wide kernel: weighted CE of (mixed) logit rows against one or two targets.

    Shapes: ``logits2d [R, V]``; per term m: ``rows_a, targets_a, weight_a [M]``;
    optional ``rows_b, alpha [M]`` (mix two logit rows), ``targets_b, weight_b [M]``
    (a second target), ``group [M]`` in ``[0, n_groups)``. Returns ``[n_groups]``::

        z̃_m   = alpha[m]·logits2d[rows_a[m]] + (1−alpha[m])·logits2d[rows_b[m]]   (or logits2d[rows_a[m]])
        out[g] = Σ_{m: group[m]=g} weight_a[m]·CE(z̃_m, targets_a[m]) + weight_b[m]·CE(z̃_m, targets_b[m])

    with ``CE(z, y) = logsumexp(z) − z[y]``, computed in float32 (or float64) in
    chunks of ``chunk_rows`` terms. Naive equivalent: build ``z̃ [M, V]``, take
    ``-log_softmax(z̃)`` and gather the targets. Targets must be valid indices
    (give ignored terms weight 0 or leave them out).
    """
    if rows_b is not None and alpha is None:
        raise ValueError("rows_b needs alpha (the weight of rows_a in the logit mix)")
    if (targets_b is None) != (weight_b is None):
        raise ValueError("targets_b and weight_b go together")
    m = rows_a.numel()
    if group is None:
        group = torch.zeros(m, dtype=torch.long, device=rows_a.device)
    chunk = chunk_rows or default_chunk_rows(logits2d.shape[-1])
    return _MixedRowsCE.apply(logits2d, rows_a, rows_b, alpha, targets_a, targets_b, weight_a,
                              weight_b, group, n_groups, chunk)


def _as_normalizer(value, fallback: torch.Tensor) -> torch.Tensor:
    n = fallback if value is None else torch.as_tensor(value, dtype=fallback.dtype, device=fallback.device)
    return n.clamp_min(torch.finfo(n.dtype).tiny) if n.is_floating_point() else n.clamp_min(1)


def ntp_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer=None,
             chunk_rows: int | None = None) -> torch.Tensor:
    """Token-mean next-token cross-entropy on the valid targets.

    ``logits [B, T, V]``, ``targets [B, T]`` -> scalar::

        Σ_{b,t: targets[b,t] valid} −log_softmax(logits[b, t])[targets[b, t]]  /  normalizer

    ``normalizer`` defaults to ``token_count(targets)``. Naive equivalent (default
    normalizer): ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)``.
    """
    B, T, V = logits.shape
    flat = targets.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    norm = _as_normalizer(normalizer, torch.tensor(float(rows.numel()), device=logits.device))
    w = torch.ones(rows.numel(), device=logits.device) / norm
    return mixed_rows_cross_entropy(logits.reshape(B * T, V), rows, flat[rows], w,
                                    chunk_rows=chunk_rows)[0]


def mixup_target_mass(targets_a: torch.Tensor, targets_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Total soft-target mass ``Σ_i λ_i·N_a(i) + (1−λ_i)·N_b(i)`` (the MDIT normalizer).

    ``targets_a, targets_b [B, T]``, ``lam [B]`` -> scalar (float). An original
    example (λ = 1, no b) counts its N_a tokens, like NTP.
    """
    na = (targets_a != IGNORE_INDEX).sum(1).to(lam.dtype)
    nb = (targets_b != IGNORE_INDEX).sum(1).to(lam.dtype)
    return (lam * na + (1 - lam) * nb).sum()


def mixup_cross_entropy(
    logits: torch.Tensor,
    targets_a: torch.Tensor,
    targets_b: torch.Tensor,
    lam: torch.Tensor,
    normalizer=None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """MDIT's loss for mixed inputs: ``λ·CE(logits, y_a) + (1−λ)·CE(logits, y_b)``.

    ``logits [B, T, V]`` (from the mixed embeddings), ``targets_a [B, T]``,
    ``targets_b [B, T]``, ``lam [B]`` -> scalar. Each CE runs over its own valid
    positions::

        Σ_{b,t} [ λ_b·[y_a valid]·CE(z_bt, y_a[b,t]) + (1−λ_b)·[y_b valid]·CE(z_bt, y_b[b,t]) ] / normalizer

    ``normalizer`` defaults to ``mixup_target_mass`` (the soft targets' total
    mass), so this equals the soft-label cross-entropy with per-position target
    ``λ·onehot(y_a) + (1−λ)·onehot(y_b)`` averaged over that mass, without any
    V-wide target tensor. An original example is ``λ = 1`` with ``targets_b`` all
    ignored: its loss is plain NTP. Symmetric: ``(a, b, λ) ≡ (b, a, 1−λ)``.
    """
    return mdit_loss(logits, targets_a, targets_b, lam, None, normalizer, chunk_rows)[0]


def mdit_loss(
    logits: torch.Tensor,
    targets_a: torch.Tensor,
    targets_b: torch.Tensor,
    lam: torch.Tensor,
    is_mix: torch.Tensor | None = None,
    normalizer=None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mixup_cross_entropy`` split by row kind: ``(total, originals' part, mixes' part)``.

    Same shapes and equation as ``mixup_cross_entropy``; ``is_mix [B]`` (bool)
    says which rows are mixed samples. Both parts share the normalizer, so
    ``total = originals + mixes``.
    """
    B, T, V = logits.shape
    fa, fb = targets_a.reshape(-1), targets_b.reshape(-1)
    ftype = torch.promote_types(lam.dtype, torch.float32)
    lam_t = lam.to(ftype)[:, None].expand(B, T).reshape(-1)
    wa = torch.where(fa != IGNORE_INDEX, lam_t, torch.zeros_like(lam_t))
    wb = torch.where(fb != IGNORE_INDEX, 1 - lam_t, torch.zeros_like(lam_t))
    rows = ((wa > 0) | (wb > 0)).nonzero().squeeze(1)
    norm = _as_normalizer(normalizer, mixup_target_mass(targets_a, targets_b, lam.to(ftype)))
    mix_row = torch.zeros(B, dtype=torch.bool, device=logits.device) if is_mix is None else is_mix.bool()
    group = mix_row[:, None].expand(B, T).reshape(-1)[rows].long()
    parts = mixed_rows_cross_entropy(
        logits.reshape(B * T, V), rows, fa[rows].clamp_min(0), wa[rows] / norm,
        targets_b=fb[rows].clamp_min(0), weight_b=wb[rows] / norm, group=group, n_groups=2,
        chunk_rows=chunk_rows,
    )
    return parts.sum(), parts[0], parts[1]


def sftmix_pair_positions(
    targets: torch.Tensor, conf_rows: torch.Tensor, unconf_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat logit rows of the first ``N'_i = min(N^c_i, N^u_i)`` *response positions* of each pair.

    ``targets [B, T]``, ``conf_rows, unconf_rows [P]`` (batch rows of the pairs)
    -> ``(flat_c [M], flat_u [M], pair [M])`` with ``M = Σ_i N'_i``: for pair i
    and n < N'_i, ``flat_c`` indexes ``targets.reshape(-1)`` at the n-th valid
    target of row ``conf_rows[i]`` (likewise ``flat_u``), ``pair`` is i. The n-th
    response token of one example is mixed with the n-th of the other, whatever
    their prompt lengths.
    """
    B, T = targets.shape
    valid = targets != IGNORE_INDEX
    # valid positions first, in order (stable sort of "invalid" flags)
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    n = valid.sum(1)
    n_pair = torch.minimum(n[conf_rows], n[unconf_rows])  # [P]
    width = int(n_pair.max().item()) if n_pair.numel() else 0
    keep = torch.arange(width, device=targets.device)[None, :] < n_pair[:, None]  # [P, width]
    pos_c = order[conf_rows, :width]
    pos_u = order[unconf_rows, :width]
    flat_c = (conf_rows[:, None] * T + pos_c)[keep]
    flat_u = (unconf_rows[:, None] * T + pos_u)[keep]
    pair = torch.arange(conf_rows.numel(), device=targets.device)[:, None].expand_as(keep)[keep]
    return flat_c, flat_u, pair


def sftmix_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    conf_rows: torch.Tensor,
    unconf_rows: torch.Tensor,
    lam: torch.Tensor,
    mu: float = 0.2,
    ntp_normalizer=None,
    mix_normalizer=None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFTMix from one forward pass: ``(NTP + μ·Mixup, NTP, Mixup)``.

    ``logits [B, T, V]``, ``targets [B, T]`` for all B examples (confident and
    unconfident); ``conf_rows, unconf_rows [P]`` pair batch rows one-to-one;
    ``lam [P]`` ~ Beta(α, α). With ``Z^c_n, Z^u_n`` the logits predicting the
    n-th response token of each side and ``N'_i = min(N^c_i, N^u_i)``::

        Z̃_n   = λ·Z^c_n + (1−λ)·Z^u_n
        Mixup = Σ_i Σ_{n≤N'_i} [ λ_i·CE(Z̃_n, y^c_n) + (1−λ_i)·CE(Z̃_n, y^u_n) ] / Σ_i N'_i
        NTP   = token-mean CE over every valid target of all B rows (``ntp_loss``)

    Both are token means (normalizers default to this batch's counts). One
    fused, chunked kernel computes both terms; nothing V-wide is duplicated.
    Naive equivalent: gather ``Z^c, Z^u [N', V]`` per pair, mix, and take
    ``-Σ Ỹ·log_softmax(Z̃)`` with ``Ỹ = λ·onehot(y^c) + (1−λ)·onehot(y^u)``.
    """
    B, T, V = logits.shape
    flat = targets.reshape(-1)
    dev = logits.device
    ftype = torch.promote_types(lam.dtype, torch.float32)
    ntp_rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    flat_c, flat_u, pair = sftmix_pair_positions(targets, conf_rows, unconf_rows)
    n_ntp = _as_normalizer(ntp_normalizer, torch.tensor(float(ntp_rows.numel()), dtype=ftype, device=dev))
    n_mix = _as_normalizer(mix_normalizer, torch.tensor(float(flat_c.numel()), dtype=ftype, device=dev))
    lam_m = lam.to(ftype)[pair]
    k, m = ntp_rows.numel(), flat_c.numel()
    rows_a = torch.cat([ntp_rows, flat_c])
    rows_b = torch.cat([ntp_rows, flat_u])
    alpha = torch.cat([torch.ones(k, dtype=ftype, device=dev), lam_m])
    t_a = torch.cat([flat[ntp_rows], flat[flat_c]])
    t_b = torch.cat([flat[ntp_rows], flat[flat_u]])
    w_a = torch.cat([torch.ones(k, dtype=ftype, device=dev) / n_ntp, lam_m / n_mix])
    w_b = torch.cat([torch.zeros(k, dtype=ftype, device=dev), (1 - lam_m) / n_mix])
    group = torch.cat([torch.zeros(k, dtype=torch.long, device=dev), torch.ones(m, dtype=torch.long, device=dev)])
    parts = mixed_rows_cross_entropy(
        logits.reshape(B * T, V), rows_a, t_a, w_a, rows_b=rows_b, alpha=alpha, targets_b=t_b,
        weight_b=w_b, group=group, n_groups=2, chunk_rows=chunk_rows,
    )
    ntp, mix = parts[0], parts[1]
    return ntp + mu * mix, ntp, mix


def mix_embeddings(
    emb_a: torch.Tensor,
    mask_a: torch.Tensor,
    emb_b: torch.Tensor,
    mask_b: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MDIT's input mix at the embedding layer: ``H = λ·E(x_a) + (1−λ)·E(x_b)``.

    ``emb_a, emb_b [B, T, d]`` (both sequences left-aligned, padded to the same
    T), ``mask_a, mask_b [B, T]`` (1 = real token), ``lam [B]`` ->
    ``(H [B, T, d], mask [B, T])`` with ``mask = mask_a ∨ mask_b`` (the union).
    Padding contributes a zero vector, not the pad token's embedding::

        H[b, t] = λ_b·mask_a[b,t]·emb_a[b,t] + (1−λ_b)·mask_b[b,t]·emb_b[b,t]

    A row with ``λ = 1`` and an empty mask_b is sequence a at its real tokens (an original
    example): causal attention never lets the zeroed padding reach them.
    """
    lam3 = lam.to(emb_a.dtype)[:, None, None]
    ma = mask_a.to(emb_a.dtype)[..., None]
    mb = mask_b.to(emb_a.dtype)[..., None]
    h = lam3 * ma * emb_a + (1 - lam3) * mb * emb_b
    return h, (mask_a.bool() | mask_b.bool()).to(mask_a.dtype)
