"""Facility-location greedy with a quality term (QDIT), exact and matrix-free.

Objective (``shared/methods.md`` §1), over a pool V of N L2-normalised embeddings::

    sim(a, v) = cos(e_a, e_v)
    d(A)      = Σ_{v∈V} max(0, max_{a∈A} sim(a, v))          d(∅) = 0
    d(a|A)    = d(A ∪ {a}) − d(A) = Σ_v max(0, sim(a, v) − cur_v),  cur_v = max(0, max_{a∈A} sim(a, v))
    f(a|A, α) = (1−α)·d(a|A)/N + α·q(a)                       q min-max normalised to [0, 1]

Greedy: K times add ``argmax_{a∉A} f(a|A, α)``, ties broken by the lower index.

Memory is O(N·d + budget), never O(N²): the only per-point state is the running
vector ``cur`` ([N] float32). Everything else is a cache that the caller bounds.

Exactness and determinism
-------------------------
Similarities are quantised once, to integers on a 2^-22 grid::

    s_q(a, v) = floor(2^22 · sim(a, v))       (|s_q| ≤ 2^22; the grid step 2.4e-7 is float32 GEMM noise)

and the running max ``cur`` lives in the same units. Every value is an integer
below 2^24, so float32 arithmetic on them (differences, clamps) is exact, and
a gain ``Σ_v max(0, s_q − cur_v)`` summed in float64 is exact in any order (up
to 2^31 points). Gains therefore do not depend on blocking, batching,
sharding or summation order, and the naive, lazy, stochastic and sharded
greedies see bit-identical gains for the same state. The factor 2^22 is folded
into the embeddings (``xs = 2^11·x``, exact in float32), so matrix products
give scaled similarities directly. Bit-identical similarities also need the
BLAS to compute a dot product the same way in every matrix shape; with MKL
this holds once both GEMM dimensions are at least 16, so :func:`qsims` pads
them (on other BLAS builds results agree up to float32 rounding).

How the exact greedy stays fast (:class:`ColumnShard`)
-------------------------------------------------------
* One blocked pass computes every candidate's initial gain (when candidates and
  columns are the same set it uses symmetry: each block ``S_IJ`` yields the
  gains of rows I over columns J and of rows J over columns I).
* The same pass keeps the pairs with ``sim > θ`` in a sparse matrix H (CSR by
  candidate, the same quantised values), θ chosen from a sample of
  similarities so that H fits the memory budget. A column v is *covered* once ``cur_v ≥ θ``;
  from then on only H entries can contribute to any gain at v, so the
  contribution of covered columns is a cheap sparse sum.
* Uncovered columns W are handled densely. A candidate's dense part is kept
  from its last evaluation at step τ and brought up to date with the columns
  whose ``cur`` changed since τ (a change log), or recomputed over W when that
  is smaller. Early in a run (``cur`` near 0, every selection nudges every
  column) this is the expensive part; as the selection covers the pool, W
  empties and every evaluation becomes sparse.
* Lazy evaluation (Minoux): the last exact gain of a candidate is an upper
  bound of its current gain (d is submodular, q modular); each round evaluates,
  in one batch, the stale candidates whose bound can still beat the best fresh
  value, largest first, until the best bound is fresh. Rounds look only at a
  shortlist of the largest bounds (rebuilt when the best bound outside it may
  win), so they cost O(shortlist), not O(N).
* Measured on clustered data, nearly all the dense work happens in the first
  ~100 steps (each early pick nudges the running max of half the pool); after
  that the run is sparse.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger("mixray.facility")

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

_PAD = 16  # MKL computes a dot product identically in every GEMM shape once both dims are >= 16
ROW_BLOCK = 512  # candidate rows per matrix product
COL_BLOCK = 4096  # columns per matrix product (a 512 x 4096 float32 block is 8 MB)
SYM_BLOCK = 1024  # square blocks of the symmetric first pass


class gemm_threads:
    """Context: run the enclosed (large, matrix-product-heavy) work with ``n`` torch threads.

    The greedy's many small sparse/elementwise ops run single-threaded: on a
    shared or oversubscribed machine, short parallel regions stall on
    descheduled threads (measured 3-4x slower with 2 threads on 2 busy cores),
    while long matrix products still profit from every core.
    """

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n and self.n != self.before:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    The first pass and compactions free many MB-sized temporaries of varying
    sizes; glibc keeps them in the heap, which measured +40% RSS at N = 50K.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


SCALE_EXP = 22  # similarities are integers in units of 2^-22


def scale_exponent(n: int) -> int:
    """The similarity grid exponent (fixed: integers below 2^24 keep float32 arithmetic exact)."""
    return SCALE_EXP


def big_value(e: int) -> float:
    """A scaled 'running max' above every scaled similarity: its terms are always 0."""
    return float(2.0 ** (e + 2))


def _round_up(n: int) -> int:
    return max(_PAD, -(-n // _PAD) * _PAD)


def qsims(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Quantised similarities ``floor(a @ b.T)`` ([r, d] x [c, d] -> [r, c], integer-valued float32).

    ``a``, ``b`` are scaled embeddings (``2^11·x``), so this is ``floor(2^22·cos)``.
    Both GEMM dims are padded to multiples of 16: each entry is then bit-identical
    whatever the shapes of the call, so gains computed in different batches agree.
    """
    r, c = a.shape[0], b.shape[0]
    rp, cp = _round_up(r), _round_up(c)
    if rp != r:
        a = torch.cat([a, a.new_zeros(rp - r, a.shape[1])])
    if cp != c:
        b = torch.cat([b, b.new_zeros(cp - c, b.shape[1])])
    out = a @ b.T
    if rp != r or cp != c:
        out = out[:r, :c].contiguous()
    return out.floor_()


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
    Returns float64 [r] (dim=1) or [c] (dim=0).
    """
    x = torch.sub(s, cur, out=ws.like(s)) if ws is not None else s - cur
    x.clamp_(min=0)
    if cap is not None:
        torch.minimum(x, cap, out=x)
    return x.sum(dim, dtype=torch.float64)


def dense_gains(xr: torch.Tensor, xcols: torch.Tensor, cur: torch.Tensor | None,
                col_index: torch.Tensor | None = None, ws: Workspace | None = None,
                cap: torch.Tensor | None = None,
                groups: Sequence[tuple[int, int, torch.Tensor, torch.Tensor | None]] = ()
                ) -> torch.Tensor:
    """Exact gains (float64 [r]) of rows ``xr`` over columns ``xcols`` (or ``xcols[col_index]``).

    ``xr`` [r, d], ``xcols`` [n, d] scaled embeddings; ``cur`` (and optional
    ``cap``, see :func:`gain_sums`) are aligned with the picked columns. With
    ``groups`` = [(row0, row1, cur, cap), ...] each contiguous row range uses its
    own vectors, while the column gather and the matrix product are shared.
    Blocked over rows and columns so the similarity block stays a few MB.
    """
    ws = ws or Workspace(xr.device)
    r = xr.shape[0]
    c = xcols.shape[0] if col_index is None else col_index.shape[0]
    groups = list(groups) or [(0, r, cur, cap)]
    out = torch.zeros(r, dtype=torch.float64, device=xr.device)
    for j0 in range(0, c, COL_BLOCK):
        j1 = min(c, j0 + COL_BLOCK)
        xc = xcols[j0:j1] if col_index is None else xcols[col_index[j0:j1]]
        for i0 in range(0, r, ROW_BLOCK):
            i1 = min(r, i0 + ROW_BLOCK)
            s = qsims(xr[i0:i1], xc)
            for g0, g1, gcur, gcap in groups:
                a, b = max(g0, i0), min(g1, i1)
                if a < b:
                    out[a:b] += gain_sums(s[a - i0:b - i0], gcur[j0:j1], ws=ws,
                                          cap=None if gcap is None else gcap[j0:j1])
    return out


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


# --------------------------------------------------------------------------------------------
# Sparse high-similarity cache (CSR by candidate)
# --------------------------------------------------------------------------------------------


class _CacheFull(Exception):
    """The sparse cache would exceed its budget: retry with a higher threshold."""


@dataclass
class SparseRows:
    """CSR rows ``indptr`` [N+1] int64, ``cols`` int32 (shard-local), ``vals`` float32 (scaled)."""

    indptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(entries per row [R], cols int32, vals) of ``rows``' entries, concatenated in order."""
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        total = int(lens.sum())
        dev = rows.device
        if total == 0:
            return lens, self.cols[:0], self.vals[:0]
        shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens,
                                        output_size=total)
        pos = shift.add_(torch.arange(total, device=dev))
        return lens, self.cols[pos], self.vals[pos]

    def row_chunks(self, rows: torch.Tensor, max_entries: int = 1 << 21):
        """Split ``rows`` into consecutive pieces holding at most ~``max_entries`` entries each."""
        if len(rows) == 0:
            return
        lens = (self.indptr[rows + 1] - self.indptr[rows]).cumsum(0)
        start = 0
        while start < len(rows):
            base = int(lens[start - 1]) if start else 0
            end = int(torch.searchsorted(lens, base + max_entries, right=True))
            end = max(end, start + 1)
            yield start, end
            start = end


