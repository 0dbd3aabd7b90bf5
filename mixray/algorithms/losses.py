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
  gradient as micro-batch 4 × accumulation 1. SFTMix divides both of its terms
  by that one NTP normaliser by default (the paper's eq. 5 times a constant), or
  each by its own count (``normalization="separate"``, see ``sftmix_loss``).

All V-wide work runs through ``mixed_rows_cross_entropy``: a cross-entropy
over selected logit rows that never materialises a V-wide soft target, a
second ``[B, T, V]`` logits tensor, or a ``log_softmax`` copy. It reads each
response as a view of the logits, computes the loss and its gradient in one
pass per chunk (one ``exp`` per element, against two for ``log_softmax`` +
its backward), and writes the gradient into the one ``[B, T, V]`` buffer that
backward needs anyway; mixed rows go through one 64 MB workspace. Peak memory is
``logits + grad(logits) + 64 MB`` whichever loss is used: SFTMix's Mixup term
and a 128K vocabulary do not double it (benchmarks/bench_train.py measures it).
"""

from __future__ import annotations

import torch

from mixray.algorithms.ifd import IGNORE_INDEX
from mixray.choices import SFTMIX_NORMALIZERS
from mixray.errors import TrainingConfigError

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
    "row_mean_nll",
    "sftmix_loss",
    "sftmix_pair_positions",
    "token_count",
]

_CHUNK_ELEMENTS = 1 << 24  # 16 M float32 = 64 MB: the V-wide workspace of one chunk


def default_chunk_rows(vocab_size: int) -> int:
    """Logit rows per chunk so one ``[rows, V]`` float32 chunk buffer is ≈64 MB."""
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
    """``total = Σ_m coef[g_m]·[w_a[m]·CE(z̃_m, t_a[m]) + w_b[m]·CE(z̃_m, t_b[m])]`` and per-group parts.

    ``z̃_m = α_m·z[rows_a[m]] + (1−α_m)·z[rows_b[m]]`` (just ``z[rows_a[m]]`` when
    ``rows_b`` is None). The terms are cut into *segments*: runs of consecutive
    logit rows (a response is one run) with one α and group, at most ``chunk``
    long; a segment's rows are read as a view of the logits, never gathered.

    The gradient is computed in the same pass as the loss (the loss is the last
    op of the graph, so backward only scales it by the incoming gradient):
    per segment, ``softmax(z̃)·(w_a + w_b) − w_a·e_{t_a} − w_b·e_{t_b}`` is
    written straight into the ``[R, V]`` gradient (unmixed rows not yet touched)
    or into a ``[chunk, V]`` workspace and added (mixed rows add α·g and
    (1−α)·g to their two source rows). Without ``requires_grad`` only the loss
    is computed.
    """

    @staticmethod
    def forward(ctx, logits, rows_a, rows_b, alpha, t_a, t_b, w_a, w_b, group, coef, n_groups, chunk):
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0]
        parts = torch.zeros(n_groups, dtype=cdtype, device=logits.device)
        total = torch.zeros((), dtype=cdtype, device=logits.device)
        grad = torch.empty_like(logits) if need_grad else None  # rows are zeroed as first touched
        touched = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device) if need_grad else None
        segs = _segments(rows_a, rows_b, alpha, group, chunk)
        work = _workspace(segs, logits, cdtype)
        coef_list = coef.double().tolist()
        for s, e, ra, rb, a, g in segs:
            n = e - s
            direct = (need_grad and rb is None and logits.dtype == cdtype
                      and not bool(touched[ra : ra + n].any()))
            z = logits.narrow(0, ra, n)
            if rb is not None:  # λ·z_a + (1−λ)·z_b = lerp(z_b, z_a, λ), one fused pass
                zb = logits.narrow(0, rb, n)
                if z.dtype == cdtype:
                    z = torch.lerp(zb, z, a, out=work[:n])
                else:
                    z = torch.lerp(zb.to(cdtype), z.to(cdtype), a, out=work[:n])
            elif z.dtype != cdtype:
                z = work[:n].copy_(z)
            wa = w_a[s:e].to(cdtype)
            wb = w_b[s:e].to(cdtype) if t_b is not None else None
            z_ta = z.gather(1, t_a[s:e, None]).squeeze(1)
            z_tb = z.gather(1, t_b[s:e, None]).squeeze(1) if wb is not None else None
            m = z.amax(dim=-1, keepdim=True)
            buf = grad.narrow(0, ra, n) if direct else work[:n]
            if buf.data_ptr() == z.data_ptr():
                buf.sub_(m)
            else:
                torch.sub(z, m, out=buf)
            sumexp = buf.exp_().sum(dim=-1)
            lse = sumexp.log() + m.squeeze(1)
            term = wa * (lse - z_ta) + (wb * (lse - z_tb) if wb is not None else 0)
            parts.index_add_(0, group[s:e], term)
            total += coef_list[g] * term.sum()
            if not need_grad:
                continue
            c = coef_list[g]
            buf.mul_((c * (wa + wb if wb is not None else wa) / sumexp)[:, None])  # c·Σw·softmax
            buf.scatter_add_(1, t_a[s:e, None], -c * wa[:, None])
            if wb is not None:
                buf.scatter_add_(1, t_b[s:e, None], -c * wb[:, None])
            if not direct:
                _zero_untouched(grad, touched, ra, n)
                if rb is None:
                    grad.narrow(0, ra, n).add_(buf)
                else:
                    _zero_untouched(grad, touched, rb, n)
                    grad.narrow(0, ra, n).add_(buf, alpha=a)
                    grad.narrow(0, rb, n).add_(buf, alpha=1 - a)
                    touched[rb : rb + n] = True
            touched[ra : ra + n] = True
        if need_grad:  # rows no term touched (prompt, padding) have zero gradient
            _zero_untouched(grad, touched, 0, logits.shape[0])
        ctx.grad, ctx.scale = grad, 1.0
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, g_parts):
        # The precomputed gradient is for an incoming gradient of 1; scale it in place (no second
        # [R, V] buffer). ctx keeps its reference, so autograd never adopts it as a leaf's .grad,
        # and a repeated backward (retain_graph) rescales from the last scale.
        grad, g = ctx.grad, float(g_total)
        if grad is not None and g != ctx.scale:
            if ctx.scale == 0.0:
                raise RuntimeError("mixed_rows_cross_entropy: backward again after a zero gradient")
            grad.mul_(g / ctx.scale)
            ctx.scale = g
        return grad, None, None, None, None, None, None, None, None, None, None, None


def _zero_untouched(grad: torch.Tensor, touched: torch.Tensor, start: int, n: int) -> None:
    """Zero the rows of ``grad[start:start+n]`` that no term has written yet (runs, not masks)."""
    t = touched[start : start + n]
    if bool(t.all()):
        return
    flip = torch.nonzero(t[1:] != t[:-1]).squeeze(1) + 1
    edges = [0, *flip.tolist(), n]
    first_untouched = not bool(t[0])
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if (i % 2 == 0) == first_untouched:
            grad.narrow(0, start + a, b - a).zero_()


def _segments(rows_a, rows_b, alpha, group, chunk) -> list[tuple[int, int, int, int | None, float, int]]:
    """``(start, end, first row a, first row b | None, α, group)`` of runs of consecutive logit rows."""
    m = rows_a.numel()
    if m == 0:
        return []
    brk = torch.ones(m, dtype=torch.bool, device=rows_a.device)
    same = (rows_a[1:] == rows_a[:-1] + 1) & (group[1:] == group[:-1])
    if rows_b is not None:
        same &= (rows_b[1:] == rows_b[:-1] + 1) & (alpha[1:] == alpha[:-1])
    brk[1:] = ~same
    starts = brk.nonzero().squeeze(1).tolist() + [m]
    bounds = [(c, min(c + chunk, e)) for s, e in zip(starts[:-1], starts[1:], strict=True)
              for c in range(s, e, chunk)]
    first = torch.tensor([b[0] for b in bounds], device=rows_a.device)
    ra = rows_a[first].tolist()
    rb = rows_b[first].tolist() if rows_b is not None else [None] * len(bounds)
    al = alpha[first].double().tolist() if rows_b is not None else [1.0] * len(bounds)
    gr = group[first].tolist()
    # a "mix" of a row with itself at α = 1 is the row: no mixing work for it
    rb = [None if b == a and lam == 1.0 else b for a, b, lam in zip(ra, rb, al, strict=True)]
    return [(s, e, a, b, lam, g) for (s, e), a, b, lam, g in zip(bounds, ra, rb, al, gr, strict=True)]


def _workspace(segs, logits, cdtype) -> torch.Tensor:
    rows = max((e - s for s, e, *_ in segs), default=0)
    return torch.empty((rows, logits.shape[-1]), dtype=cdtype, device=logits.device)


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
    coef=None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one V-wide kernel: weighted CE of (mixed) logit rows against one or two targets.

    Shapes: ``logits2d [R, V]``; per term m: ``rows_a, targets_a, weight_a [M]``;
    optional ``rows_b, alpha [M]`` (mix two logit rows), ``targets_b, weight_b [M]``
    (a second target), ``group [M]`` in ``[0, n_groups)``, ``coef [n_groups]``
    (default ones). Returns ``(total, parts [n_groups])``::

        z̃_m      = alpha[m]·logits2d[rows_a[m]] + (1−alpha[m])·logits2d[rows_b[m]]   (or logits2d[rows_a[m]])
        parts[g] = Σ_{m: group[m]=g} weight_a[m]·CE(z̃_m, targets_a[m]) + weight_b[m]·CE(z̃_m, targets_b[m])
        total    = Σ_g coef[g]·parts[g]

    with ``CE(z, y) = logsumexp(z) − z[y]`` in float32 (float64 for float64
    logits), in chunks of ``chunk_rows`` terms. ``total`` carries the gradient;
    ``parts`` are values for logging. Naive equivalent: build ``z̃ [M, V]``, take
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
    coef = torch.ones(n_groups, dtype=torch.float64) if coef is None else torch.as_tensor(coef, dtype=torch.float64)
    chunk = chunk_rows or default_chunk_rows(logits2d.shape[-1])
    return _MixedRowsCE.apply(logits2d, rows_a, rows_b, alpha, targets_a, targets_b, weight_a,
                              weight_b, group, coef, n_groups, chunk)


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


@torch.no_grad()
def row_mean_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean next-token NLL of each row over its valid targets (no gradient): ``[B]`` float.

    ``logits [B, T, V]``, ``targets [B, T]`` (``IGNORE_INDEX`` elsewhere) ->
    ``out[b] = (1/N_b)·Σ_{t: targets[b,t] valid} −log_softmax(logits[b, t])[targets[b, t]]``,
    NaN for a row without a valid target. SFTMix's ``Perp_c`` and IFD's losses are this
    over the response tokens. Runs through ``mixed_rows_cross_entropy`` (chunks of
    logit rows, no ``log_softmax`` copy of the logits). Naive equivalent:
    ``F.cross_entropy(logits[b], targets[b], ignore_index=-100)`` per row.
    """
    B, T, V = logits.shape
    flat = targets.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    row_of = torch.div(rows, T, rounding_mode="floor")
    weight = torch.ones(rows.numel(), dtype=torch.promote_types(logits.dtype, torch.float32),
                        device=logits.device)
    sums = mixed_rows_cross_entropy(logits.reshape(B * T, V), rows, flat[rows], weight, group=row_of,
                                    n_groups=B, chunk_rows=chunk_rows)[1]
    n = torch.bincount(row_of, minlength=B).to(sums.dtype)
    return torch.where(n > 0, sums / n.clamp_min(1), torch.full_like(sums, float("nan")))


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
    total, parts = mixed_rows_cross_entropy(
        logits.reshape(B * T, V), rows, fa[rows].clamp_min(0), wa[rows] / norm,
        targets_b=fb[rows].clamp_min(0), weight_b=wb[rows] / norm, group=group, n_groups=2,
        chunk_rows=chunk_rows,
    )
    return total, parts[0], parts[1]


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
    normalization: str = "shared",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SFTMix from one forward pass: ``(NTP + μ·Mixup, NTP, Mixup)``.

    ``logits [B, T, V]``, ``targets [B, T]`` for all B examples (confident and
    unconfident); ``conf_rows, unconf_rows [P]`` pair batch rows one-to-one;
    ``lam [P]`` ~ Beta(α, α). With ``Z^c_n, Z^u_n`` the logits predicting the
    n-th response token of each side and ``N'_i = min(N^c_i, N^u_i)``, the sums of
    the paper's eq. 5::

        Z̃_n     = λ·Z^c_n + (1−λ)·Z^u_n
        S_mix   = Σ_i Σ_{n≤N'_i} [ λ_i·CE(Z̃_n, y^c_n) + (1−λ_i)·CE(Z̃_n, y^u_n) ]
        S_ntp   = Σ over every valid target of all B rows of CE(z, y)

    ``normalization``:

    - ``"shared"`` (the paper): one normaliser for both terms,
      ``NTP = S_ntp / N``, ``Mixup = S_mix / N`` with ``N = ntp_normalizer`` (default:
      this batch's NTP token count); the total ``(S_ntp + μ·S_mix) / N`` is eq. 5's
      ``ℓ_NTP + μ·ℓ_Mixup`` (sum form) times the constant ``1/N``, so μ means what it
      means in the paper. ``mix_normalizer`` is not used.
    - ``"separate"``: each term over its own count, ``NTP = S_ntp / ntp_normalizer``,
      ``Mixup = S_mix / mix_normalizer`` (default ``Σ_i N'_i``): both are token
      means, and μ weighs the Mixup term ``N / Σ N'_i ≥ 2`` times more than eq. 5.

    One fused, chunked kernel computes both terms; nothing V-wide is duplicated.
    ``NTP`` and ``Mixup`` are values (no gradient); the total carries it.
    Naive equivalent: gather ``Z^c, Z^u [N', V]`` per pair, mix, and take
    ``-Σ Ỹ·log_softmax(Z̃)`` with ``Ỹ = λ·onehot(y^c) + (1−λ)·onehot(y^u)``.
    """
    if normalization not in SFTMIX_NORMALIZERS:
        raise TrainingConfigError(f"sftmix normalization {normalization!r}; allowed: {list(SFTMIX_NORMALIZERS)}",
                                  where="train.sftmix.normalizer")
    B, T, V = logits.shape
    ftype = torch.promote_types(lam.dtype, torch.float32)
    flat = targets.reshape(-1)
    ntp_rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    flat_c, flat_u, pair = sftmix_pair_positions(targets, conf_rows, unconf_rows)
    counts = torch.tensor([float(ntp_rows.numel()), float(flat_c.numel())], dtype=ftype, device=logits.device)
    n_ntp = _as_normalizer(ntp_normalizer, counts[0])
    n_mix = n_ntp if normalization == "shared" else _as_normalizer(mix_normalizer, counts[1])
    total, parts = mixed_rows_cross_entropy(
        logits.reshape(B * T, V), **_sftmix_terms(flat, ntp_rows, flat_c, flat_u, lam.to(ftype)[pair], n_ntp, n_mix),
        n_groups=2, coef=(1.0, mu), chunk_rows=chunk_rows)
    return total, parts[0], parts[1]


def _sftmix_terms(flat, ntp_rows, flat_c, flat_u, lam_m, n_ntp, n_mix) -> dict[str, torch.Tensor]:
    """The kernel's terms: group 0 = every NTP target (weight 1/n_ntp), group 1 = the mixed
    response positions (rows c and u mixed with λ, targets y^c and y^u weighted λ/n_mix, (1−λ)/n_mix)."""
    k, m, dev, ftype = ntp_rows.numel(), flat_c.numel(), flat.device, lam_m.dtype
    ones = torch.ones(k, dtype=ftype, device=dev)
    return {
        "rows_a": torch.cat([ntp_rows, flat_c]), "rows_b": torch.cat([ntp_rows, flat_u]),
        "alpha": torch.cat([ones, lam_m]),
        "targets_a": torch.cat([flat[ntp_rows], flat[flat_c]]), "targets_b": torch.cat([flat[ntp_rows], flat[flat_u]]),
        "weight_a": torch.cat([ones / n_ntp, lam_m / n_mix]),
        "weight_b": torch.cat([torch.zeros(k, dtype=ftype, device=dev), (1 - lam_m) / n_mix]),
        "group": torch.cat([torch.zeros(k, dtype=torch.long, device=dev), torch.ones(m, dtype=torch.long, device=dev)]),
    }


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
