"""Exact similarity and gain kernels on the 2^-22 integer grid (see the package docstring).

Shapes: embeddings are scaled rows ``xs = 2^11·x`` ([n, d] float32, x unit
rows); similarities are integer-valued float32 ``floor(2^22·cos)``; the
running max ``cur`` ([n] float32) is in the same units; gains are float64 sums
of integers, exact in any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mixray.algorithms import fused
from mixray.algorithms.gemm import RightProduct
from mixray.algorithms.threads import gemm_threads, shared_executor

SCALE_EXP = 22  # similarities are integers in units of 2^-22 (below 2^24: float32 stays exact)
EMBED_SCALE = float(2.0 ** (SCALE_EXP // 2))  # xs = 2^11·x, exact in float32
UNIT = 2.0 ** -SCALE_EXP  # one grid step: scaled sums times UNIT are cosine sums
BIG = float(2.0 ** (SCALE_EXP + 2))  # a 'running max' above every similarity: its terms are 0
_PAD = 16  # MKL computes a dot product identically in every GEMM shape once both dims are >= 16
ROW_BLOCK = 512  # candidate rows per matrix product
COL_BLOCK = 4096  # columns per matrix product (a 512 x 4096 float32 block is 8 MB)
SYM_BLOCK = 1024  # square blocks of the symmetric first pass
SKINNY = 128  # oneDNN: qsims packs a left factor of at most this many rows (then it pays)


def _round_up(n: int) -> int:
    return max(_PAD, -(-n // _PAD) * _PAD)


def _round_up_ladder(n: int) -> int:
    """``n`` rounded up to a multiple of 16 with at most 3 significant bits above that (16, 32,
    …, 128, 144, 160, …, 256, 288, …): at most 1/8 padding, and only ~8 sizes per octave.
    oneDNN keeps state per GEMM shape it has seen (measured: ~0.7 GB at N = 100K with every
    multiple of 16), so its shapes come from this short ladder."""
    n = _round_up(n)
    step = max(_PAD, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def _zero_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` [m, d] padded with zero rows to [n, d] (``x`` itself when ``n == m``)."""
    return x if n == x.shape[0] else torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])])


