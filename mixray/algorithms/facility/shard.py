"""A column shard: the running max of some pool points and everything needed to evaluate gains.

A single-process run has one shard owning every column; the sharded greedy
gives each Ray actor one shard; the total gain of a candidate is the sum over
shards. All methods return float64 sums in scaled units (exact integers).
Assumes valid input (validated at the public boundary).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mixray.algorithms import fused
from mixray.algorithms.cores import resolve_threads
from mixray.algorithms.facility.cache import (
    CacheFull,
    SparseBuilder,
    SparseRows,
    raise_threshold,
)
from mixray.algorithms.facility.kernels import (
    BIG,
    COL_BLOCK,
    ROW_BLOCK,
    SYM_BLOCK,
    Workspace,
    dense_gains,
    flat_nonzero,
    gain_sums,
    qsims,
    segment_sums,
)
from mixray.algorithms.fused import kernel_threads
from mixray.algorithms.threads import gemm_threads, trim_heap

VIEW_FILL = 0.75  # re-gather the uncovered columns once they fill less of the copy than this


class ChangeLog:
    """The columns whose running max rose below θ at each step since ``t0``, with their old values.

    ``since(tau)`` gives the log range of the changes after step ``tau``; a
    candidate last evaluated at ``tau`` is brought up to date with those columns.
    """

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.idx = torch.empty(0, dtype=torch.long, device=device)
        self.old = torch.empty(0, dtype=torch.float32, device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.t0, self.len, self.off = step, 0, [0]  # off[i]: log length at step t0 + i

    def since(self, tau: int) -> tuple[int, float]:
        """(lo, hi): the log entries written after step ``tau`` (everything: (0, inf) before t0)."""
        if tau < self.t0:
            return 0, math.inf
        return self.off[tau - self.t0], self.len

    def append(self, idx: torch.Tensor, old: torch.Tensor) -> None:
        need = self.len + len(idx)
        if need > len(self.idx):
            cap = max(need, 2 * len(self.idx), 1024)
            grown_idx = torch.empty(cap, dtype=torch.long, device=self.device)
            grown_old = torch.empty(cap, dtype=torch.float32, device=self.device)
            grown_idx[:self.len] = self.idx[:self.len]
            grown_old[:self.len] = self.old[:self.len]
            self.idx, self.old = grown_idx, grown_old
        self.idx[self.len:need] = idx
        self.old[self.len:need] = old
        self.len = need

    def end_step(self) -> None:
        self.off.append(self.len)


class ColumnShard:
    """The state of a set of pool points ("columns") and the gains they contribute.

    ``xs`` [N, d] are the scaled embeddings of the whole pool (any point can be a
    candidate); ``cols`` (sorted global ids, ``None`` = all) the points this shard
    owns; ``budget_bytes`` bounds its sparse cache; ``cur``/``step`` resume a run;
    ``threads``: torch threads for the matrix products (None: leave as is).
    """

    def __init__(self, xs: torch.Tensor, cols: torch.Tensor | None, budget_bytes: int = 256 << 20,
                 cur: torch.Tensor | None = None, step: int = 0, threads: int | None = None):
        self.threads = threads
        self.kernel_threads = resolve_threads(threads)  # the fused (numba) kernels' threads
        self.xs, self.device, self.n_pool = xs, xs.device, xs.shape[0]
        self.all_columns = cols is None
        self.cols = (torch.arange(self.n_pool, device=self.device) if cols is None
                     else cols.to(self.device))
        self.xc = xs if cols is None else xs[self.cols].contiguous()
        self.n = self.xc.shape[0]
        self.capacity = max(0, int(budget_bytes) // 8)
        self.cur = (torch.zeros(self.n, dtype=torch.float32, device=self.device) if cur is None
                    else cur.to(self.device, torch.float32).clone())
        self.theta = math.inf
        self.rows = SparseRows.empty(self.n_pool, self.device)
        self.dref = torch.zeros(self.n_pool, dtype=torch.float64, device=self.device)
        self.step = step
        self.log = ChangeLog(self.device, step)
        self.ws = Workspace(self.device)
        self.selected = torch.zeros(self.n_pool, dtype=torch.bool, device=self.device)
        self._since_compact = 0
        self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None  # see _dense_view
        self.stats = {"dense_pairs": 0, "sparse_terms": 0, "delta_groups": 0, "fresh_groups": 0,
                      "compactions": 0, "delta_pairs": 0, "view_gathers": 0}

    # -- masks -------------------------------------------------------------------------------
    def _uncovered(self) -> torch.Tensor:
        return (self.cur < self.theta).nonzero().flatten()

    def _cur_sparse(self) -> torch.Tensor:
        """cur for covered columns, BIG (terms 0) for uncovered ones."""
        return torch.where(self.cur >= self.theta, self.cur, torch.full_like(self.cur, BIG))

    def _cur_dense(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """cur for uncovered columns, BIG for covered ones: all ``n`` columns, or only ``ids``."""
        cur = self.cur if ids is None else self.cur[ids]
        return torch.where(cur < self.theta, cur, torch.full_like(cur, BIG))

    def _dense_view(self, n_unc: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(embeddings [w, d] of a superset of the uncovered columns, their shard-local ids
        [w] or None for all ``n`` columns, their cur [w] with BIG for the covered ones).

        A column never becomes uncovered again (cur only grows, θ is fixed after the first
        pass), so a compact copy of the columns that were uncovered stays a superset. It
        is gathered again once the ``n_unc`` uncovered columns fill less than
        ``VIEW_FILL`` of it (O(log n) gathers per run, each column kept at most
        1/VIEW_FILL times over). Products over it stream contiguous rows instead of
        gathering the uncovered columns on every evaluation — 2–3x faster for the
        skinny products of late and stochastic steps; sims and gains are bit-identical
        (padded products, integer sums). The copy costs at most VIEW_FILL·n·d floats (the old
        copy is released before the new one is gathered).
        """
        width = self.n if self._view is None else len(self._view[1])
        if n_unc < VIEW_FILL * width:
            ids = self._uncovered()
            self._view = None  # gathered from xc: drop the old copy first (no two at once)
            trim_heap()  # and the blocks that the products' worker threads freed since
            self._view = (self.xc[ids].contiguous(), ids)
            self.stats["view_gathers"] += 1
        if self._view is None:
            return self.xc, None, self._cur_dense()
        x, ids = self._view
        return x, ids, self._cur_dense(ids)  # mask the copy's columns only, not all n

    # -- first pass ----------------------------------------------------------------------------
    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor:
        """Exact gains (float64 [C], scaled) of ``cand`` (sorted global ids) at the current state.

        Builds the sparse cache of pairs with scaled sim > ``theta`` within the
        budget; if the sample-based θ underestimated, retries with a higher θ.
        """
        cand = cand.to(self.device)
        self._view = None  # a new θ: the uncovered set changes
        while True:
            self.theta = theta
            try:
                # torch's threads first: set inside a kernel_threads context, the products
                # measured single-threaded (2 threads reported, 1 CPU busy; numba's omp layer).
                with gemm_threads(self.threads), kernel_threads(self.kernel_threads):
                    return self._first_pass(cand)
            except CacheFull:
                theta = raise_threshold(self.xs, self.xc, theta)

    def _first_pass(self, cand: torch.Tensor) -> torch.Tensor:
        use_cache = math.isfinite(self.theta) and self.capacity > 0
        builder = SparseBuilder(self.n_pool, self.capacity if use_cache else 0, self.device)
        # Symmetry halves the products; worth it even when some rows are no longer candidates.
        if self.all_columns and 2 * len(cand) >= self.n_pool:
            dense = self._first_pass_symmetric(builder, use_cache)[cand]
        else:
            dense = self._first_pass_rows(cand, builder, use_cache)
        self.rows = builder.finish() if use_cache else SparseRows.empty(self.n_pool, self.device)
        self.dref[cand] = dense
        self.log.reset(self.step)
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
                if s.device.type == "cpu":  # gains and cache entries in one fused pass
                    entries = self._scan(s, curd[j0:j1], None, out[i0:i1], None, use_cache, j0)
                    if entries is not None:
                        builder.reserve(len(entries[0]))
                        chunks.append(entries)
                    continue
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
        """Every block S_IJ (J ≥ I) gives the gains of rows I over columns J and of rows J over I."""
        n, b = self.n, SYM_BLOCK
        curd = self._cur_dense()
        out = torch.zeros(n, dtype=torch.float64, device=self.device)
        nb = -(-n // b)
        pending: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(nb)]
        for bi in range(nb):
            i0, i1 = bi * b, min(n, (bi + 1) * b)
            for bj in range(bi, nb):
                j0, j1 = bj * b, min(n, (bj + 1) * b)
                s = qsims(self.xc[i0:i1], self.xc[j0:j1])
                if s.device.type == "cpu":  # gains both ways and cache entries in one fused pass
                    mirror = out[j0:j1] if bj != bi else None
                    entries = self._scan(s, curd[j0:j1], curd[i0:i1], out[i0:i1], mirror,
                                         use_cache, j0)
                    if entries is not None:
                        builder.reserve(len(entries[0]) * (1 if bi == bj else 2))
                        pending[bi].append(entries)
                        if bj != bi:
                            mirrored = fused.mirror_entries(*(e.numpy() for e in entries), j1 - j0,
                                                            j0, i0)
                            pending[bj].append(tuple(torch.from_numpy(a) for a in mirrored))
                    continue
                if use_cache:
                    self._cache_block(s, builder, pending, bi, bj, i0, j0)
                out[i0:i1] += gain_sums(s, curd[j0:j1], ws=self.ws)
                if bj != bi:
                    out[j0:j1] += gain_sums(s, curd[i0:i1, None], dim=0, ws=self.ws)
            if use_cache:
                builder.add_block(slice(i0, i1), i1 - i0, pending[bi])
            pending[bi] = []
            trim_heap()
        return out

    def _scan(self, s: torch.Tensor, cur_cols: torch.Tensor, cur_rows: torch.Tensor | None,
              row_out: torch.Tensor, col_out: torch.Tensor | None, use_cache: bool, j0: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """CPU: ``row_out += `` the block's row gains (and ``col_out +=`` its column gains over
        ``cur_rows``), in one fused pass; returns its cache entries (row-major) if caching."""
        h, w = s.shape
        if self._scratch is None or len(self._scratch[0]) < h * w:
            self._scratch = (np.empty(h * w, dtype=np.int32), np.empty(h * w, dtype=np.float32),
                             np.empty(max(h, SYM_BLOCK, ROW_BLOCK), dtype=np.int64))
        ent_cols, ent_vals, counts = self._scratch
        parts = np.zeros((2 * self.kernel_threads if col_out is not None else 1, w))
        theta = np.float32(self.theta if use_cache else math.inf)  # as torch compares float32
        with kernel_threads(self.kernel_threads, chunk=1):  # one part per iteration
            fused.scan_block(s.numpy(), theta, cur_cols.numpy(),
                             (cur_rows if cur_rows is not None else cur_cols[:0]).numpy(),
                             row_out.numpy(), parts, ent_cols, ent_vals, counts[:h],
                             col_out is not None)
        if col_out is not None:
            col_out += torch.from_numpy(parts.sum(0))
        if not use_cache:
            return None
        return tuple(torch.from_numpy(a) for a in fused.collect_entries(counts[:h], ent_cols,
                                                                         ent_vals, w, j0))

    def _cache_block(self, s: torch.Tensor, builder: SparseBuilder, pending: list, bi: int, bj: int,
                     i0: int, j0: int) -> None:
        """Queue the entries > θ of block S_IJ for rows I and, mirrored, for rows J."""
        h, w = s.shape
        m = s > self.theta
        fl = flat_nonzero(m)
        builder.reserve(len(fl) * (1 if bi == bj else 2))
        pending[bi].append(((fl // w).int(), (fl % w + j0).int(), s.view(-1)[fl]))
        if bj != bi:  # the mirrored entries, row-major for rows of block J
            ft = flat_nonzero(m.T.contiguous())
            jr, ic = ft // h, ft % h
            pending[bj].append((jr.int(), (ic + i0).int(), s.view(-1)[ic * w + jr]))

    # -- evaluation ----------------------------------------------------------------------------
    def _sparse_part(self, cand: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(cand), dtype=torch.float64, device=self.device)
        if self.rows.nnz == 0:
            return out
        cur_sp = self._cur_sparse()
        if self.device.type == "cpu":  # one fused pass over the rows' entries
            rows = cand.long().contiguous()
            n_terms = fused.csr_row_gains(self.rows.indptr.numpy(), self.rows.cols.numpy(),
                                          self.rows.vals.numpy(), rows.numpy(), cur_sp.numpy(),
                                          out.numpy())
            self.stats["sparse_terms"] += int(n_terms)
            self._since_compact += int(n_terms)
            return out
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
        if self.device.type == "cpu":
            indptr = rows.indptr.clone()
            nnz = fused.csr_compact(indptr.numpy(), rows.cols.numpy(), rows.vals.numpy(),
                                    self.cur.numpy())
            rows.indptr, rows.cols, rows.vals = indptr, rows.cols[:nnz], rows.vals[:nnz]
            self.stats["compactions"] += 1
            return
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
        rows.indptr, rows.cols, rows.vals = new_indptr, rows.cols[:base], rows.vals[:base]
        self.stats["compactions"] += 1
        trim_heap()

    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Exact partial gains (float64 [B], scaled) of ``cand`` at the current step.

        ``tau`` [B]: the step at which each candidate was last evaluated (its
        dense part ``dref`` is exact at that step). A candidate whose change log
        since tau is shorter than the uncovered set is updated by delta, the
        others are recomputed over the uncovered columns (one product).
        """
        with kernel_threads(self.kernel_threads):
            return self._evaluate(cand, tau)

    def _evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        cand, tau = cand.to(self.device), tau.to(self.device)
        self._maybe_compact()
        dense = torch.zeros(len(cand), dtype=torch.float64, device=self.device)
        unc = self._uncovered()
        if len(unc):
            fresh = torch.ones(len(cand), dtype=torch.bool, device=self.device)
            taus, inverse = torch.unique(tau, return_inverse=True)
            deltas = []
            for gi, t in enumerate(taus.tolist()):
                lo, hi = self.log.since(int(t))
                if hi - lo < len(unc):
                    members = (inverse == gi).nonzero().flatten()
                    fresh[members] = False
                    deltas.append((lo, members))
            if deltas:
                self._delta(cand, deltas, dense)
            if bool(fresh.any()):
                self._recompute(cand, fresh.nonzero().flatten(), len(unc), dense)
        self.dref[cand] = dense
        return dense + self._sparse_part(cand)

    def _recompute(self, cand: torch.Tensor, members: torch.Tensor, n_unc: int,
                   dense: torch.Tensor) -> None:
        """Dense part of ``cand[members]`` over the uncovered columns, from scratch."""
        x, _, curd = self._dense_view(n_unc)
        self.stats["fresh_groups"] += 1
        self.stats["dense_pairs"] += len(members) * len(x)
        with gemm_threads(self.threads):
            dense[members] = dense_gains(self.xs[cand[members]], x, curd, ws=self.ws,
                                         workers=self.kernel_threads)

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
        hi = self.log.len
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
        hi = self.log.len
        lo_min = min(lo for lo, _ in bucket)
        changed = torch.unique(self.log.idx[lo_min:hi])  # sorted
        now = self.cur[changed]
        now_d = torch.where(now < self.theta, now, torch.full_like(now, BIG))
        groups, rows, r0 = [], [], 0
        for lo, members in bucket:
            # cur is non-decreasing, so cur at tau is the smallest old value logged since tau;
            # columns unchanged since tau keep now_d (cap 0: no contribution).
            a = now_d.clone()
            pos = torch.searchsorted(changed, self.log.idx[lo:hi])
            a.scatter_reduce_(0, pos, self.log.old[lo:hi], reduce="amin")
            groups.append((r0, r0 + len(members), a, now_d - a))
            rows.append(members)
            r0 += len(members)
        rows = torch.cat(rows)
        self.stats["delta_groups"] += 1
        self.stats["dense_pairs"] += len(rows) * len(changed)
        self.stats["delta_pairs"] += len(rows) * len(changed)
        with gemm_threads(self.threads):
            drop = dense_gains(self.xs[cand[rows]], self.xc, None, changed, ws=self.ws,
                               groups=groups, workers=self.kernel_threads)
        dense[rows] = self.dref[cand[rows]] - drop

    # -- selection -----------------------------------------------------------------------------
    def _rises(self, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns whose running max ``a`` raises, their new values).

        Covered columns can only rise through a's sparse row; uncovered columns
        get a dense row (so late in a run a selection costs O(|row| + |W|·d)).
        """
        ups, news = [], []
        n_unc = int((self.cur < self.theta).sum())
        if n_unc:
            x, ids, curd = self._dense_view(n_unc)
            xa = self.xs[a:a + 1]
            s = torch.cat([qsims(xa, x[j:j + COL_BLOCK])[0] for j in range(0, len(x), COL_BLOCK)])
            hit = (s > curd).nonzero().flatten()  # never a covered column (BIG)
            ups.append(hit if ids is None else ids[hit])
            news.append(s[hit])
        if self.rows.nnz:
            _, hc, hv = self.rows.gather(torch.tensor([a], device=self.device))
            hc = hc.long()
            m = (self.cur[hc] >= self.theta) & (hv > self.cur[hc])
            ups.append(hc[m])
            news.append(hv[m])
        up = torch.cat(ups) if ups else torch.empty(0, dtype=torch.long, device=self.device)
        new = torch.cat(news) if news else torch.empty(0, dtype=torch.float32, device=self.device)
        return up, new

    def select(self, a: int) -> tuple[float, float]:
        """Add pool point ``a``: update cur. Returns (partial gain of a, partial Σ cur), scaled."""
        up, new = self._rises(a)
        old = self.cur[up]
        gain = float((new - old).sum(dtype=torch.float64))  # new > old: integers
        logged = old < self.theta
        if bool(logged.any()):
            self.log.append(up[logged], old[logged])
        self.cur[up] = new
        self.selected[a] = True
        self.step += 1
        self.log.end_step()
        return gain, float(self.cur.sum(dtype=torch.float64))

    def cur_values(self) -> torch.Tensor:
        """The scaled running max of this shard's columns (float32 [n], a copy)."""
        return self.cur.clone()
