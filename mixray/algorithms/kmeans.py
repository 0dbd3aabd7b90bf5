"""KMeans (Lloyd, squared Euclidean) as pure torch functions, and an sklearn-shaped facade.

Objective (MDIT eq. 8): ``min_C Σ_i ‖x_i − c_{l(i)}‖²`` with ``l(i) = argmin_j ‖x_i − c_j‖²``.

The pieces, each a function of tensors (no Ray, no files, no config):

- ``assign(X [n,d], C [k,d]) -> (labels [n], min_sq [n])``: nearest centre by
  ``‖x‖² − 2·x·c + ‖c‖²`` (one matmul per block), processed in row chunks × centre
  blocks so memory stays ``O(rows·block)`` and k can be in the tens of thousands.
- ``assign_two(X, C) -> (labels, min_sq, second_sq)``: the same, plus the squared
  distance to the second-nearest centre (what the pruning bounds start from).
- ``partial_sums(X, labels, k) -> (sums [k,d], counts [k])``: the map side of the
  M-step; sums of several shards add up to the sums of their union.
- ``update_centres(sums, counts, old) -> [k,d]``: ``c_j = sums_j / counts_j``; an
  empty cluster keeps its old centre (after ``relocate_empty`` there is none).
- ``inertia(X, C, labels) = Σ_i ‖x_i − c_{l(i)}‖²`` from differences (the reference).
- ``relocate_empty(sums, counts, points, old_labels)``: scikit-learn's rule — each
  empty cluster is re-seeded with one of the points farthest from their current
  centre (``farthest``), which is removed from its old cluster's sums.
- ``kmeans_plusplus(X, k, rng, weights)``: greedy k-means++ (Arthur & Vassilvitskii,
  with scikit-learn's ``2 + ⌊ln k⌋`` local trials), optionally weighted (k-means||).
- ``run_lloyd(shards, C0, max_iter, tol)``: the Lloyd loop over a *shard set* —
  any object with ``step / farthest / finish`` (``LocalShards`` here,
  ``mixray.distributed.kmeans`` over Ray actors). Single-process and distributed
  KMeans run this same loop, so with the same initial centres they agree to float
  tolerance.

Exact pruning (Hamerly 2010, the per-point bounds): ``LocalShards`` keeps for every
point an upper bound ``u ≥ ‖x − c_l(x)‖`` and a lower bound ``ℓ ≤ min_{j≠l(x)} ‖x − c_j‖``.
When the centres move by ``δ_j``, ``u += δ_l(x)`` and ``ℓ −= max_{j≠l(x)} δ_j``
(triangle inequality). A point whose bounds still separate, ``ℓ² − u² > τ(x)``,
cannot change its label and is skipped; otherwise ``u`` is tightened to the exact
distance and, if that does not settle it, the point's full row of distances is
computed. ``τ(x) = 64·√d·ε·(‖x‖² + max‖c‖²)`` covers the float error of the matmul
expansion twice over, so a skipped point is one whose label the full computation
would not change: labels, sums and the iteration count are those of plain Lloyd.
Most points are skipped after the first few iterations.

Int8 screen (CPU float32 with pruning, on CPUs with VNNI:
:func:`~mixray.algorithms.gemm.int8_screening`): the points are quantised to int8 once
per fit and the centres once per step, one scale per row, and a point's row of
``D = ‖c‖² − 2·x·c`` is first estimated from the exact integer products
(``torch._int_mm``: one Zen 4 core did 50K×384 by 384×1000 in 0.093 s, against 0.39 s
in float32) with a rigorous error bound ``e(x)`` (Cauchy–Schwarz on the quantisation
residuals). Only the centres within ``2e(x) + τ(x)`` of the estimated minimum can be
the float32 E-step's nearest; their distances are computed from differences, and the
nearest is certified when the runner-up is more than ``τ(x)`` farther
(:func:`mixray.algorithms.fused.screen_nearest`). The rows where it is not (a near tie,
within float error: 0.1–5% of the rows) get the float32 row. So the labels are those of
the float32 E-step, bit for bit (``prune=False`` computes that on every row; the tests
compare the two). The Hamerly lower bound is the runner-up's distance or the screen's
bound on the others, whichever is smaller.

Products: the E-step's ``‖c‖² − 2·X·C[s:e].T`` per centre block is a
:class:`~mixray.algorithms.gemm.RightProduct` prepared once per step (``centre_products``:
torch's BLAS, or oneDNN on non-Intel x86 CPUs, where it is 1.1–2.1× faster), and the row
minimum, its index and the second minimum come from one fused pass
(:func:`mixray.algorithms.fused.nearest_two`, the same bits as torch's ``min``).

Semantics follow ``sklearn.cluster.KMeans(algorithm="lloyd", n_init=1)``: the data
are centred before fitting (precision of the matmul expansion), ``tol`` is relative
to the mean feature variance and compared with ``Σ_j ‖c_j^new − c_j‖²``, the loop
stops early when no label changes ("strict convergence"), and otherwise the labels
are recomputed once against the final centres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from sklearn.base import BaseEstimator

from mixray.algorithms import fused
from mixray.algorithms.cores import available_cores
from mixray.algorithms.devices import resolve_device
from mixray.algorithms.gemm import RightProduct, int8_products, int8_screening, quantize_rows
from mixray.algorithms.params import Interval, validate
from mixray.algorithms.threads import gemm_threads, shared_executor
from mixray.choices import KMEANS_INITS
from mixray.errors import ClusteringInputError

# A distance block holds about this many entries (rows × centres, at least 256 rows):
# 512 KB in float32 on CPU, so a chunk's distances stay in L2 while its row minima and
# sums are taken (measured: 17% faster per iteration than 8 MB blocks at k = 100);
# 64 MB on a GPU, where fewer, bigger kernels win.
BLOCK_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 24}
DEFAULT_CENTRE_BLOCK = 4096
DENSE_FRACTION = 0.5  # pruning: above this share of rows in doubt, compute every row (no gathers)
MIN_PRODUCT_ROWS = 16  # LocalShards: gathered float32 rows are padded to this many (see _float32)
SCREEN_ELEMENTS = 1 << 20  # LocalShards: the int8 screen's int32 products per block (4 MB):
SCREEN_ROWS = 1024  # 1024 rows at k = 1,000, fewer for larger k (at least MIN_PRODUCT_ROWS)
PARALLEL_MIN_ROWS = 1 << 15  # LocalShards: below this, one thread (torch's own parallelism)


# --------------------------------------------------------------------------- kernels
def work_dtype(dtype: torch.dtype | np.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32 (as scikit-learn does)."""
    return torch.float64 if dtype in (torch.float64, np.float64, np.dtype("float64")) else torch.float32