class _SparseBuilder:
    """Appends finished row blocks of the sparse cache into preallocated buffers."""

    def __init__(self, n_rows: int, capacity: int, device: torch.device):
        self.capacity = capacity
        # torch.empty does not touch the pages: RSS grows only with what is written.
        self.cols = torch.empty(capacity, dtype=torch.int32, device=device)
        self.vals = torch.empty(capacity, dtype=torch.float32, device=device)
        self.counts = torch.zeros(n_rows, dtype=torch.int64, device=device)
        self.fill = 0
        self.pending = 0

    def reserve(self, n: int) -> None:
        self.pending += n
        if self.fill + self.pending > self.capacity:
            raise _CacheFull

    def add_block(self, rows: slice | torch.Tensor, n_rows: int,
                  chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Append the entries of a block of ``n_rows`` rows (global ``rows``: a slice or sorted ids).

        Each chunk is (local row, col, val) sorted by local row; entries are placed
        row by row (chunk order within a row) by a counting sort — no comparison sort.
        """
        if not chunks:
            return
        dev = self.cols.device
        per_chunk = [torch.bincount(c[0].long(), minlength=n_rows) for c in chunks]
        counts = torch.stack(per_chunk).sum(0)
        n = int(counts.sum())
        self.pending -= n
        if self.fill + n > self.capacity:
            raise _CacheFull
        row_start = self.fill + torch.cumsum(counts, 0) - counts
        offset = torch.zeros(n_rows, dtype=torch.int64, device=dev)
        for (r, c, v), cc in zip(chunks, per_chunk, strict=True):
            if len(r) == 0:
                continue
            r = r.long()
            chunk_start = torch.cumsum(cc, 0) - cc
            dest = (row_start + offset - chunk_start)[r] + torch.arange(len(r), device=dev)
            self.cols[dest] = c
            self.vals[dest] = v
            offset += cc
        if isinstance(rows, slice):
            self.counts[rows] += counts
        else:
            self.counts.index_add_(0, rows, counts)
        self.fill += n

    def finish(self) -> SparseRows:
        indptr = torch.zeros(len(self.counts) + 1, dtype=torch.int64, device=self.counts.device)
        torch.cumsum(self.counts, 0, out=indptr[1:])
        return SparseRows(indptr, self.cols[:self.fill], self.vals[:self.fill])


def _empty_rows(n_rows: int, device: torch.device) -> SparseRows:
    return SparseRows(torch.zeros(n_rows + 1, dtype=torch.int64, device=device),
                      torch.empty(0, dtype=torch.int32, device=device),
                      torch.empty(0, dtype=torch.float32, device=device))


def choose_threshold(xs: torch.Tensor, xcols: torch.Tensor, n_candidates: int,
                     capacity: int, sample_rows: int = 64) -> float:
    """Scaled θ ≥ 0 such that about 60% of ``capacity`` pairs (candidate, column) have sim > θ.

    Estimated from the similarities of ``sample_rows`` evenly spaced rows of
    ``xs`` with every column (deterministic). Returns ``inf`` when the budget
    is 0 (no sparse cache: every column stays dense).
    """
    if capacity <= 0 or xcols.shape[0] == 0:
        return math.inf
    idx = torch.linspace(0, xs.shape[0] - 1, min(sample_rows, xs.shape[0]), device=xs.device).long()
    s = qsims(xs[idx], xcols).flatten()
    frac = 0.6 * capacity / (float(n_candidates) * xcols.shape[0])
    positive = float((s > 0).float().mean())
    if frac >= positive:
        return 0.0
    k = max(1, min(len(s), int(frac * len(s))))
    return max(0.0, float(torch.topk(s, k, sorted=False).values.min()))


# --------------------------------------------------------------------------------------------
# A column shard: the running max of some columns and everything needed to evaluate gains
# --------------------------------------------------------------------------------------------


class ColumnShard:
    """The state of a set of pool points ("columns") and the gains they contribute.

    ``xs`` [N, d] are the scaled embeddings of the whole pool (any point can be a
    candidate); ``cols`` (sorted global ids) are the points this shard owns. A
    single-process run has one shard owning every column; the sharded greedy
    gives each Ray actor one shard. All methods return float64 sums in scaled
    units; the total gain of a candidate is the sum over shards.

    Assumes valid input (validated at the public boundary).
    """

    def __init__(self, xs: torch.Tensor, cols: torch.Tensor | None, scale_exp: int,
                 budget_bytes: int = 256 << 20, cur: torch.Tensor | None = None,
                 step: int = 0, threads: int | None = None):
        self.threads = threads  # torch threads for the matrix products (None: leave as is)
        self.xs = xs
        self.device = xs.device
        self.n_pool = xs.shape[0]
        self.all_columns = cols is None
        self.cols = (torch.arange(self.n_pool, device=self.device) if cols is None
                     else cols.to(self.device))
        self.xc = xs if cols is None else xs[self.cols].contiguous()
        self.n = self.xc.shape[0]
        self.e = scale_exp
        self.big = big_value(scale_exp)
        self.capacity = max(0, int(budget_bytes) // 8)
        self.cur = (torch.zeros(self.n, dtype=torch.float32, device=self.device) if cur is None
                    else cur.to(self.device, torch.float32).clone())
        self.theta = math.inf
        self.rows = _empty_rows(self.n_pool, self.device)
        self.dref = torch.zeros(self.n_pool, dtype=torch.float64, device=self.device)
        self.t0 = step
        self.step = step
        self._log_idx = torch.empty(0, dtype=torch.long, device=self.device)
        self._log_old = torch.empty(0, dtype=torch.float32, device=self.device)
        self._log_len = 0
        self._log_off: list[int] = [0]  # offset of step t0 + i
        self.ws = Workspace(self.device)
        self.selected = torch.zeros(self.n_pool, dtype=torch.bool, device=self.device)
        self._since_compact = 0
        self.stats = {"dense_pairs": 0, "sparse_terms": 0, "delta_groups": 0, "fresh_groups": 0,
                      "compactions": 0, "delta_pairs": 0}

    # -- masks -------------------------------------------------------------------------------
    def _uncovered(self) -> torch.Tensor:
        return (self.cur < self.theta).nonzero().flatten()

    def _cur_sparse(self) -> torch.Tensor:
        """cur for covered columns, BIG (terms 0) for uncovered ones."""
        return torch.where(self.cur >= self.theta, self.cur, torch.full_like(self.cur, self.big))

    def _cur_dense(self) -> torch.Tensor:
        """cur for uncovered columns, BIG for covered ones."""
        return torch.where(self.cur < self.theta, self.cur, torch.full_like(self.cur, self.big))

    # -- first pass ----------------------------------------------------------------------------
    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor:
        """Exact gains (float64 [C], scaled) of ``cand`` (sorted global ids) at the current state.

        Builds the sparse cache of pairs with scaled sim > ``theta`` within the
        budget; if the sample-based θ underestimated, retries with a higher θ.
        """
        cand = cand.to(self.device)
        while True:
            self.theta = theta
            try:
                return self._first_pass(cand)
            except _CacheFull:
                # Halve the kept fraction: raise θ to the median of what would have been kept.
                theta = self._raise_theta(theta)

    def _raise_theta(self, theta: float) -> float:
        idx = torch.linspace(0, self.n_pool - 1, min(64, self.n_pool), device=self.device).long()
        s = qsims(self.xs[idx], self.xc).flatten()
        kept = s[s > theta]
        if len(kept) < 2:
            return math.inf
        return float(kept.median())

    def _first_pass(self, cand: torch.Tensor) -> torch.Tensor:
        use_cache = math.isfinite(self.theta) and self.capacity > 0
        builder = _SparseBuilder(self.n_pool, self.capacity if use_cache else 0, self.device)
        # Symmetry halves the products; worth it even when some rows are no longer candidates.
        with gemm_threads(self.threads):
            if self.all_columns and 2 * len(cand) >= self.n_pool:
                dense = self._first_pass_symmetric(builder, use_cache)[cand]
            else:
                dense = self._first_pass_rows(cand, builder, use_cache)
        self.rows = builder.finish() if use_cache else _empty_rows(self.n_pool, self.device)
        self.dref[cand] = dense
        self._reset_log()
        return dense + self._sparse_part(cand)

    def _first_pass_rows(self, cand, builder, use_cache) -> torch.Tensor:
        curd = self._cur_dense()
        out = torch.zeros(len(cand), dtype=torch.float64, device=self.device)
        for i0 in range(0, len(cand), ROW_BLOCK):
            i1 = min(len(cand), i0 + ROW_BLOCK)
            xr = self.xs[cand[i0:i1]]
            chunks = []
            for j0 in range(0, self.n, COL_BLOCK):
                j1 = min(self.n, j0 + COL_BLOCK)
                s = qsims(xr, self.xc[j0:j1])
                out[i0:i1] += gain_sums(s, curd[j0:j1], ws=self.ws)
                if use_cache:
                    fl = flat_nonzero(s > self.theta)
                    builder.reserve(len(fl))
                    w = j1 - j0
                    chunks.append(((fl // w).int(), (fl % w + j0).int(), s.view(-1)[fl]))
            if use_cache:
                builder.add_block(cand[i0:i1], i1 - i0, chunks)
            if (i0 // ROW_BLOCK) % 8 == 7:
                trim_heap()
        return out

    def _first_pass_symmetric(self, builder, use_cache) -> torch.Tensor:
        n, b = self.n, SYM_BLOCK
        curd = self._cur_dense()
        out = torch.zeros(n, dtype=torch.float64, device=self.device)
        nb = -(-n // b)
        pending: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(nb)]
        for bi in range(nb):
            i0, i1 = bi * b, min(n, (bi + 1) * b)
            xi = self.xc[i0:i1]
            for bj in range(bi, nb):
                j0, j1 = bj * b, min(n, (bj + 1) * b)
                s = qsims(xi, self.xc[j0:j1])
                if use_cache:
                    m = s > self.theta
                    w, h = j1 - j0, i1 - i0
                    fl = flat_nonzero(m)
                    builder.reserve(len(fl) * (1 if bi == bj else 2))
                    pending[bi].append(((fl // w).int(), (fl % w + j0).int(), s.view(-1)[fl]))
                    if bj != bi:  # the mirrored entries, row-major for rows of block J
                        ft = flat_nonzero(m.T.contiguous())
                        jr, ic = ft // h, ft % h
                        pending[bj].append((jr.int(), (ic + i0).int(), s.view(-1)[ic * w + jr]))
                out[i0:i1] += gain_sums(s, curd[j0:j1], ws=self.ws)
                if bj != bi:
                    out[j0:j1] += s.sub_(curd[i0:i1, None]).clamp_(min=0).sum(0, dtype=torch.float64)
            if use_cache:
                builder.add_block(slice(i0, i1), i1 - i0, pending[bi])
            pending[bi] = []
            trim_heap()
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def _sparse_part(self, cand: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(cand), dtype=torch.float64, device=self.device)
        if self.rows.nnz == 0:
            return out
        cur_sp = self._cur_sparse()
        for a, b in self.rows.row_chunks(cand):
            lens, cols, vals = self.rows.gather(cand[a:b])
            self.stats["sparse_terms"] += len(vals)
            self._since_compact += len(vals)
            terms = (vals - torch.index_select(cur_sp, 0, cols)).clamp_(min=0)
            out[a:b] = segment_sums(terms, lens)
        return out

    def _maybe_compact(self) -> None:
        """Drop cache entries that can never contribute again (amortised: after reading 2·nnz terms).

        An entry (c, v, s) is dead once ``s ≤ cur_v``: cur only grows. (The row of
        a selected point dies entirely, since its sims are now part of cur.)
        """
        rows = self.rows
        nnz = rows.nnz
        if nnz < (1 << 16) or self._since_compact < 2 * nnz:
            return
        self._since_compact = 0
        new_indptr = torch.empty_like(rows.indptr)
        chunk = 1 << 22
        base, r_lo = 0, 0
        for lo in range(0, nnz, chunk):
            hi = min(nnz, lo + chunk)
            cols = rows.cols[lo:hi]
            alive = rows.vals[lo:hi] > torch.index_select(self.cur, 0, cols)
            kept_before = torch.cumsum(alive, 0)
            r_hi = int(torch.searchsorted(rows.indptr, hi))  # rows starting before hi
            p = rows.indptr[r_lo:r_hi] - lo
            new_indptr[r_lo:r_hi] = base + torch.where(
                p > 0, kept_before[(p - 1).clamp(min=0)], torch.zeros_like(p))
            r_lo = r_hi
            kc, kv = cols[alive], rows.vals[lo:hi][alive]
            rows.cols[base:base + len(kc)] = kc
            rows.vals[base:base + len(kv)] = kv
            base += len(kc)
        new_indptr[r_lo:] = base
        rows.indptr = new_indptr
        rows.cols = rows.cols[:base]
        rows.vals = rows.vals[:base]
        self.stats["compactions"] += 1
        trim_heap()

    def _reset_log(self) -> None:
        self.t0 = self.step
        self._log_len = 0
        self._log_off = [0]

    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Exact partial gains (float64 [B], scaled) of ``cand`` at the current step.

        ``tau`` [B]: the step at which each candidate was last evaluated (its
        dense part ``dref`` is exact at that step). A candidate whose change log
        since tau is shorter than the uncovered set is updated by delta, the
        others are recomputed over the uncovered columns (one product).
        """
        cand = cand.to(self.device)
        tau = tau.to(self.device)
        self._maybe_compact()
        dense = torch.zeros(len(cand), dtype=torch.float64, device=self.device)
        unc = self._uncovered()
        if len(unc):
            fresh = torch.ones(len(cand), dtype=torch.bool, device=self.device)
            taus, inverse = torch.unique(tau, return_inverse=True)
            deltas = []
            for gi, t in enumerate(taus.tolist()):
                lo, hi = self._log_range(int(t))
                if hi - lo < len(unc):
                    members = (inverse == gi).nonzero().flatten()
                    fresh[members] = False
                    deltas.append((lo, members))
            if deltas:
                self._delta(cand, deltas, dense)
            if bool(fresh.any()):
                members = fresh.nonzero().flatten()
                self.stats["fresh_groups"] += 1
                self.stats["dense_pairs"] += len(members) * len(unc)
                with gemm_threads(self.threads):
                    if len(unc) > 0.75 * self.n:  # nearly all columns: no gather, mask the rest
                        dense[members] = dense_gains(self.xs[cand[members]], self.xc,
                                                     self._cur_dense(), ws=self.ws)
                    else:
                        dense[members] = dense_gains(self.xs[cand[members]], self.xc,
                                                     self.cur[unc], unc, ws=self.ws)
        self.dref[cand] = dense
        return dense + self._sparse_part(cand)

    def _log_range(self, tau: int) -> tuple[int, float]:
        if tau < self.t0:
            return 0, math.inf
        return self._log_off[tau - self.t0], self._log_len

    def _delta(self, cand: torch.Tensor, deltas: list[tuple[int, torch.Tensor]],
               dense: torch.Tensor) -> None:
        """Dense part now = dense part at tau − the drop of the terms of columns changed since.

        ``deltas``: (log offset of tau, positions in ``cand``) per distinct tau.
        The columns changed since a later tau are a subset of those changed
        since an earlier one, so groups whose change sets differ by less than
        25% share one column gather and one matrix product over the larger set;
        each group applies its own running max at its tau (``a``), capped by the
        rise since (``cap``), and columns it has not seen change contribute 0.
        """
        hi = self._log_len
        deltas = sorted(deltas, key=lambda d: -d[0])  # smallest change set first
        bucket: list[tuple[int, torch.Tensor]] = []
        for lo, members in deltas:
            if hi == lo:  # nothing changed since tau
                dense[members] = self.dref[cand[members]]
                continue
            if bucket:
                first = hi - bucket[0][0]
                rows = sum(len(m) for _, m in bucket)
                if hi - lo > 1.25 * first and rows >= 64:
                    self._delta_bucket(cand, bucket, dense)
                    bucket = []
            bucket.append((lo, members))
        if bucket:
            self._delta_bucket(cand, bucket, dense)

    def _delta_bucket(self, cand: torch.Tensor, bucket: list[tuple[int, torch.Tensor]],
                      dense: torch.Tensor) -> None:
        hi = self._log_len
        lo_min = min(lo for lo, _ in bucket)
        changed = torch.unique(self._log_idx[lo_min:hi])  # sorted
        now = self.cur[changed]
        now_d = torch.where(now < self.theta, now, torch.full_like(now, self.big))
        groups, rows, r0 = [], [], 0
        for lo, members in bucket:
            # cur is non-decreasing, so cur at tau is the smallest old value logged since tau;
            # columns unchanged since tau keep now_d (cap 0: no contribution).
            a = now_d.clone()
            pos = torch.searchsorted(changed, self._log_idx[lo:hi])
            a.scatter_reduce_(0, pos, self._log_old[lo:hi], reduce="amin")
            groups.append((r0, r0 + len(members), a, now_d - a))
            rows.append(members)
            r0 += len(members)
        rows = torch.cat(rows)
        self.stats["delta_groups"] += 1
        self.stats["dense_pairs"] += len(rows) * len(changed)
        self.stats["delta_pairs"] += len(rows) * len(changed)
        with gemm_threads(self.threads):
            drop = dense_gains(self.xs[cand[rows]], self.xc, None, changed, ws=self.ws,
                               groups=groups)
        dense[rows] = self.dref[cand[rows]] - drop

    # -- selection -----------------------------------------------------------------------------
    def _row_sims(self, a: int, col_index: torch.Tensor | None) -> torch.Tensor:
        """Scaled sims of pool point ``a`` with the shard's columns (all, or ``col_index``)."""
        xa = self.xs[a:a + 1]
        if col_index is None:
            return torch.cat([qsims(xa, self.xc[j:j + COL_BLOCK])[0]
                              for j in range(0, self.n, COL_BLOCK)])
        return torch.cat([qsims(xa, self.xc[col_index[j:j + COL_BLOCK]])[0]
                          for j in range(0, len(col_index), COL_BLOCK)])

    def select(self, a: int) -> tuple[float, float]:
        """Add pool point ``a``: update cur. Returns (partial gain of a, partial Σ cur), scaled.

        Covered columns can only rise through a's sparse row; uncovered columns
        get a dense row (so late in a run a selection costs O(|row| + |W|·d)).
        """
        ups, news = [], []
        unc = self._uncovered()
        if len(unc):
            cols = None if len(unc) == self.n else unc
            s = self._row_sims(a, cols)
            cols = unc
            m = s > self.cur[cols]
            ups.append(cols[m])
            news.append(s[m])
        if self.rows.nnz:
            _, hc, hv = self.rows.gather(torch.tensor([a], device=self.device))
            hc = hc.long()
            m = (self.cur[hc] >= self.theta) & (hv > self.cur[hc])
            ups.append(hc[m])
            news.append(hv[m])
        up = torch.cat(ups) if ups else torch.empty(0, dtype=torch.long, device=self.device)
        new = torch.cat(news) if news else torch.empty(0, dtype=torch.float32, device=self.device)
        old = self.cur[up]
        gain = float((new - old).sum(dtype=torch.float64))  # new > old: integers
        logged = old < self.theta
        if bool(logged.any()):
            self._append_log(up[logged], old[logged])
        self.cur[up] = new
        self.selected[a] = True
        self.step += 1
        self._log_off.append(self._log_len)
        return gain, float(self.cur.sum(dtype=torch.float64))

    def _append_log(self, idx: torch.Tensor, old: torch.Tensor) -> None:
        need = self._log_len + len(idx)
        if need > len(self._log_idx):
            cap = max(need, 2 * len(self._log_idx), 1024)
            grown_idx = torch.empty(cap, dtype=torch.long, device=self.device)
            grown_old = torch.empty(cap, dtype=torch.float32, device=self.device)
            grown_idx[:self._log_len] = self._log_idx[:self._log_len]
            grown_old[:self._log_len] = self._log_old[:self._log_len]
            self._log_idx, self._log_old = grown_idx, grown_old
        self._log_idx[self._log_len:need] = idx
        self._log_old[self._log_len:need] = old
        self._log_len = need

    def cur_values(self) -> torch.Tensor:
        """The scaled running max of this shard's columns (float32 [n], a copy)."""
        return self.cur.clone()


# --------------------------------------------------------------------------------------------
# The greedy drivers (shard-agnostic)
# --------------------------------------------------------------------------------------------


class Shards(Protocol):
    """What the greedy driver needs from a set of column shards (local or Ray actors)."""

    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor: ...
    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor: ...
    def select(self, a: int) -> tuple[float, float]: ...
    def cur_values(self) -> np.ndarray: ...


class LocalShards:
    """Shards in this process (one for a plain single-process run)."""

    def __init__(self, shards: list[ColumnShard]):
        self.shards = shards

    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor:
        return sum(s.first_pass(cand, theta).cpu() for s in self.shards)

    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return sum(s.evaluate(cand, tau).cpu() for s in self.shards)

    def select(self, a: int) -> tuple[float, float]:
        parts = [s.select(a) for s in self.shards]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def cur_values(self) -> np.ndarray:
        return np.concatenate([s.cur_values().cpu().numpy() for s in self.shards])

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.stats.items():
                out[k] = out.get(k, 0) + v
        return out


@dataclass
class GreedyState:
    """Everything needed to continue a greedy run with the identical result.

    ``cur`` is the scaled running max (float32 [N], bit-exact); ``selected``,
    ``gains`` (marginal diversity gain, unscaled) and ``scores`` (f) per step.
    """

    selected: np.ndarray
    gains: np.ndarray
    scores: np.ndarray
    cur: np.ndarray
    scale_exp: int

    @property
    def step(self) -> int:
        return len(self.selected)


@dataclass
class GreedyResult:
    ranking: np.ndarray
    gains: np.ndarray  # d(a|A) at selection, unscaled
    scores: np.ndarray  # f(a|A, α) at selection
    cur: np.ndarray  # final scaled running max
    scale_exp: int
    stats: dict = field(default_factory=dict)

    def state(self) -> GreedyState:
        return GreedyState(self.ranking, self.gains, self.scores, self.cur, self.scale_exp)


StepCallback = Callable[[GreedyState], None]


def _score(g_scaled: torch.Tensor, q: torch.Tensor, alpha: float, n: int, e: int) -> torch.Tensor:
    """f = (1−α)·(g·2^−e)/N + α·q in float64 — monotone in g, so stale gains give upper bounds."""
    return (1.0 - alpha) * (g_scaled * 2.0 ** -e / n) + alpha * q


def _initial_state(state: GreedyState | None, n: int, e: int):
    if state is None or state.step == 0:
        return [], [], [], None
    if state.scale_exp != e or len(state.cur) != n:
        raise ValueError("checkpoint does not match this pool (size or scale differ)")
    return list(state.selected), list(state.gains), list(state.scores), torch.from_numpy(state.cur)


def lazy_greedy(shards: Shards, q: torch.Tensor, alpha: float, k: int, *, n_pool: int,
                scale_exp: int, theta: float, candidates: torch.Tensor | None = None,
                start: GreedyState | None = None, sample_size: int | None = None,
                seed: int = 0, callback: StepCallback | None = None,
                callback_every: int = 0, max_batch: int = 1024,
                short_size: int = 8192) -> GreedyResult:
    """Exact lazy greedy (``sample_size=None``) or stochastic greedy over ``shards``.

    ``q`` float64 [N] (normalised quality, zeros if unused), ``candidates`` the
    sorted global ids that may be selected (default: all). Stochastic greedy
    (``sample_size`` R) evaluates, at step t, a uniform sample of R remaining
    candidates drawn with ``np.random.default_rng([seed, t])`` — reproducible
    and resumable — and takes the sample's best f (lazily, with the same bounds).
    ``start`` continues a checkpointed run; ``callback(state)`` runs every
    ``callback_every`` steps. Ties are broken by the lower index, exactly as
    :func:`naive_greedy`.
    """
    cand = (torch.arange(n_pool) if candidates is None else candidates.cpu().long())
    sel, gains, scores, _ = _initial_state(start, n_pool, scale_exp)
    g = torch.full((n_pool,), -math.inf, dtype=torch.float64)
    active = torch.zeros(n_pool, dtype=torch.bool)
    active[cand] = True
    if sel:
        active[torch.as_tensor(sel)] = False
    remaining = cand[active[cand]]
    t_start = time.perf_counter()
    if len(remaining):
        g[remaining] = shards.first_pass(remaining, theta)
    t = len(sel)
    log.info("greedy: first pass over %d candidates x %d points in %.1f s (theta=%.3f)",
             len(remaining), n_pool, time.perf_counter() - t_start, theta * 2.0 ** -scale_exp)
    report_every, last_report = max(1, k // 20), time.perf_counter()  # ≤ 20 lines, ≥ 5 s apart
    tau = torch.full((n_pool,), t, dtype=torch.long)
    f = torch.where(active, _score(g, q, alpha, n_pool, scale_exp),
                    torch.tensor(-math.inf, dtype=torch.float64))
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    first_chunk = 16
    n_eval = 0
    # Shortlist: the top `short_size` bounds (sorted ids) and the largest bound outside it.
    # Bounds outside never change until the next rebuild (only shortlisted candidates are
    # evaluated or selected), so a fresh best that beats `outside` is the global argmax and
    # rounds cost O(short_size) instead of O(N).
    short, outside = None, math.inf
    while t < k:
        if sample_size is not None:
            pool = active.nonzero().flatten().numpy()
            if sample_size < len(pool):
                pool = np.sort(np.random.default_rng([seed, t]).choice(pool, sample_size, replace=False))
            view, outside = torch.from_numpy(pool), -math.inf
        # Lazy rounds. A stale bound can only matter if it beats the best fresh f so far
        # (or ties it with a lower index); evaluate those, largest bound first, in chunks
        # that double within a step. Stops when the argmax is fresh.
        chunk = first_chunk
        evals_this_step = 0
        while True:
            if sample_size is None:
                if short is None or float(f[short].max()) <= outside:
                    short, outside = _shortlist(f, short_size)
                view = short
            fv, tv = f[view], tau[view]
            i = int(torch.argmax(fv))
            if tv[i] == t and float(fv[i]) > outside:
                best = int(view[i])
                break
            fresh = tv == t
            fresh_f = torch.where(fresh, fv, neg_inf)
            j = int(torch.argmax(fresh_f))
            fstar, jstar = float(fresh_f[j]), int(view[j])
            stale_f = torch.where(fresh, neg_inf, fv)
            need = (stale_f > fstar) | ((stale_f == fstar) & (view < jstar))
            n_need = int(need.sum())
            if n_need == 0:  # everything in the shortlist is fresh but does not beat `outside`
                short = None
                continue
            top = torch.topk(torch.where(need, stale_f, neg_inf), min(chunk, n_need)).indices
            idx = torch.sort(view[top]).values
            g[idx] = shards.evaluate(idx, tau[idx])
            tau[idx] = t
            f[idx] = _score(g[idx], q[idx], alpha, n_pool, scale_exp)
            evals_this_step += len(idx)
            chunk = min(max_batch, 2 * chunk)
        n_eval += evals_this_step
        first_chunk = int(min(max_batch, max(8, evals_this_step // 2)))
        gain_s, _ = shards.select(best)
        sel.append(best)
        gains.append(gain_s * 2.0 ** -scale_exp)
        scores.append(float(f[best]))
        active[best] = False
        f[best] = -math.inf
        t += 1
        now = time.perf_counter()
        if t == k or (t % report_every == 0 and now - last_report >= 5.0):
            last_report = now
            log.info("greedy: %d/%d selected, %d evaluations, %.1f s", t, k, n_eval, now - t_start)
        if callback is not None and callback_every and (t % callback_every == 0) and t < k:
            callback(GreedyState(np.asarray(sel, dtype=np.int64), np.asarray(gains),
                                 np.asarray(scores), shards.cur_values(), scale_exp))
    stats = {"evaluations": n_eval}
    if hasattr(shards, "stats"):
        stats |= shards.stats()
    return GreedyResult(np.asarray(sel, dtype=np.int64), np.asarray(gains, dtype=np.float64),
                        np.asarray(scores, dtype=np.float64), shards.cur_values(), scale_exp, stats)


def _shortlist(f: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """(ids of the ``size`` largest finite bounds, sorted; the largest bound outside them).

    Ties at the cut go into the list whole, so "outside" is strictly below every
    bound that could tie with a shortlisted one.
    """
    finite = int(torch.isfinite(f).sum())
    if finite <= size:
        return torch.isfinite(f).nonzero().flatten(), -math.inf
    cut = float(torch.topk(f, size + 1).values[-1])
    inside = f >= cut
    outside = f.masked_fill(inside, -math.inf).max()
    return inside.nonzero().flatten(), float(outside)


def naive_greedy(xs: torch.Tensor, q: torch.Tensor, alpha: float, k: int, *, scale_exp: int,
                 candidates: torch.Tensor | None = None, start: GreedyState | None = None,
                 callback: StepCallback | None = None, callback_every: int = 0) -> GreedyResult:
    """The textbook greedy: every step recomputes every remaining candidate's gain densely.

    O(K·N²·d) — the reference the fast optimizers are tested against. Same
    kernels and tie-breaking (lowest index among equal f) as :func:`lazy_greedy`.
    """
    n = xs.shape[0]
    shard = ColumnShard(xs, None, scale_exp, budget_bytes=0)
    sel, gains, scores, cur = _initial_state(start, n, scale_exp)
    if cur is not None:
        shard.cur = cur.to(xs.device).clone()
    active = torch.zeros(n, dtype=torch.bool)
    active[torch.arange(n) if candidates is None else candidates.cpu().long()] = True
    if sel:
        active[torch.as_tensor(sel)] = False
    qd = q.to(torch.float64)
    for t in range(len(sel), k):
        idx = active.nonzero().flatten()
        g = dense_gains(xs[idx.to(xs.device)], shard.xc, shard.cur).cpu()
        f = _score(g, qd[idx], alpha, n, scale_exp)
        i = int(torch.argmax(f))
        best = int(idx[i])
        gain_s, _ = shard.select(best)
        sel.append(best)
        gains.append(gain_s * 2.0 ** -scale_exp)
        scores.append(float(f[i]))
        active[best] = False
        if callback is not None and callback_every and ((t + 1) % callback_every == 0) and t + 1 < k:
            callback(GreedyState(np.asarray(sel, dtype=np.int64), np.asarray(gains),
                                 np.asarray(scores), shard.cur.cpu().numpy().copy(), scale_exp))
    return GreedyResult(np.asarray(sel, dtype=np.int64), np.asarray(gains, dtype=np.float64),
                        np.asarray(scores, dtype=np.float64), shard.cur.cpu().numpy().copy(),
                        scale_exp)


def stochastic_sample_size(n: int, k: int, epsilon: float) -> int:
    """``⌈(N/K)·ln(1/ε)⌉`` (Mirzasoleiman et al., "Lazier than lazy greedy")."""
    return max(1, math.ceil(n / k * math.log(1.0 / epsilon)))


# --------------------------------------------------------------------------------------------
# Objective of a given ranking (one shared function for every method and baseline)
# --------------------------------------------------------------------------------------------


def ranking_gains(xs: torch.Tensor, ranking: np.ndarray, scale_exp: int,
                  chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Marginal gains d(a_t|A_{t−1}) (unscaled) along ``ranking`` and the final scaled cur.

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
            gains[c0 + i] = float((s - cur).clamp_(min=0).sum(dtype=torch.float64)) * 2.0 ** -scale_exp
            torch.maximum(cur, s, out=cur)
    return gains, cur.cpu().numpy()


def diversity_from_cur(cur_scaled: np.ndarray, scale_exp: int) -> float:
    """d(A)/N = mean_v max(0, max_a sim(a, v)) from the scaled running max (float64)."""
    return float(np.asarray(cur_scaled, dtype=np.float64).sum() * 2.0 ** -scale_exp / len(cur_scaled))


# --------------------------------------------------------------------------------------------
# GreeDi (Mirzasoleiman et al. 2013): pure parts
# --------------------------------------------------------------------------------------------


def greedi_partitions(n: int, m: int, seed: int) -> list[np.ndarray]:
    """A seeded random split of ``range(n)`` into ``m`` parts of near-equal size (each sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, m) if len(p)]


def greedi_union(picks: Sequence[np.ndarray]) -> np.ndarray:
    """The sorted union of the per-partition selections (round 2's candidates)."""
    return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in picks]))
