"""The sparse high-similarity cache: CSR rows of the pairs (candidate, column) with sim > θ.

Built during the first pass within a memory budget (θ chosen from a sample of
similarities, raised when the sample underestimated); read by the column shard
for the covered columns. Values are the same quantised similarities as
everywhere else, so sparse and dense evaluations agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixray.algorithms import fused
from mixray.algorithms.facility.kernels import qsims


class CacheFull(Exception):
    """The sparse cache would exceed its budget: retry with a higher threshold."""


@dataclass
class SparseRows:
    """CSR rows ``indptr`` [N+1] int64, ``cols`` int32 (shard-local), ``vals`` float32 (scaled)."""

    indptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor

    @classmethod
    def empty(cls, n_rows: int, device: torch.device) -> SparseRows:
        return cls(torch.zeros(n_rows + 1, dtype=torch.int64, device=device),
                   torch.empty(0, dtype=torch.int32, device=device),
                   torch.empty(0, dtype=torch.float32, device=device))

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


class SparseBuilder:
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
            raise CacheFull

    def add_block(self, rows: slice | torch.Tensor, n_rows: int,
                  chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Append the entries of a block of ``n_rows`` rows (global ``rows``: a slice or sorted ids).

        Each chunk is (local row, col, val) sorted by local row; entries are placed
        row by row (chunk order within a row) by a counting sort — no comparison sort.
        """
        if not chunks:
            return
        dev = self.cols.device
        if dev.type == "cpu":
            self._add_block_fused(rows, n_rows, chunks)
            return
        per_chunk = [torch.bincount(c[0].long(), minlength=n_rows) for c in chunks]
        counts = torch.stack(per_chunk).sum(0)
        n = int(counts.sum())
        self.pending -= n
        if self.fill + n > self.capacity:
            raise CacheFull
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

    def _add_block_fused(self, rows: slice | torch.Tensor, n_rows: int,
                         chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """:meth:`add_block` as one stable counting sort (numba), same placement."""
        r, c, v = (torch.cat([ch[i] for ch in chunks]) for i in range(3))
        n = len(r)
        self.pending -= n
        if self.fill + n > self.capacity:
            raise CacheFull
        counts = torch.from_numpy(fused.place_rows(r.int().numpy(), c.int().numpy(), v.numpy(),
                                                   n_rows, self.cols.numpy(), self.vals.numpy(),
                                                   self.fill))
        if isinstance(rows, slice):
            self.counts[rows] += counts
        else:
            self.counts.index_add_(0, rows, counts)
        self.fill += n

    def finish(self) -> SparseRows:
        indptr = torch.zeros(len(self.counts) + 1, dtype=torch.int64, device=self.counts.device)
        torch.cumsum(self.counts, 0, out=indptr[1:])
        return SparseRows(indptr, self.cols[:self.fill], self.vals[:self.fill])


def sample_rows(n: int, device: torch.device, size: int = 64) -> torch.Tensor:
    """``size`` evenly spaced row ids of ``range(n)`` (the deterministic similarity sample)."""
    return torch.linspace(0, n - 1, min(size, n), device=device).long()


def choose_threshold(xs: torch.Tensor, xcols: torch.Tensor, n_candidates: int,
                     capacity: int, sample_rows_: int = 64) -> float:
    """Scaled θ ≥ 0 such that about 60% of ``capacity`` pairs (candidate, column) have sim > θ.

    Estimated from the similarities of ``sample_rows_`` evenly spaced rows of
    ``xs`` with every column (deterministic). Returns ``inf`` when the budget
    is 0 (no sparse cache: every column stays dense).
    """
    if capacity <= 0 or xcols.shape[0] == 0:
        return math.inf
    s = qsims(xs[sample_rows(xs.shape[0], xs.device, sample_rows_)], xcols).flatten()
    frac = 0.6 * capacity / (float(n_candidates) * xcols.shape[0])
    positive = float((s > 0).float().mean())
    if frac >= positive:
        return 0.0
    k = max(1, min(len(s), int(frac * len(s))))
    return max(0.0, float(torch.topk(s, k, sorted=False).values.min()))


def raise_threshold(xs: torch.Tensor, xcols: torch.Tensor, theta: float) -> float:
    """The cache overflowed at ``theta``: halve the kept fraction (θ := median of the kept sample)."""
    s = qsims(xs[sample_rows(xs.shape[0], xs.device)], xcols).flatten()
    kept = s[s > theta]
    if len(kept) < 2:
        return math.inf
    return float(kept.median())
