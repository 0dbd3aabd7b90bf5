"""Fused CPU kernels (numba) for facility location's gain sums and KMeans's nearest two
centres: one pass over memory where torch needs several.

A gain term is ``max(0, s − cur)`` with ``s`` and ``cur`` integer-valued float32
(the 2^-22 grid, see the package docstring): the difference is exact in float32
and every partial sum is an integer below 2^53, so the float64 sums below are
exact in any order — bit-identical to the torch kernels of
:mod:`mixray.algorithms.facility.kernels`, whatever the vectorisation or the
thread split (which is why reassociation is allowed).

Why: torch evaluates ``(s − cur).clamp_(min=0).sum(dtype=float64)`` as three
passes, two of which write a temporary; the float64-accumulating sum alone ran
at ~3.4 ns per element on this project's 2-core machine, the fused loop at
~0.3 ns (memory-bound). Shapes are noted per kernel; all arrays are C-contiguous
numpy views of CPU tensors (``tensor.numpy()`` shares memory).

Threads: the ``prange`` loops run on numba's thread pool; :func:`kernel_threads`
sets its size per call site (the greedy's ``threads``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange


def _cache_probe() -> int:  # pragma: no cover - compiled
    return 0


def _can_cache() -> bool:
    """Compiled kernels are cached on disk (next to this file, or numba's user cache directory,
    or ``NUMBA_CACHE_DIR``) so a process compiles them once per machine, not once per process.
    When none is writable (a read-only image without a home), numba would refuse to define a
    cached function: compile in every process instead (a few seconds)."""
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError:
        return False
    return True


# Reassociation only (what vectorises the sums; exact here): not the no-inf/no-nan flags,
# under which a comparison with inf would be undefined.
_JIT = {"cache": _can_cache(), "nogil": True, "fastmath": {"reassoc", "nsz"}}
# KMeans's int8 screen also lets LLVM turn its minima into vector min instructions (no NaN
# reaches it: the points and centres are checked finite) and fuse multiply-adds: its error
# bound covers any rounding order.
_JIT_SCREEN = {**_JIT, "fastmath": {"reassoc", "nsz", "nnan", "contract"}}


class kernel_threads:
    """Context: run the enclosed numba kernels on ``n`` threads (None: leave as is), handing out
    the iterations of a ``prange`` in chunks of ``chunk`` (dynamic scheduling).

    With numba's default even split, a parallel loop waits for its slowest thread; on cores
    shared with other processes that is a descheduled one, and the loop takes as long as the
    OS takes to run it again. Chunks let the running thread take the rest: 10K/1K selection
    under 8 CPU hogs on 2 cores slowed 5.8× with the even split, 3.7× with chunks of 4 rows.
    """

    def __init__(self, n: int | None, chunk: int = 4):
        self.n = None if n is None else max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
        self.chunk_size = chunk

    def __enter__(self):
        self.before = numba.get_num_threads()
        if self.n and self.n != self.before:
            numba.set_num_threads(self.n)
        self.chunk = numba.set_parallel_chunksize(self.chunk_size)
        return self

    def __exit__(self, *exc):
        numba.set_parallel_chunksize(self.chunk)
        if numba.get_num_threads() != self.before:
            numba.set_num_threads(self.before)


_CONCURRENT: bool | None = None


def concurrent_launches_ok() -> bool:
    """Whether parallel kernels may be launched from several Python threads at once: yes on
    numba's ``omp`` and ``tbb`` threading layers, no on its fallback ``workqueue`` (which aborts
    the process). Launches one tiny kernel the first time, so that numba picks its layer."""
    global _CONCURRENT
    if _CONCURRENT is None:
        block_row_gains(np.zeros((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1))
        _CONCURRENT = numba.threading_layer() in ("omp", "tbb")
    return _CONCURRENT


@njit(parallel=True, **_JIT)
def row_gains(s, rows, cur, out):  # pragma: no cover - compiled
    """``out[i] = Σ_v max(0, s[rows[i], v] − cur[v])``.

    ``s`` float32 [R, n] (a similarity matrix), ``rows`` int64 [r] (row ids of
    ``s``), ``cur`` float32 [n], ``out`` float64 [r] (overwritten).
    """
    n = s.shape[1]
    for i in prange(rows.shape[0]):
        r = rows[i]
        acc = 0.0
        for v in range(n):
            d = s[r, v] - cur[v]
            acc += max(d, np.float32(0.0))
        out[i] = acc


@njit(parallel=True, **_JIT)
def block_row_gains(s, cur, out):  # pragma: no cover - compiled
    """``out[i] += Σ_j max(0, s[i, j] − cur[j])`` (``s`` float32 [r, c], ``cur`` [c], ``out`` float64 [r])."""
    c = s.shape[1]
    for i in prange(s.shape[0]):
        acc = 0.0
        for j in range(c):
            d = s[i, j] - cur[j]
            acc += max(d, np.float32(0.0))
        out[i] += acc


@njit(parallel=True, **_JIT)
def block_row_drops(s, cur, cap, out):  # pragma: no cover - compiled
    """``out[i] += Σ_j min(max(0, s[i, j] − cur[j]), cap[j])`` (the drop of a delta update;
    shapes as :func:`block_row_gains`, ``cap`` float32 [c])."""
    c = s.shape[1]
    for i in prange(s.shape[0]):
        acc = 0.0
        for j in range(c):
            d = max(s[i, j] - cur[j], np.float32(0.0))
            acc += min(d, cap[j])
        out[i] += acc


@njit(parallel=True, **_JIT)
def block_col_sums(s, cur_rows, cap_rows, c0, c1, capped, out):  # pragma: no cover - compiled
    """``out[j − c0] += Σ_i t(s[i, j] − cur_rows[i])`` for ``j`` in ``[c0, c1)``, ``i <
    len(cur_rows)``, with ``t(x) = max(0, x)`` or, when ``capped``, ``min(max(0, x), cap_rows[i])``.

    The gains (or drops) of a block's columns over its rows: a transposed block of the lazy
    greedy (``columns × candidates``, a padded product, padding outside the ranges) or
    :func:`~mixray.algorithms.facility.kernels.gain_sums` along ``dim=0``. ``s`` float32
    [h ≥ len(cur_rows), w ≥ c1]; ``cur_rows``, ``cap_rows`` float32 [n] (``cap_rows`` unused
    unless ``capped``); ``out`` float64 [c1 − c0].
    """
    n = cur_rows.shape[0]
    width = 64
    for b in prange((c1 - c0 + width - 1) // width):
        j0 = c0 + b * width
        m = min(c1, j0 + width) - j0
        acc = np.zeros(m, dtype=np.float64)
        for i in range(n):
            ci = cur_rows[i]
            row = s[i, j0:j0 + m]  # a slice, not s[i, j]: the loop below then vectorises (4-10x)
            if capped:
                cap = cap_rows[i]
                for j in range(m):
                    acc[j] += min(max(row[j] - ci, np.float32(0.0)), cap)
            else:
                for j in range(m):
                    acc[j] += max(row[j] - ci, np.float32(0.0))
        for j in range(m):
            out[j0 - c0 + j] += acc[j]


@njit(parallel=True, **_JIT)
def csr_row_gains(indptr, cols, vals, rows, cur, out):  # pragma: no cover - compiled
    """``out[i] = Σ_{e ∈ row rows[i]} max(0, vals[e] − cur[cols[e]])`` over CSR rows.

    ``indptr`` int64 [R+1], ``cols`` int32 [nnz], ``vals`` float32 [nnz],
    ``rows`` int64 [r], ``cur`` float32 [n] (indexed by ``cols``), ``out`` float64 [r].
    Returns the number of entries read.
    """
    total = 0
    for i in prange(rows.shape[0]):
        r = rows[i]
        acc = 0.0
        for e in range(indptr[r], indptr[r + 1]):
            acc += max(vals[e] - cur[cols[e]], np.float32(0.0))
        out[i] = acc
        total += indptr[r + 1] - indptr[r]
    return total


@njit(**_JIT)
def csr_compact(indptr, cols, vals, cur):  # pragma: no cover - compiled
    """Drop the entries with ``vals[e] ≤ cur[cols[e]]`` in place; return the new nnz.

    ``indptr`` int64 [R+1] is rewritten; ``cols``/``vals`` keep their first nnz
    entries (row order and within-row order unchanged).
    """
    w = 0
    start = indptr[0]
    for r in range(indptr.shape[0] - 1):
        end = indptr[r + 1]
        for e in range(start, end):
            if vals[e] > cur[cols[e]]:
                cols[w] = cols[e]
                vals[w] = vals[e]
                w += 1
        start = end
        indptr[r + 1] = w
    return w


@njit(**_JIT)
def place_rows(rows, cols, vals, n_rows, out_cols, out_vals, fill):  # pragma: no cover - compiled
    """Stable counting sort of entries by local row into ``out_*[fill:]``; returns the per-row
    counts (int64 [n_rows]). ``rows`` int32 [m] local row ids (entries of one row keep their order)."""
    counts = np.zeros(n_rows, dtype=np.int64)
    for e in range(rows.shape[0]):
        counts[rows[e]] += 1
    pos = np.empty(n_rows, dtype=np.int64)
    p = fill
    for r in range(n_rows):
        pos[r] = p
        p += counts[r]
    for e in range(rows.shape[0]):
        r = rows[e]
        d = pos[r]
        out_cols[d] = cols[e]
        out_vals[d] = vals[e]
        pos[r] = d + 1
    return counts


@njit(parallel=True, **_JIT)
def scan_block(s, theta, cur_cols, cur_rows, row_gain, col_parts, ent_cols, ent_vals,
               counts, mirror):  # pragma: no cover - compiled
    """One pass over a block of the symmetric first pass: both gain sums and the cache entries.

    ``s`` float32 [h, w] (rows I × columns J), ``cur_cols`` [w], ``cur_rows`` [h] float32.
    ``row_gain[i] += Σ_j max(0, s[i, j] − cur_cols[j])`` (float64 [h]); with ``mirror``
    the column gains ``Σ_i max(0, s[i, j] − cur_rows[i])`` go to ``col_parts`` (float64
    [P, w], zeroed by the caller; one row per chunk of rows, to be summed). The entries
    ``s[i, j] > theta`` of row i are written to ``ent_cols[i·w:]`` (local j, int32) and
    ``ent_vals[i·w:]`` in column order, their number to ``counts[i]`` (int64 [h]).
    """
    h, w = s.shape
    parts = col_parts.shape[0]
    for p in prange(parts):
        acc = col_parts[p]
        for i in range(p * h // parts, (p + 1) * h // parts):
            ci = cur_rows[i] if mirror else np.float32(0.0)
            rg = 0.0
            c = 0
            base = i * w
            # three tight loops over the row (in L1), so the two sums vectorise
            for j in range(w):
                rg += max(s[i, j] - cur_cols[j], np.float32(0.0))
            if mirror:
                for j in range(w):
                    acc[j] += max(s[i, j] - ci, np.float32(0.0))
            for j in range(w):
                v = s[i, j]
                if v > theta:
                    ent_cols[base + c] = j
                    ent_vals[base + c] = v
                    c += 1
            row_gain[i] += rg
            counts[i] = c


@njit(**_JIT)
def collect_entries(counts, ent_cols, ent_vals, w, col0):  # pragma: no cover - compiled
    """The entries :func:`scan_block` left per row, packed row-major: (local rows int32,
    columns ``col0 + j`` int32, values float32)."""
    h = counts.shape[0]
    nnz = 0
    for i in range(h):
        nnz += counts[i]
    rows = np.empty(nnz, dtype=np.int32)
    cols = np.empty(nnz, dtype=np.int32)
    vals = np.empty(nnz, dtype=np.float32)
    p = 0
    for i in range(h):
        base = i * w
        for c in range(counts[i]):
            rows[p] = i
            cols[p] = col0 + ent_cols[base + c]
            vals[p] = ent_vals[base + c]
            p += 1
    return rows, cols, vals


@njit(**_JIT)
def mirror_entries(rows, cols, vals, w, col0, row0):  # pragma: no cover - compiled
    """Row-major entries (local row i, column ``col0 + j``) of a block with ``w`` columns,
    mirrored: (local row j, column ``row0 + i``), ordered by j then i (a stable counting sort)."""
    counts = np.zeros(w + 1, dtype=np.int64)
    for e in range(rows.shape[0]):
        counts[cols[e] - col0 + 1] += 1
    for j in range(w):
        counts[j + 1] += counts[j]
    m_rows = np.empty_like(rows)
    m_cols = np.empty_like(cols)
    m_vals = np.empty_like(vals)
    for e in range(rows.shape[0]):
        j = cols[e] - col0
        d = counts[j]
        m_rows[d] = j
        m_cols[d] = row0 + rows[e]
        m_vals[d] = vals[e]
        counts[j] = d + 1
    return m_rows, m_cols, m_vals


@njit(**_JIT)
def nearest_two(D, arg, best, second):  # pragma: no cover - compiled
    """Per row of ``D`` [m, c] (float32 or float64): ``arg[i] = argmin_j D[i, j]`` (the first
    on ties), ``best[i] = D[i, arg[i]]``, ``second[i] = min_{j ≠ arg[i]} D[i, j]`` (inf when
    c = 1). Comparisons only (no arithmetic): bit-identical to ``D.min(1)`` and the minimum
    of the row with ``arg`` masked, in one pass instead of three. Serial (called from
    KMeans's row workers, one per core)."""
    for i in range(D.shape[0]):
        b1 = np.inf
        b2 = np.inf
        a = 0
        for j in range(D.shape[1]):
            v = D[i, j]
            if v < b2:
                if v < b1:
                    b2 = b1
                    b1 = v
                    a = j
                else:
                    b2 = v
        arg[i] = a
        best[i] = b1
        second[i] = b2


@njit(**_JIT)
def gathered_sq_dist(X, C, rows, lab, out):  # pragma: no cover - compiled
    """``out[i] = ‖X[rows[i]] − C[lab[i]]‖²`` (``X`` [n, d], ``C`` [k, d] float32, ``rows``,
    ``lab`` int64 [m], ``out`` [m]), without materialising the gathered rows or their
    differences (torch needs two gathers, a difference and a square: four passes over
    ``m × d``). Float32 sums in any order (float rounding, like torch's reduction).
    Serial: called from KMeans's row workers."""
    for i in range(rows.shape[0]):
        x = X[rows[i]]
        c = C[lab[i]]
        acc = np.float32(0.0)
        for j in range(x.shape[0]):
            t = x[j] - c[j]
            acc += t * t
        out[i] = acc


@njit(**_JIT_SCREEN)
def screen_nearest(Q, rows, X, C, c_sq, c_scale, x_sq, x_scale, x_qn, x_rn, bound_c, tau_coef,
                   labels, upper, lower, ok):  # pragma: no cover - compiled
    """KMeans's nearest centre from int8 products, certified against the float32 E-step.

    For the points ``rows [m]`` (indices into the ``[n]`` arrays and ``X [n, d]``) and the
    centres ``C [k, d]`` (float32): ``Q [m, k] int32`` are the exact products of their int8
    quantisations (:func:`mixray.algorithms.gemm.quantize_rows`: scales ``x_scale [n]``,
    ``c_scale [k]``; norms ``x_qn = ‖x̃‖``, ``x_rn = ‖x − x̃‖``), so

        D̃_ij = ‖c_j‖² − 2·s_i·s_j·Q_ij  estimates  D_ij = ‖c_j‖² − 2·x_i·c_j

    within ``e_i = 2·(‖x̃‖·R + ‖r_x‖·(M + R))·(1 + 1e-5) + 4ε·(max‖c‖² + 2·‖x̃‖·M)``
    (Cauchy–Schwarz on the residuals, ``bound_c = (M, R, max‖c‖²)`` with ``M = max_j ‖c̃_j‖``,
    ``R = max_j ‖c_j − c̃_j‖``; the 4ε term covers evaluating ``D̃`` in float32). The float32
    E-step's error allowance is ``τ_i = tau_coef·(‖x_i‖² + max‖c‖²)`` (twice its error).

    Candidates: ``S_i = {j : D̃_ij ≤ min_j D̃_ij + 2e_i + τ_i}``; no other centre can be the
    float32 E-step's argmin. Their squared distances come from differences (float64 sums);
    the nearest (first on ties) is certified when the runner-up is more than ``τ_i``
    farther: then ``labels[r]`` is set, ``upper[r] = ‖x − c_l‖`` and ``lower[r]`` = the
    runner-up's distance or ``√(‖x‖² + min_{j ∉ S} D̃_ij − e_i)``, whichever is smaller
    (inf when ``k = 1``), and ``ok[i]`` is true. Otherwise (a near tie: the float32
    E-step's rounding decides) nothing is written and ``ok[i]`` is false: the caller
    recomputes that row in float32. Returns how many certified labels changed. Serial
    (called from KMeans's row workers).
    """
    m, k = Q.shape
    D = np.empty(k, np.float32)
    Di = D.view(np.int32)  # the same bits: minima over order-preserving int keys vectorise
    one = np.empty(1, np.float32)  # float <-> bits
    one_i = one.view(np.int32)
    cand = np.empty(k, np.int64)
    big = np.int32(0x7FFFFFFF)
    eps = np.float64(np.finfo(np.float32).eps)
    cm, cr, csq_max = bound_c[0], bound_c[1], bound_c[2]
    changed = 0
    for i in range(m):
        r = rows[i]
        qn = np.float64(x_qn[r])
        err = 2.0 * (qn * cr + np.float64(x_rn[r]) * (cm + cr)) * (1.0 + 1e-5) + 4.0 * eps * (csq_max + 2.0 * qn * cm)
        tau = tau_coef * (np.float64(x_sq[r]) + csq_max)
        ai = np.float32(-2.0) * x_scale[r]
        for j in range(k):
            D[j] = c_sq[j] + (ai * c_scale[j]) * np.float32(Q[i, j])
        bk = big
        for j in range(k):
            bk = min(bk, _key(Di[j]))
        one_i[0] = _key(bk)  # the key map is its own inverse
        best = np.float64(one[0])
        # the threshold, with room for its own rounding to float32
        one[0] = np.float32(best + (2.0 * err + tau) * (1.0 + 1e-6) + 2.0 * eps * abs(best))
        nc, out_min = _candidates(Di, _key(one_i[0]), cand, one, one_i)
        arg, b1, b2 = _nearest_of(X[r], C, cand, nc)
        ok[i] = nc == 1 or b2 - b1 > tau
        if ok[i]:
            changed += labels[r] != arg
            labels[r] = arg
            upper[r] = np.sqrt(b1)
            lower[r] = np.sqrt(max(0.0, min(b2, out_min - err + np.float64(x_sq[r]))))
    return changed


@njit(inline="always", **_JIT_SCREEN)
def _key(b):  # pragma: no cover - compiled
    """Float32 bits -> an int32 that orders like the floats (no NaN); its own inverse."""
    return b ^ ((b >> 31) & np.int32(0x7FFFFFFF))


@njit(**_JIT_SCREEN)
def _candidates(Di, tk, cand, one, one_i):  # pragma: no cover - compiled
    """``screen_nearest``'s candidates: the ``j`` with ``key(D_j) ≤ tk`` into ``cand``
    (ascending), and the smallest ``D_j`` of the others (inf if none) -> ``(nc, out_min)``.
    One branch-free pass counts them and keeps the first and the last; only rows with more
    than two scan again, between those."""
    k = Di.shape[0]
    big = np.int32(0x7FFFFFFF)
    nc = np.int32(0)
    first = big
    last = np.int32(-1)
    out_key = big
    for j in range(k):
        key = _key(Di[j])
        inside = key <= tk
        nc += np.int32(inside)
        first = min(first, np.int32(j) if inside else big)
        last = max(last, np.int32(j) if inside else np.int32(-1))
        out_key = min(out_key, big if inside else key)
    out_min = np.inf  # every centre is a candidate (or k = 1)
    if out_key != big:
        one_i[0] = _key(out_key)
        out_min = np.float64(one[0])
    cand[0] = first
    cand[1] = last
    if nc > 2:
        nc = 0
        for j in range(first, last + 1):
            if _key(Di[j]) <= tk:
                cand[nc] = j
                nc += 1
    return nc, out_min


@njit(**_JIT_SCREEN)
def _nearest_of(x, C, cand, nc):  # pragma: no cover - compiled
    """The nearest of the centres ``cand[:nc]`` to ``x`` from differences (float64 sums):
    ``(its index, its squared distance, the runner-up's)``; ties to the first."""
    b1 = np.inf
    b2 = np.inf
    arg = cand[0]
    for t in range(nc):
        c = C[cand[t]]
        acc = 0.0
        for f in range(x.shape[0]):
            diff = np.float64(x[f]) - np.float64(c[f])
            acc += diff * diff
        if acc < b1:
            b2 = b1
            b1 = acc
            arg = cand[t]
        elif acc < b2:
            b2 = acc
    return arg, b1, b2


@njit(**_JIT)
def quantize_rows(a, q, scale, q_sq, res_sq):  # pragma: no cover - compiled
    """Per row of ``a [m, d]`` float32: ``scale[i] = max_j |a_ij| / 127`` (1 for a zero row),
    ``q[i] = round(a[i] / scale[i])`` in −127..127 (int8, half to even), and in float64
    ``q_sq[i] = ‖scale_i·q_i‖²``, ``res_sq[i] = ‖a_i − scale_i·q_i‖²`` (``scale·q`` is exact
    in float64: 24 × 8 bits). One pass over ``a`` per row instead of torch's eight.
    Serial."""
    m, d = a.shape
    for i in range(m):
        amax = np.float32(0.0)
        for j in range(d):
            amax = max(amax, abs(a[i, j]))
        s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        s64 = np.float64(s)
        qq = 0.0
        rr = 0.0
        for j in range(d):
            v = np.round(a[i, j] / s)
            v = min(max(v, np.float32(-127.0)), np.float32(127.0))
            q[i, j] = np.int8(v)
            approx = np.float64(v) * s64
            r = np.float64(a[i, j]) - approx
            qq += approx * approx
            rr += r * r
        scale[i] = s
        q_sq[i] = qq
        res_sq[i] = rr