def qsims(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Quantised similarities ``floor(a @ b.T)`` ([r, d] x [c, d] -> [r, c], integer-valued float32).

    ``a``, ``b`` are scaled embeddings (``2^11·x``), so this is ``floor(2^22·cos)``.
    Both GEMM dims are padded to multiples of 16: each entry is then bit-identical
    whatever the shapes of the call, so gains computed in different batches agree.
    The product is :class:`~mixray.algorithms.gemm.RightProduct` (torch's BLAS, or
    oneDNN on non-Intel x86 CPUs: 1.1–2.1× faster there, and shape-invariant as well).

    oneDNN packs its right factor on every call (0.55 ms for 4,096 columns, more than
    the product of 16 rows with them), so few rows (``r ≤ SKINNY < c``) are packed
    instead: the product is ``(b @ a.T).T``. Each entry is the same float32 dot product
    either way round (tested; the symmetric first pass relies on it as well).
    """
    r, c = a.shape[0], b.shape[0]
    packs = RightProduct.packs(b)
    pad = _round_up_ladder if packs else _round_up
    rp, cp = pad(r), pad(c)
    if packs and rp <= SKINNY and rp < cp:
        return qsims_transposed(a, b).T[:r, :c].contiguous()
    a, b = _zero_rows(a, rp), _zero_rows(b, cp)
    if cp > COL_BLOCK and packs:
        # oneDNN packs its right factor: blocks of columns keep that copy at 6 MB, not 4·c·d
        # bytes for two large factors; entries unchanged
        out = torch.empty(rp, cp, dtype=a.dtype)
        for j in range(0, cp, COL_BLOCK):
            out[:, j : j + COL_BLOCK] = RightProduct(b[j : j + COL_BLOCK])(a)
    else:
        out = RightProduct(b)(a)
    if rp != r or cp != c:
        out = out[:r, :c].contiguous()
    return out.floor_()


def qsims_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``qsims(a, b).T`` with its padding, without the transposing copy: ``floor(b @ a.T)``
    as float32 [c', r'] (c' ≥ c, r' ≥ r; rows ≥ c and columns ≥ r are padding), computed with
    ``a`` packed. For the oneDNN backend (``RightProduct.packs``), where it is the cheap way
    to take few rows ``a`` against many columns ``b``; entries bit-identical to :func:`qsims`."""
    r, c = a.shape[0], b.shape[0]
    rp, cp = _round_up_ladder(r), _round_up_ladder(c)
    a, b = _zero_rows(a, rp), _zero_rows(b, cp)
    return RightProduct(a)(b).floor_()


class Workspace:
    """A grow-only scratch buffer, so the elementwise chain does not allocate per block."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(0, dtype=torch.float32, device=device)

    def like(self, s: torch.Tensor) -> torch.Tensor:
        n = s.numel()
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.float32, device=s.device)
        return self.buf[:n].view(s.shape)


def gain_sums(s: torch.Tensor, cur: torch.Tensor, dim: int = 1, ws: Workspace | None = None,
              cap: torch.Tensor | None = None) -> torch.Tensor:
    """Exact ``Σ max(0, s − cur)`` over ``dim`` (or ``Σ min(max(0, s − cur), cap)``).

    ``s`` [r, c] quantised similarities (not modified), ``cur``/``cap``
    broadcast against ``s`` ([c] for dim=1, [r, 1] for dim=0). With
    ``cur = cur_then``, ``cap = cur_now − cur_then`` the result is the drop
    ``Σ max(0, s − cur_then) − max(0, s − cur_now)`` in one pass (exact: integers).
    Returns float64 [r] (dim=1) or [c] (dim=0). On CPU one fused pass
    (:mod:`~mixray.algorithms.fused`, the same exact integers).
    """
    if s.device.type == "cpu" and s.is_contiguous():
        return _fused_gain_sums(s, cur, dim, cap)
    x = torch.sub(s, cur, out=ws.like(s)) if ws is not None else s - cur
    x.clamp_(min=0)
    if cap is not None:
        torch.minimum(x, cap, out=x)
    return x.sum(dim, dtype=torch.float64)


def _fused_gain_sums(s: torch.Tensor, cur: torch.Tensor, dim: int,
                     cap: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros(s.shape[1 - dim], dtype=torch.float64)
    cur_v = cur.reshape(-1).to(torch.float32).contiguous()
    if dim == 1 and cap is None:
        fused.block_row_gains(s.numpy(), cur_v.numpy(), out.numpy())
    elif dim == 1:
        cap_v = cap.reshape(-1).to(torch.float32).contiguous()
        fused.block_row_drops(s.numpy(), cur_v.numpy(), cap_v.numpy(), out.numpy())
    elif cap is None:
        fused.block_col_sums(s.numpy(), cur_v.numpy(), cur_v.numpy(), 0, s.shape[1], False,
                             out.numpy())
    else:
        raise ValueError("a cap is only supported along dim=1")
    return out


def dense_gains(xr: torch.Tensor, xcols: torch.Tensor, cur: torch.Tensor | None,
                col_index: torch.Tensor | None = None, ws: Workspace | None = None,
                cap: torch.Tensor | None = None,
                groups: Sequence[tuple[int, int, torch.Tensor, torch.Tensor | None]] = (),
                workers: int = 1) -> torch.Tensor:
    """Exact gains (float64 [r]) of rows ``xr`` over columns ``xcols`` (or ``xcols[col_index]``).

    ``xr`` [r, d], ``xcols`` [n, d] scaled embeddings; ``cur`` (and optional
    ``cap``, see :func:`gain_sums`) are aligned with the picked columns. With
    ``groups`` = [(row0, row1, cur, cap), ...] each contiguous row range uses its
    own vectors, while the column gather and the matrix product are shared.
    Blocked over rows and columns so the similarity block stays a few MB.

    ``workers`` > 1 (CPU): the column blocks are split over that many threads, each running
    its products single-threaded — the lazy greedy's products are skinny (tens of candidate
    rows), where one product on two threads gains little. Partial sums are exact integers,
    so the split does not change a bit.
    """
    r = xr.shape[0]
    c = xcols.shape[0] if col_index is None else col_index.shape[0]
    groups = list(groups) or [(0, r, cur, cap)]
    starts = list(range(0, c, COL_BLOCK))
    workers = min(workers, len(starts)) if xr.device.type == "cpu" else 1
    if workers > 1 and not fused.concurrent_launches_ok():
        workers = 1
    if workers > 1:
        def part(w: int) -> torch.Tensor:
            torch.set_num_threads(1)
            with fused.kernel_threads(1):
                return _dense_gains_blocks(xr, xcols, col_index, groups, starts[w::workers],
                                           Workspace(xr.device))

        with gemm_threads(1):
            parts = list(shared_executor(workers).map(part, range(workers)))
        return torch.stack(parts).sum(0)
    return _dense_gains_blocks(xr, xcols, col_index, groups, starts, ws or Workspace(xr.device))


def _dense_gains_blocks(xr: torch.Tensor, xcols: torch.Tensor, col_index: torch.Tensor | None,
                        groups: list, starts: list[int], ws: Workspace) -> torch.Tensor:
    """:func:`dense_gains` over the column blocks beginning at ``starts``."""
    r = xr.shape[0]
    c = xcols.shape[0] if col_index is None else col_index.shape[0]
    out = torch.zeros(r, dtype=torch.float64, device=xr.device)
    transposed = RightProduct.packs(xr)
    for j0 in starts:
        j1 = min(c, j0 + COL_BLOCK)
        xc = xcols[j0:j1] if col_index is None else xcols[col_index[j0:j1]]
        for i0 in range(0, r, ROW_BLOCK):
            i1 = min(r, i0 + ROW_BLOCK)
            if transposed:  # oneDNN: pack the candidate rows, not the 4,096 columns
                _transposed_block_sums(qsims_transposed(xr[i0:i1], xc), groups, i0, i1, j0, j1, out)
                continue
            s = qsims(xr[i0:i1], xc)
            for g0, g1, gcur, gcap in groups:
                a, b = max(g0, i0), min(g1, i1)
                if a < b:
                    out[a:b] += gain_sums(s[a - i0:b - i0], gcur[j0:j1], ws=ws,
                                          cap=None if gcap is None else gcap[j0:j1])
    return out


def _transposed_block_sums(st: torch.Tensor, groups: list, i0: int, i1: int, j0: int, j1: int,
                           out: torch.Tensor) -> None:
    """``out`` += the gains (or capped drops) of candidate rows ``[i0, i1)`` over columns
    ``[j0, j1)`` from their transposed block ``st`` [≥ j1 − j0, ≥ i1 − i0] (one fused pass
    per group; exact integer sums, so equal to :func:`gain_sums` on the untransposed block)."""
    stn = st.numpy()
    for g0, g1, gcur, gcap in groups:
        a, b = max(g0, i0), min(g1, i1)
        if a < b:
            cur = gcur[j0:j1].to(torch.float32).contiguous()
            cap = cur if gcap is None else gcap[j0:j1].to(torch.float32).contiguous()
            fused.block_col_sums(stn, cur.numpy(), cap.numpy(), a - i0, b - i0, gcap is not None,
                                 out[a:b].numpy())


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous mask (numpy's is ~4x faster on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.view(-1).nonzero().squeeze(1)


def segment_sums(values: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` with lengths ``lens`` (float64).

    Through a float64 cumulative sum: exact for integer-valued terms whose
    total stays below 2^53 (always the case here), so it is order-free too.
    """
    cs = torch.zeros(len(values) + 1, dtype=torch.float64, device=values.device)
    torch.cumsum(values, 0, dtype=torch.float64, out=cs[1:])
    ends = torch.cumsum(lens, 0)
    return cs[ends] - cs[ends - lens]


