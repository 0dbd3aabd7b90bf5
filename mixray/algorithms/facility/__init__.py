"""Facility-location greedy with a quality term (QDIT), exact and matrix-free.

Objective (``shared/methods.md`` §1), over a pool V of N L2-normalised embeddings::

    sim(a, v) = cos(e_a, e_v)
    d(A)      = Σ_{v∈V} max(0, max_{a∈A} sim(a, v))          d(∅) = 0
    d(a|A)    = d(A ∪ {a}) − d(A) = Σ_v max(0, sim(a, v) − cur_v),  cur_v = max(0, max_{a∈A} sim(a, v))
    f(a|A, α) = (1−α)·d(a|A)/N + α·q(a)                       q min-max normalised to [0, 1]

Greedy: K times add ``argmax_{a∉A} f(a|A, α)``, ties broken by the lower index.

Memory is O(N·d + budget): the only per-point state is the running vector
``cur`` ([N] float32). Everything else is a cache that the caller bounds — the
whole N×N similarity matrix only when the budget grants its 4·N² bytes.

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
them; oneDNN, the product backend on non-Intel x86 CPUs
(:mod:`mixray.algorithms.gemm`), computes it the same way in every shape, and
:func:`qsims` pads its products to a short ladder of sizes (oneDNN keeps state
per shape). Across backends or BLAS builds results agree up to float32 rounding.

How the exact greedy stays fast
-------------------------------
When the quantised similarity matrix fits the budget (``4·N·n`` bytes for a
shard of n columns, on CPU), :class:`~mixray.algorithms.facility.dense.DenseShard`
computes it once (a symmetric blocked pass) and every evaluation is one fused
read of a candidate's row. Otherwise the shard is matrix-free
(:class:`~mixray.algorithms.facility.shard.ColumnShard`):

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

Modules
-------
``kernels``  the integer grid: ``qsims``, exact gain sums, ``ranking_gains`` (any ranking's objective)
``dense``    :class:`DenseShard` (the whole matrix) and :func:`make_shard` (dense when it fits)
``cache``    the sparse high-similarity cache (CSR) and its threshold θ
``shard``    :class:`ColumnShard`: running max, first pass, lazy evaluation, selection
``greedy``   the drivers: :func:`lazy_greedy` (exact or stochastic), :func:`naive_greedy`
``pool``     the prepared :class:`Pool` and :func:`run_greedy` (dispatch by optimizer)
``greedi``   GreeDi's partitions, round 1 and the two-round driver
(Torch threads and heap trimming: :mod:`mixray.algorithms.threads`; the one-pass numba
kernels of the gain sums on CPU: :mod:`mixray.algorithms.fused`.)
"""

from __future__ import annotations

from mixray.algorithms.facility.cache import SparseRows, choose_threshold
from mixray.algorithms.facility.dense import DenseShard, dense_bytes, make_shard
from mixray.algorithms.facility.greedi import greedi, greedi_partitions, greedi_round1, greedi_union
from mixray.algorithms.facility.greedy import (
    GreedyResult,
    GreedyState,
    LocalShards,
    Shards,
    StepCallback,
    lazy_greedy,
    naive_greedy,
    stochastic_sample_size,
)
from mixray.algorithms.facility.kernels import (
    SCALE_EXP,
    UNIT,
    dense_gains,
    diversity_from_cur,
    gain_sums,
    qsims,
    ranking_gains,
)
from mixray.algorithms.facility.pool import (
    Pool,
    choose_theta,
    local_shards,
    run_greedy,
    split_columns,
)
from mixray.algorithms.facility.shard import ColumnShard

__all__ = [
    "SCALE_EXP", "UNIT", "ColumnShard", "DenseShard", "GreedyResult", "GreedyState", "LocalShards", "Pool",
    "Shards", "SparseRows", "StepCallback", "choose_theta", "choose_threshold", "dense_bytes", "dense_gains",
    "diversity_from_cur", "gain_sums", "greedi", "greedi_partitions", "greedi_round1",
    "greedi_union", "lazy_greedy", "local_shards", "make_shard", "naive_greedy", "qsims", "ranking_gains",
    "run_greedy", "split_columns", "stochastic_sample_size",
]
