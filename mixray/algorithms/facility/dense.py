"""The dense column shard: the whole quantised similarity matrix, when it fits the budget.

When ``4·N·n`` bytes (N pool points as candidates × the shard's n columns,
float32) fit the memory budget, a shard computes the matrix once — the same
quantised similarities :func:`~mixray.algorithms.facility.kernels.qsims` gives
everywhere else, so gains are bit-identical to the matrix-free
:class:`~mixray.algorithms.facility.shard.ColumnShard` — and every later
evaluation is one fused read of a row (:func:`~mixray.algorithms.fused.row_gains`,
~0.3 ns per term on 2 cores), with no sparse cache and no change log. The first
pass uses symmetry when the shard owns every column (each block product fills
``S[I, J]`` and ``S[J, I]``). Only on CPU (the kernels are numba's).

:func:`make_shard` picks the dense shard when the matrix fits, the matrix-free one otherwise.
"""

from __future__ import annotations

import torch

from mixray.algorithms.cores import resolve_threads
from mixray.algorithms.facility.kernels import COL_BLOCK, ROW_BLOCK, SYM_BLOCK, qsims
from mixray.algorithms.facility.shard import ColumnShard
from mixray.algorithms.fused import kernel_threads, row_gains
from mixray.algorithms.threads import gemm_threads


def dense_bytes(n_pool: int, n_cols: int) -> int:
    """Bytes of a dense shard's similarity matrix (float32 [n_pool, n_cols])."""
    return 4 * n_pool * n_cols


class DenseShard:
    """A column shard holding ``S = floor(2^22·cos)`` for every pool point × its columns.

    Same interface and results as :class:`ColumnShard` (``first_pass``, ``evaluate``,
    ``select``, ``cur_values``, ``stats``); ``xs`` [N, d] scaled embeddings on CPU,
    ``cols`` sorted global ids (None = all), ``cur``/``step`` resume a run,
    ``threads`` for the matrix products and the fused kernels.
    """

    def __init__(self, xs: torch.Tensor, cols: torch.Tensor | None, cur: torch.Tensor | None = None,
                 step: int = 0, threads: int | None = None):
        self.xs, self.threads, self.n_pool = xs, threads, xs.shape[0]
        self.all_columns = cols is None
        self.xc = xs if cols is None else xs[cols.long()].contiguous()
        self.n = self.xc.shape[0]
        self.cur = (torch.zeros(self.n, dtype=torch.float32) if cur is None
                    else cur.to(torch.float32).clone())
        self.step = step
        self.s: torch.Tensor | None = None
        self.stats = {"dense_pairs": 0, "dense_matrix_bytes": dense_bytes(self.n_pool, self.n)}

    def _build(self) -> None:
        s = torch.empty(self.n_pool, self.n, dtype=torch.float32)
        with gemm_threads(self.threads):
            if self.all_columns:
                b = SYM_BLOCK
                for i0 in range(0, self.n, b):
                    i1 = min(self.n, i0 + b)
                    for j0 in range(i0, self.n, b):
                        j1 = min(self.n, j0 + b)
                        blk = qsims(self.xc[i0:i1], self.xc[j0:j1])
                        s[i0:i1, j0:j1] = blk
                        if j0 != i0:
                            s[j0:j1, i0:i1] = blk.T
            else:
                for i0 in range(0, self.n_pool, ROW_BLOCK):
                    i1 = min(self.n_pool, i0 + ROW_BLOCK)
                    for j0 in range(0, self.n, COL_BLOCK):
                        j1 = min(self.n, j0 + COL_BLOCK)
                        s[i0:i1, j0:j1] = qsims(self.xs[i0:i1], self.xc[j0:j1])
        self.s = s

    def _gains(self, cand: torch.Tensor) -> torch.Tensor:
        rows = cand.cpu().long().contiguous()
        out = torch.empty(len(rows), dtype=torch.float64)
        if len(rows):
            with kernel_threads(resolve_threads(self.threads)):
                row_gains(self.s.numpy(), rows.numpy(), self.cur.numpy(), out.numpy())
        self.stats["dense_pairs"] += len(rows) * self.n
        return out

    def first_pass(self, cand: torch.Tensor, theta: float) -> torch.Tensor:
        """Exact gains (float64 [C], scaled) of ``cand``; builds the matrix (``theta`` unused)."""
        if self.s is None:
            self._build()
        return self._gains(cand)

    def evaluate(self, cand: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Exact gains (float64 [B], scaled) of ``cand`` at the current step (``tau`` unused)."""
        return self._gains(cand)

    def select(self, a: int) -> tuple[float, float]:
        """Add pool point ``a``: update cur. Returns (partial gain of a, partial Σ cur), scaled."""
        row = self.s[a]
        up = row > self.cur
        gain = float((row[up] - self.cur[up]).sum(dtype=torch.float64))
        torch.maximum(self.cur, row, out=self.cur)
        self.step += 1
        return gain, float(self.cur.sum(dtype=torch.float64))

    def cur_values(self) -> torch.Tensor:
        """The scaled running max of this shard's columns (float32 [n], a copy)."""
        return self.cur.clone()


def make_shard(xs: torch.Tensor, cols: torch.Tensor | None, budget_bytes: int,
               cur: torch.Tensor | None = None, step: int = 0,
               threads: int | None = None) -> DenseShard | ColumnShard:
    """The dense shard on CPU when its matrix fits ``budget_bytes``, else the matrix-free one."""
    n_cols = xs.shape[0] if cols is None else len(cols)
    if xs.device.type == "cpu" and dense_bytes(xs.shape[0], n_cols) <= budget_bytes:
        return DenseShard(xs, cols, cur=cur, step=step, threads=threads)
    return ColumnShard(xs, cols, budget_bytes, cur=cur, step=step, threads=threads)