def ranking_gains(xs: torch.Tensor, ranking: np.ndarray, chunk: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Marginal gains d(a_t|A_{t−1}) (unscaled, float64 [K]) along ``ranking`` and the final scaled cur.

    The objective of any ranking (every method and baseline is scored with it).
    The similarity rows of ``chunk`` consecutive picks come from one matrix
    product; the running max is then updated pick by pick.
    """
    n = xs.shape[0]
    cur = torch.zeros(n, dtype=torch.float32, device=xs.device)
    gains = np.empty(len(ranking), dtype=np.float64)
    r = torch.as_tensor(np.asarray(ranking, dtype=np.int64), device=xs.device)
    for c0 in range(0, len(r), chunk):
        rows = torch.cat([qsims(xs[r[c0:c0 + chunk]], xs[j:j + COL_BLOCK])
                          for j in range(0, n, COL_BLOCK)], dim=1)
        for i in range(rows.shape[0]):
            s = rows[i]
            gains[c0 + i] = float((s - cur).clamp_(min=0).sum(dtype=torch.float64)) * UNIT
            torch.maximum(cur, s, out=cur)
    return gains, cur.cpu().numpy()


def diversity_from_cur(cur_scaled: np.ndarray) -> float:
    """d(A)/N = mean_v max(0, max_a sim(a, v)) from the scaled running max [N] (float64)."""
    return float(np.asarray(cur_scaled, dtype=np.float64).sum() * UNIT / len(cur_scaled))