def squared_norms(X: torch.Tensor) -> torch.Tensor:
    """``[n, d] -> [n]``: ``‖x_i‖²``."""
    return torch.einsum("nd,nd->n", X, X)


def assign(
    X: torch.Tensor,
    C: torch.Tensor,
    *,
    x_sq: torch.Tensor | None = None,
    c_sq: torch.Tensor | None = None,
    centre_block: int = DEFAULT_CENTRE_BLOCK,
    row_start: int = 0,
    row_stop: int | None = None,
    products: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row of ``X[row_start:row_stop]``.

    ``X [n, d]``, ``C [k, d]`` -> ``labels [m] int64``, ``min_sq [m]`` (squared
    Euclidean distance to that centre, clamped at 0). Naive equivalent::

        D = ((X[:, None, :] - C[None, :, :]) ** 2).sum(-1); labels, min_sq = D.argmin(1), D.min(1)

    Ties go to the lower centre index. Memory: one ``rows × centre_block`` block.
    ``products``: ``centre_products(C, c_sq, centre_block)`` when the caller has them
    (prepared once per set of centres).
    """
    row_stop = X.shape[0] if row_stop is None else row_stop
    Xs = X[row_start:row_stop]
    x_sq = squared_norms(Xs) if x_sq is None else x_sq[row_start:row_stop]
    arg, best, _ = _nearest_blocks(Xs, C, c_sq, centre_block, second=False, products=products)
    return arg, (best + x_sq).clamp_min_(0)


def assign_two(X: torch.Tensor, C: torch.Tensor, *, x_sq: torch.Tensor | None = None,
               c_sq: torch.Tensor | None = None, centre_block: int = DEFAULT_CENTRE_BLOCK,
               products: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest and second-nearest centre of every row of ``X``.

    ``X [m, d]``, ``C [k, d]`` -> ``labels [m] int64``, ``min_sq [m]``, ``second_sq [m]``
    (squared distances, clamped at 0; ``second_sq = inf`` when ``k = 1``). Labels
    and ``min_sq`` are those of ``assign`` (ties to the lower index). Naive::

        D = ((X[:, None] - C[None]) ** 2).sum(-1); D.sort(1).values[:, :2]
    """
    x_sq = squared_norms(X) if x_sq is None else x_sq
    arg, best, second = _nearest_blocks(X, C, c_sq, centre_block, second=True, products=products)
    return arg, (best + x_sq).clamp_min_(0), (second + x_sq).clamp_min_(0)


def centre_products(C: torch.Tensor, c_sq: torch.Tensor | None = None,
                    centre_block: int = DEFAULT_CENTRE_BLOCK) -> list[tuple[int, int, RightProduct]]:
    """The E-step's products, prepared once per set of centres ``C [k, d]``:
    ``[(s, e, P)]`` per centre block, ``P(X) = ‖c‖² − 2·X·C[s:e].T  [m, e−s]``
    (:class:`~mixray.algorithms.gemm.RightProduct`: torch's BLAS or oneDNN)."""
    c_sq = squared_norms(C) if c_sq is None else c_sq
    k = C.shape[0]
    return [(s, min(k, s + centre_block), RightProduct(C[s : s + centre_block], -2.0, c_sq[s : s + centre_block]))
            for s in range(0, k, centre_block)]


@dataclass
class ScreenCentres:
    """One step's centres for the int8 screen (``LocalShards``): ``quantize_rows(C)`` as
    ``q_t [d, k]`` and ``scale [k]``, ``c_sq [k]`` (the float32 E-step's ``‖c‖²``), and
    ``bound_c``, the maxima the error bound takes (float64, the kernel's argument):
    ``max ‖c̃_j‖``, ``max ‖c_j − c̃_j‖``, ``max ‖c_j‖²``."""

    q_t: torch.Tensor
    scale: torch.Tensor
    c_sq: torch.Tensor
    bound_c: np.ndarray

    @classmethod
    def of(cls, C: torch.Tensor, c_sq: torch.Tensor) -> ScreenCentres:
        qc = quantize_rows(C)
        maxima = np.array([qc.q_norm.max(), qc.res_norm.max(), c_sq.max()], dtype=np.float64)
        return cls(qc.q.T, qc.scale, c_sq.contiguous(), maxima)


def _nearest_blocks(X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor | None, centre_block: int,
                    second: bool, products: list | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The block loop of ``assign``/``assign_two``: ``‖c‖² − 2·x·c`` per centre block
    (``‖x‖²`` is constant per row and added by the caller) -> ``(arg [m], best [m],
    second-best [m] or None)``. Ties go to the lower centre index."""
    if products is None:
        products = centre_products(C, c_sq, centre_block)
    best = arg = sec = None
    for s, e, product in products:
        D = product(X)
        if D.device.type == "cpu" and D.is_contiguous() and D.shape[0]:
            # one pass: argmin, min and second min (fused.nearest_two; same bits as below)
            a = torch.empty(D.shape[0], dtype=torch.int64)
            m, m2 = torch.empty(D.shape[0], dtype=D.dtype), torch.empty(D.shape[0], dtype=D.dtype)
            fused.nearest_two(D.numpy(), a.numpy(), m.numpy(), m2.numpy())
        else:
            m, a = D.min(dim=1)
            if second:
                if e - s > 1:
                    m2 = D.scatter_(1, a.unsqueeze(1), math.inf).min(dim=1).values
                else:
                    m2 = torch.full_like(m, math.inf)
        if best is None:
            best, arg, sec = m, a, (m2 if second else None)
        else:
            if second:
                sec = torch.minimum(torch.maximum(best, m), torch.minimum(sec, m2))
            better = m < best  # strict: ties stay with the earlier block (lower index)
            best = torch.where(better, m, best)
            arg = torch.where(better, a + s, arg)
    return arg, best, sec


def _gathered_sq(X: torch.Tensor, C: torch.Tensor, rows: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """``[m]``: ``‖X[rows] − C[lab]‖²`` (one fused pass on CPU float32, else from differences)."""
    if X.device.type == "cpu" and X.dtype == torch.float32 and X.is_contiguous() and C.is_contiguous():
        out = torch.empty(len(rows), dtype=X.dtype)
        fused.gathered_sq_dist(X.numpy(), C.numpy(), rows.numpy(), lab.numpy(), out.numpy())
        return out
    diff = X[rows] - C[lab]
    return (diff * diff).sum(1)


def own_sq(X: torch.Tensor, C: torch.Tensor, labels: torch.Tensor, rows: int = 1 << 14) -> torch.Tensor:
    """``[n]``: ``‖x_i − c_{l(i)}‖²`` from differences (exact to float rounding), in row chunks."""
    out = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for s in range(0, X.shape[0], rows):
        diff = X[s : s + rows] - C[labels[s : s + rows]]
        out[s : s + rows] = (diff * diff).sum(1)
    return out


def partial_sums(X: torch.Tensor, labels: torch.Tensor, k: int,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sums [k, d] = Σ_{i: l(i)=j} x_i``, ``counts [k] int64`` (the map side of the M-step).

    With ``out`` the sums are added into it (a running accumulator over chunks).
    """
    sums = torch.zeros((k, X.shape[1]), dtype=X.dtype, device=X.device) if out is None else out
    sums.index_add_(0, labels, X)
    return sums, torch.bincount(labels, minlength=k)


def update_centres(sums: torch.Tensor, counts: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``c_j = sums_j / counts_j``; a cluster with ``counts_j = 0`` keeps ``old_j``."""
    n = counts.to(sums.dtype).unsqueeze(1)
    return torch.where(n > 0, sums / n.clamp_min(1), old)


def farthest(min_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest ``min_sq``, largest first, ties by lower index."""
    n = min(n, min_sq.shape[0])
    # stable sort on −d keeps lower indices first among equal distances
    return torch.sort(-min_sq, stable=True).indices[:n]


def relocate_empty(
    sums: torch.Tensor, counts: torch.Tensor, points: torch.Tensor, old_labels: torch.Tensor
) -> torch.Tensor:
    """Re-seed the empty clusters (in place) with ``points``, the farthest points first.

    ``points [m, d]`` are points farthest from their assigned centre (``farthest``),
    ``old_labels [m]`` their clusters. Empty cluster ``e_t`` (ascending) gets
    ``points[t]``: ``sums[e_t] = x``, ``counts[e_t] = 1``, and ``x`` leaves its old
    cluster's sums. Returns the indices of the re-seeded clusters. This is
    scikit-learn's ``_relocate_empty_clusters_dense``.
    """
    empty = torch.nonzero(counts == 0).flatten()
    for t in range(min(len(empty), points.shape[0])):
        e, old = int(empty[t]), int(old_labels[t])
        sums[old] -= points[t]
        counts[old] -= 1
        sums[e] = points[t]
        counts[e] = 1
    return empty[: points.shape[0]]


def inertia(X: torch.Tensor, C: torch.Tensor, labels: torch.Tensor, rows: int = 1 << 14) -> float:
    """``Σ_i ‖x_i − c_{l(i)}‖²`` from differences (not the matmul expansion), summed in float64.

    The fit itself sums the assignment's ``min_sq`` (same value up to rounding,
    no extra pass); this is the reference that tests and benchmarks hold it to.
    """
    return float(own_sq(X, C, labels, rows).double().sum())


def tolerance(tol: float, centred_sq_sum: float, n: int, d: int) -> float:
    """scikit-learn's absolute tolerance: ``tol`` × mean per-feature variance.

    With centred data the mean variance is ``Σ_i ‖x_i − μ‖² / (n·d)``.
    """
    return tol * centred_sq_sum / (n * d)


def kmeans_plusplus(
    X: torch.Tensor,
    k: int,
    rng: np.random.Generator,
    *,
    weights: torch.Tensor | None = None,
    n_local_trials: int | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding: indices ``[k]`` of the rows of ``X [n, d]`` chosen as centres.

    First centre: a row drawn with probability ∝ ``w_i``. Each next centre: draw
    ``t = 2 + ⌊ln k⌋`` candidates with probability ∝ ``w_i·D(x_i)²`` (``D`` = distance
    to the nearest chosen centre) and keep the one that most lowers the potential
    ``Σ_i w_i·D(x_i)²``. ``weights`` (default 1) make it the weighted seeding of
    k-means|| (Bahmani et al. 2012). Cost ``O(k·t·n·d)``.
    """
    n = X.shape[0]
    w = torch.ones(n, dtype=torch.float64, device=X.device) if weights is None else weights.double()
    t = n_local_trials or 2 + int(math.log(k))
    x_sq = squared_norms(X)
    if weights is None:
        first = int(rng.integers(n))
    else:
        first = int(rng.choice(n, p=(w / w.sum()).cpu().numpy()))
    chosen = [first]
    closest = (x_sq - 2 * (X @ X[first]) + x_sq[first]).clamp_min_(0).double()
    pot = float(closest @ w)
    for _ in range(1, k):
        if pot <= 0:  # every point coincides with a centre: take unchosen rows in order
            rest = np.setdiff1d(np.arange(n), np.asarray(chosen))[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        cum = torch.cumsum(closest * w, 0)
        r = torch.as_tensor(rng.random(t) * pot, dtype=torch.float64, device=X.device)
        cand = torch.searchsorted(cum, r).clamp_max_(n - 1)
        d = (x_sq[cand, None] - 2 * (X[cand] @ X.T) + x_sq[None, :]).clamp_min_(0).double()
        d = torch.minimum(d, closest[None, :])
        pots = d @ w
        best = int(torch.argmin(pots))
        chosen.append(int(cand[best]))
        closest, pot = d[best], float(pots[best])
    return torch.as_tensor(chosen, dtype=torch.int64)


def random_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct row indices drawn uniformly from ``n`` (the ``random`` init)."""
    return rng.choice(n, size=k, replace=False)


# --------------------------------------------------------------------------- the loop
class ShardSet(Protocol):
    """What ``run_lloyd`` needs from the points, wherever they live."""

    def step(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """E-step against ``centres`` on every shard: store labels and ``min_sq``;
        return the reduced ``(sums [k,d], counts [k], number of labels that changed)``."""

    def farthest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` points farthest from their centre over all shards (largest first,
        ties by global index): ``(points [n,d], their labels [n])``."""

    def finish(self, centres: torch.Tensor, relabel: bool) -> float:
        """Optionally re-assign against the final centres; return the inertia."""


@dataclass
class LloydResult:
    centres: torch.Tensor
    n_iter: int
    inertia: float
    converged: Literal["strict", "tol", "max_iter"]
    relocated: int


def run_lloyd(shards: ShardSet, centres: torch.Tensor, *, max_iter: int, tol: float) -> LloydResult:
    """Lloyd iterations until no label changes, ``Σ_j‖Δc_j‖² ≤ tol`` or ``max_iter``.

    ``tol`` is absolute here (the caller scales it by the mean feature variance).
    """
    converged: Literal["strict", "tol", "max_iter"] = "max_iter"
    relocated = 0
    i = 0
    for i in range(max_iter):  # noqa: B007 (i is the iteration count after the loop)
        sums, counts, changed = shards.step(centres)
        n_empty = int((counts == 0).sum())
        if n_empty:
            points, old = shards.farthest(n_empty)
            relocated += len(relocate_empty(sums, counts, points, old))
        new = update_centres(sums, counts, centres)
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if changed == 0:
            converged = "strict"
            break
        if shift <= tol:
            converged = "tol"
            break
    total = shards.finish(centres, relabel=converged != "strict")
    return LloydResult(centres, i + 1, total, converged, relocated)


class LocalShards:
    """Every point in this process (CPU or one GPU): the single-process ``ShardSet``.

    On CPU the rows are split into ``workers`` contiguous ranges (default: torch's
    thread count), each handled by one thread running single-threaded torch ops,
    and the per-range sums are added in a fixed order: one synchronisation per
    iteration instead of one per tensor op, which matters when other processes
    compete for the cores. On a GPU one stream does it all; with fewer than
    ``PARALLEL_MIN_ROWS`` rows (default ``workers``) one thread does it.

    With ``prune`` (default) each step skips the points that the Hamerly bounds
    (module docstring) prove keep their label; ``min_sq`` is then recomputed from
    differences when read. ``prune=False`` computes every distance every step, in
    float32 (or float64) products: the reference the pruned steps equal.

    ``screen`` (with ``prune``, CPU float32 only): the int8 screen of the module docstring;
    None = where :func:`~mixray.algorithms.gemm.int8_screening` says so (VNNI CPUs).
    ``screened`` / ``rechecked`` count the rows it settled and the near ties it left to
    float32.
    """

    def __init__(self, X: torch.Tensor, centre_block: int = DEFAULT_CENTRE_BLOCK,
                 workers: int | None = None, prune: bool = True, screen: bool | None = None):
        self.X, self.centre_block, self.prune = X, centre_block, prune
        self.x_sq = squared_norms(X)
        n = X.shape[0]
        self.labels = torch.full((n,), -1, dtype=torch.int64, device=X.device)
        self._min_sq: torch.Tensor | None = torch.zeros(n, dtype=X.dtype, device=X.device)
        self.upper = torch.full((n,), math.inf, dtype=X.dtype, device=X.device)
        self.lower = torch.zeros(n, dtype=X.dtype, device=X.device)
        self._centres: torch.Tensor | None = None  # the centres the labels refer to
        # τ(x) = 64·√d·ε·(‖x‖² + max‖c‖²): twice the float error of the matmul expansion
        self._tau_coef = 64.0 * math.sqrt(X.shape[1]) * torch.finfo(X.dtype).eps
        self.skipped = 0  # points whose distances a step did not compute (all steps)
        self.screened = self.rechecked = 0  # rows the int8 screen settled / sent to float32
        # the int8 screen (module docstring): CPU float32 with pruning, on CPUs with VNNI
        self.screen = (prune and X.device.type == "cpu" and X.dtype == torch.float32 and X.is_contiguous()
                       and (int8_screening() if screen is None else screen))
        self._xq = quantize_rows(X) if self.screen else None
        self._screen_c: ScreenCentres | None = None  # this step's quantised centres
        if workers is None:  # threads pay off from a few tens of thousands of rows
            workers = available_cores() if n >= PARALLEL_MIN_ROWS else 1
        self.workers = 1 if X.device.type != "cpu" else max(1, min(workers, n))

    @property
    def min_sq(self) -> torch.Tensor:
        """``[n]``: squared distance of every point to its centre (exact, from differences
        when pruning left some of them unrecomputed)."""
        if self._min_sq is None:
            self._min_sq = own_sq(self.X, self._centres, self.labels)
        return self._min_sq

    def _rows(self, k: int) -> int:
        budget = BLOCK_ELEMENTS.get(self.X.device.type, BLOCK_ELEMENTS["cuda"])
        return max(256, budget // max(1, min(k, self.centre_block)))

    def _full(self, rows: torch.Tensor | slice, centres: torch.Tensor, products: list,
              pending: list) -> int:
        """Every distance of ``rows`` (a slice, or global indices): new labels and exact
        bounds; returns how many labels changed. ``pending``: see ``_screened``."""
        if self._screen_c is not None:
            return self._screened(rows, centres, products, pending)
        return self._float32(rows, centres, products)

    def _screened(self, rows: torch.Tensor | slice, centres: torch.Tensor, products: list,
                  pending: list) -> int:
        """``_full`` by the int8 screen (module docstring). The rows it cannot certify are
        appended to ``pending``: the caller gives them to ``_float32`` together."""
        idx = torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        sc, xq = self._screen_c, self._xq
        Q = int8_products(xq.q[rows], sc.q_t)  # a slice is a view: no gather
        ok = torch.empty(len(idx), dtype=torch.bool)
        changed = fused.screen_nearest(
            Q.numpy(), idx.numpy(), self.X.numpy(), centres.numpy(), sc.c_sq.numpy(), sc.scale.numpy(),
            self.x_sq.numpy(), xq.scale.numpy(), xq.q_norm.numpy(), xq.res_norm.numpy(), sc.bound_c,
            self._tau_coef, self.labels.numpy(), self.upper.numpy(), self.lower.numpy(), ok.numpy())
        n_ok = int(ok.sum())
        self.screened += n_ok
        if n_ok < len(idx):
            rest = idx[~ok]
            self.rechecked += len(rest)
            pending.append(rest)
        return changed

    def _float32(self, rows: torch.Tensor | slice, centres: torch.Tensor, products: list) -> int:
        """``_full`` by the float32 E-step (``assign_two``). Fewer than ``MIN_PRODUCT_ROWS``
        rows are padded with the first rows of ``X`` (their results dropped): MKL gives a
        row the same products in any block of at least 16 rows (``mixray.algorithms.gemm``),
        so a gathered row gets the bits it gets in a full step."""
        Xr, x_sq = self.X[rows], self.x_sq[rows]
        m = Xr.shape[0]
        if 0 < m < MIN_PRODUCT_ROWS <= self.X.shape[0]:
            Xr = torch.cat([Xr, self.X[: MIN_PRODUCT_ROWS - m]])
            x_sq = torch.cat([x_sq, self.x_sq[: MIN_PRODUCT_ROWS - m]])
        lab, m1, m2 = (t[:m] for t in assign_two(Xr, centres, x_sq=x_sq, products=products))
        changed = int((lab != self.labels[rows]).sum())
        self.labels[rows] = lab
        if self.prune:
            self.upper[rows], self.lower[rows] = m1.sqrt(), m2.sqrt()
        else:
            self._min_sq[rows] = m1
        return changed

    def _unsettled(self, lo: int, hi: int, centres: torch.Tensor, moved: tuple) -> torch.Tensor | None:
        """Move the bounds of rows ``lo..hi-1`` by the centre shifts; tighten ``u`` where
        they overlap; return the (global) rows whose label is still in doubt, or None
        when most are (then a contiguous pass over all rows is cheaper than gathers)."""
        shift, top, top_j, second, c_sq_max = moved
        lab, u, low = self.labels[lo:hi], self.upper[lo:hi], self.lower[lo:hi]
        u += shift[lab]
        low -= torch.where(lab == top_j, second, top)
        low.clamp_min_(0)
        tau = (self.x_sq[lo:hi] + c_sq_max).mul_(self._tau_coef)
        doubt = torch.nonzero(low * low - u * u <= tau).flatten()
        if len(doubt) > DENSE_FRACTION * (hi - lo):
            return None
        if len(doubt):
            exact = _gathered_sq(self.X, centres, doubt + lo, lab[doubt])
            u[doubt] = exact.sqrt()
            doubt = doubt[low[doubt] ** 2 - exact <= tau[doubt]]
        return doubt + lo

    def _assign_range(self, lo: int, hi: int, centres: torch.Tensor, products: list,
                      moved: tuple | None, with_sums: bool, single_thread: bool) -> tuple:
        """Assign rows ``lo..hi-1`` (labels and bounds written in place).

        Returns ``(sums [k,d], counts [k], changed, skipped)`` of the range (sums/counts
        None unless ``with_sums``).
        """
        if single_thread:
            torch.set_num_threads(1)
        k = centres.shape[0]
        changed, skipped = 0, 0
        # the screen's int32 products stream through its kernel row by row: bigger blocks,
        # fewer calls; the rows it leaves to float32 are done together at the end
        if self._screen_c is not None:
            rows = max(MIN_PRODUCT_ROWS, min(SCREEN_ROWS, SCREEN_ELEMENTS // k))
        else:
            rows = self._rows(k)
        pending: list[torch.Tensor] = []
        # the rows in doubt; None = all of them (first step, no pruning, or most rows)
        todo = None if moved is None else self._unsettled(lo, hi, centres, moved)
        if todo is None:
            for s in range(lo, hi, rows):
                changed += self._full(slice(s, min(hi, s + rows)), centres, products, pending)
        else:
            skipped = (hi - lo) - len(todo)
            for s in range(0, len(todo), rows):
                changed += self._full(todo[s : s + rows], centres, products, pending)
        if pending:
            rest, rows = torch.cat(pending), self._rows(k)
            for s in range(0, len(rest), rows):
                changed += self._float32(rest[s : s + rows], centres, products)
        sums = counts = None
        if with_sums:
            sums, counts = partial_sums(self.X[lo:hi], self.labels[lo:hi], k)
        return sums, counts, changed, skipped

    def _moved(self, centres: torch.Tensor, c_sq: torch.Tensor) -> tuple | None:
        """How far each centre moved since the last step: ``(δ [k], max δ, its index,
        max δ over the others, max ‖c‖²)``; None when every distance must be computed."""
        prev = self._centres
        if not self.prune or prev is None or prev.shape != centres.shape:
            return None
        shift = (centres - prev).pow(2).sum(1).sqrt()
        if shift.shape[0] > 1:
            two = torch.topk(shift, 2)
            top, second, top_j = two.values[0], two.values[1], two.indices[0]
        else:
            top, second, top_j = shift[0], shift.new_zeros(()), shift.new_zeros((), dtype=torch.int64)
        return shift, top, top_j, second, c_sq.max()

    def assign_all(self, centres: torch.Tensor, with_sums: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Assign every row (skipping the settled ones), updating ``labels``; with the
        M-step sums if asked."""
        c_sq = squared_norms(centres)
        moved = self._moved(centres, c_sq)
        products = centre_products(centres, c_sq, self.centre_block)  # prepared once per step
        if self.screen:
            centres = centres.contiguous()
            self._screen_c = ScreenCentres.of(centres, c_sq)
        n = self.X.shape[0]
        if self.workers == 1:
            parts = [self._assign_range(0, n, centres, products, moved, with_sums, False)]
        else:
            bounds = [round(n * i / self.workers) for i in range(self.workers + 1)]
            # the workers' setting is process-wide for MKL: restored on exit (a no-op inside
            # ``KMeans.fit``, which holds one thread for the whole loop: re-sizing torch's
            # thread pools every iteration cost 14% of the iteration time at k = 100)
            with gemm_threads(1):
                parts = list(shared_executor(self.workers).map(
                    lambda i: self._assign_range(bounds[i], bounds[i + 1], centres, products, moved,
                                                 with_sums, True), range(self.workers)))
        self._centres = centres.clone()
        if self.prune:
            self._min_sq = None  # recomputed from differences when read
        self.skipped += sum(p[3] for p in parts)
        sums, counts = parts[0][0], parts[0][1]
        for p in parts[1:] if with_sums else ():
            sums += p[0]
            counts += p[1]
        return sums, counts, sum(p[2] for p in parts)

    def step(self, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.assign_all(centres, with_sums=True)

    def farthest(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = farthest(self.min_sq, n)
        return self.X[idx].clone(), self.labels[idx].clone()

    def finish(self, centres: torch.Tensor, relabel: bool) -> float:
        """Inertia ``Σ_i ‖x_i − c_{l(i)}‖²`` (float64 sum of ``min_sq``)."""
        if relabel:
            self.assign_all(centres, with_sums=False)
        return float(self.min_sq.double().sum())


# --------------------------------------------------------------------------- facade
def as_matrix(X, name: str = "X", device: torch.device | str | None = None) -> torch.Tensor:
    """Validate a 2-D finite numeric matrix and return it as a float32/float64 tensor.

    The public boundary: kernels above assume what this checks. Raises
    :class:`~mixray.errors.ClusteringInputError`.
    """
    if isinstance(X, torch.Tensor):
        t = X.detach()
    else:
        a = np.asarray(X)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ClusteringInputError(f"{name} must be numeric, got dtype {a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim != 2:
        raise ClusteringInputError(
            f"{name} must be 2-D [n_samples, n_features], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ClusteringInputError(f"{name} is empty: shape {tuple(t.shape)}")
    t = t.to(dtype=work_dtype(t.dtype), device=device if device is not None else t.device)
    # one reduction: a NaN/inf makes the sum non-finite (an overflow too: then look closer)
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ClusteringInputError(f"{name} contains NaN or infinite values")
    return t.contiguous()


def check_k(n_clusters: int, n_samples: int) -> int:
    """``1 <= n_clusters <= n_samples``."""
    k = Interval(int, 1, None).check("n_clusters", n_clusters, ClusteringInputError)
    if k > n_samples:
        raise ClusteringInputError(f"n_clusters={k} > number of points {n_samples}")
    return k


def check_init(init, names: tuple[str, ...]) -> None:
    """``init`` is one of ``names`` or an array (its shape is checked against the data later)."""
    if isinstance(init, str) and init not in names:
        raise ClusteringInputError(f"init={init!r}; allowed: {', '.join(names)} or an array [k, d]")


def initial_array(init, k: int, d: int, device, dtype) -> torch.Tensor:
    """An explicit ``init`` as a ``[k, d]`` tensor (validated)."""
    C0 = as_matrix(init, "init", device).to(dtype)
    if C0.shape != (k, d):
        raise ClusteringInputError(f"init has shape {tuple(C0.shape)}; expected "
                                   f"(n_clusters={k}, n_features={d})")
    return C0


# The parameters KMeans and DistributedKMeans share (init is checked by check_init).
LLOYD_CONSTRAINTS = {
    "n_clusters": Interval(int, 1, None),
    "max_iter": Interval(int, 1, None),
    "tol": Interval(float, 0, None),
    "random_state": Interval(int, 0, None),
    "centre_block": Interval(int, 1, None),
}


class KMeans(BaseEstimator):
    """Lloyd KMeans with the scikit-learn interface, on torch (CPU, or CUDA when the data is there).

    ``KMeans(n_clusters, init="k-means++"|"random"|array [k,d], max_iter=300, tol=1e-4,
    random_state=0, device=None).fit(X [n,d])`` sets ``cluster_centers_ [k,d]``,
    ``labels_ [n]``, ``inertia_`` (``Σ‖x_i − c_{l(i)}‖²``), ``n_iter_``, ``converged_``
    (``strict``/``tol``/``max_iter``), ``n_relocated_`` and ``distances_ [n]``
    (Euclidean distance of each point to its own centre). Given the same initial
    centres it matches ``sklearn.cluster.KMeans(algorithm="lloyd", n_init=1)``.
    ``device``: None = where ``X`` is, ``auto``, ``cpu``, ``cuda``. One process; the
    CPU E-step runs on torch's threads (``threads`` of the glossary). Over Ray
    actors: :class:`mixray.distributed.kmeans.DistributedKMeans`.
    """

    def __init__(self, n_clusters: int = 8, *, init: str | np.ndarray = "k-means++",
                 max_iter: int = 300, tol: float = 1e-4, random_state: int = 0,
                 device: str | torch.device | None = None,
                 centre_block: int = DEFAULT_CENTRE_BLOCK):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.centre_block = centre_block

    def _initial(self, Xc: torch.Tensor, mean: torch.Tensor, p: dict) -> torch.Tensor:
        k, init = p["n_clusters"], p["init"]
        rng = np.random.default_rng(p["random_state"])
        if isinstance(init, str):
            if init == "random":
                idx = torch.as_tensor(random_indices(Xc.shape[0], k, rng))
            else:
                idx = kmeans_plusplus(Xc, k, rng)
            return Xc[idx.to(Xc.device)].clone()
        return initial_array(init, k, Xc.shape[1], Xc.device, Xc.dtype) - mean

    def fit(self, X) -> KMeans:
        p = validate(self.get_params(deep=False), LLOYD_CONSTRAINTS, ClusteringInputError)
        check_init(p["init"], KMEANS_INITS)
        X = as_matrix(X, "X", resolve_device(p["device"], like=X, where="device"))
        check_k(p["n_clusters"], X.shape[0])
        mean = X.mean(dim=0)
        Xc = X - mean
        C0 = self._initial(Xc, mean, p)
        shards = LocalShards(Xc, p["centre_block"])
        tol = tolerance(p["tol"], float(shards.x_sq.double().sum()), *Xc.shape)
        with gemm_threads(1 if shards.workers > 1 else None):  # see LocalShards.assign_all
            res = run_lloyd(shards, C0, max_iter=p["max_iter"], tol=tol)
        self._mean = mean
        self._centres_c = res.centres
        self.cluster_centers_ = (res.centres + mean).cpu().numpy()
        self.labels_ = shards.labels.cpu().numpy()
        self.distances_ = shards.min_sq.double().sqrt().cpu().numpy()
        self.inertia_ = res.inertia
        self.n_iter_ = res.n_iter
        self.converged_ = res.converged
        self.n_relocated_ = res.relocated
        return self

    def _check_fitted(self, X) -> torch.Tensor:
        if not hasattr(self, "cluster_centers_"):
            raise ClusteringInputError("this KMeans is not fitted yet: call fit(X) first")
        X = as_matrix(X, "X", self._mean.device).to(self._mean.dtype)
        if X.shape[1] != self.cluster_centers_.shape[1]:
            raise ClusteringInputError(f"X has {X.shape[1]} features; the model was fitted on "
                                       f"{self.cluster_centers_.shape[1]}")
        return X - self._mean

    def predict(self, X) -> np.ndarray:
        """Index of the nearest centre of each row: ``[n]`` int64."""
        shards = LocalShards(self._check_fitted(X), self.centre_block)
        shards.assign_all(self._centres_c, with_sums=False)
        return shards.labels.cpu().numpy()

    def transform(self, X) -> np.ndarray:
        """Euclidean distances to every centre: ``[n, k]`` (as ``sklearn``'s ``transform``)."""
        Xc = self._check_fitted(X)
        C = self._centres_c
        d2 = squared_norms(Xc)[:, None] - 2 * Xc @ C.T + squared_norms(C)[None, :]
        return d2.clamp_min_(0).sqrt().cpu().numpy()

    def fit_predict(self, X) -> np.ndarray:
        return self.fit(X).labels_
