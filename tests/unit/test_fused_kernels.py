"""The fused (numba) gain kernels equal the torch reference bit for bit, and compaction keeps
exactly the live cache entries in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixray.algorithms import fused
from mixray.algorithms.facility import kernels as fk
from mixray.algorithms.facility.cache import SparseRows


def _grid(rng, shape, lo=-(1 << 22), hi=1 << 22) -> np.ndarray:
    """Integer-valued float32 on the 2^-22 grid (what qsims returns)."""
    return rng.integers(lo, hi, shape).astype(np.float32)


def _ref(s: np.ndarray, cur: np.ndarray, axis: int, cap: np.ndarray | None = None) -> np.ndarray:
    terms = np.maximum(0.0, s.astype(np.float64) - cur.astype(np.float64))
    if cap is not None:
        terms = np.minimum(terms, cap.astype(np.float64))
    return terms.sum(axis)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_kernels_equal_the_exact_sums(seed):
    rng = np.random.default_rng(seed)
    r, c = 37, 203  # not multiples of the 64-column blocks of block_col_sums
    s = _grid(rng, (r, c))
    cur_c = _grid(rng, c, 0, 1 << 21)
    cur_r = _grid(rng, r, 0, 1 << 21)
    cap = _grid(rng, c, 0, 1 << 20)
    out = np.zeros(r)
    fused.block_row_gains(s, cur_c, out)
    assert np.array_equal(out, _ref(s, cur_c, 1))
    out = np.ones(r)  # accumulates into out
    fused.block_row_drops(s, cur_c, cap, out)
    assert np.array_equal(out, 1 + _ref(s, cur_c, 1, cap))
    out = np.zeros(c)
    fused.block_col_sums(s, cur_r, cur_r, 0, c, False, out)
    assert np.array_equal(out, _ref(s, cur_r[:, None], 0))
    # the transposed block (columns x candidates, padded): candidates [c0, c1), rows < len(cur)
    st = np.ascontiguousarray(np.vstack([s, _grid(rng, (3, c))]).T)  # [c, r + 3]: padding rows of s
    for c0, c1 in ((0, r), (5, 30)):
        out = np.ones(c1 - c0)
        fused.block_col_sums(st, cur_c, cap, c0, c1, False, out)
        assert np.array_equal(out, 1 + _ref(s[c0:c1], cur_c, 1))
        out = np.zeros(c1 - c0)
        fused.block_col_sums(st, cur_c, cap, c0, c1, True, out)
        assert np.array_equal(out, _ref(s[c0:c1], cur_c, 1, cap))
    rows = np.array([5, 0, 36, 5], dtype=np.int64)
    out = np.full(4, np.nan)
    fused.row_gains(s, rows, cur_c, out)
    assert np.array_equal(out, _ref(s[rows], cur_c, 1))


def test_gain_sums_fused_and_torch_paths_agree():
    """CPU contiguous blocks take the fused path, a strided view the torch one: same numbers."""
    rng = np.random.default_rng(3)
    s = torch.from_numpy(_grid(rng, (64, 300)))
    cur = torch.from_numpy(_grid(rng, 300, 0, 1 << 21))
    cap = torch.from_numpy(_grid(rng, 300, 0, 1 << 20))
    strided = torch.from_numpy(_grid(rng, (64, 600)))[:, ::2]
    strided.copy_(s)
    assert not strided.is_contiguous()
    for kw in ({}, {"cap": cap}):
        assert torch.equal(fk.gain_sums(s, cur, **kw), fk.gain_sums(strided, cur, **kw))
    rows_cur = torch.from_numpy(_grid(rng, 64, 0, 1 << 21))[:, None]
    assert torch.equal(fk.gain_sums(s, rows_cur, dim=0), fk.gain_sums(strided, rows_cur, dim=0))
    with pytest.raises(ValueError, match="dim=1"):
        fk.gain_sums(s, rows_cur, dim=0, cap=cap)


def _csr(rng, n_rows: int, n_cols: int, density: float) -> SparseRows:
    mask = rng.random((n_rows, n_cols)) < density
    vals = _grid(rng, (n_rows, n_cols), 0, 1 << 22)
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    cols = np.nonzero(mask)[1].astype(np.int32)
    return SparseRows(torch.from_numpy(indptr), torch.from_numpy(cols),
                      torch.from_numpy(vals[mask].astype(np.float32)))


def test_csr_row_gains_and_compaction():
    rng = np.random.default_rng(4)
    h = _csr(rng, 50, 80, 0.2)
    cur = _grid(rng, 80, 0, 1 << 22)
    rows = np.array([3, 49, 0, 3, 17], dtype=np.int64)
    out = np.zeros(len(rows))
    read = fused.csr_row_gains(h.indptr.numpy(), h.cols.numpy(), h.vals.numpy(), rows, cur, out)
    ref = []
    for r in rows:
        _, cols, vals = h.gather(torch.tensor([r]))
        ref.append(np.maximum(0.0, vals.numpy().astype(np.float64) - cur[cols.numpy()]).sum())
    assert np.array_equal(out, ref)
    assert read == int((h.indptr[rows + 1] - h.indptr[rows]).sum())
    # compaction: exactly the entries that can still contribute, in order, with their rows
    before = [(r, int(c), float(v)) for r in range(50)
              for c, v in zip(*(t.numpy() for t in h.gather(torch.tensor([r]))[1:]), strict=True)]
    indptr = h.indptr.clone()
    nnz = fused.csr_compact(indptr.numpy(), h.cols.numpy(), h.vals.numpy(), cur)
    after = SparseRows(indptr, h.cols[:nnz], h.vals[:nnz])
    kept = [(r, int(c), float(v)) for r in range(50)
            for c, v in zip(*(t.numpy() for t in after.gather(torch.tensor([r]))[1:]), strict=True)]
    assert kept == [e for e in before if e[2] > cur[e[1]]]
    assert 0 < nnz < len(before)
    out2 = np.zeros(len(rows))  # dead entries contributed 0: the gains do not change
    fused.csr_row_gains(after.indptr.numpy(), after.cols.numpy(), after.vals.numpy(), rows, cur,
                        out2)
    assert np.array_equal(out, out2)



def test_split_over_threads_is_exact_and_guarded(monkeypatch):
    """dense_gains over 3 threads = one thread, bit for bit; on a threading layer that cannot take
    concurrent launches (numba's workqueue) it stays on one thread."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3 * fk.COL_BLOCK + 100, 24)).astype(np.float32)
    xs = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True) * fk.EMBED_SCALE)
    cur = torch.from_numpy(_grid(rng, len(xs), 0, 1 << 20))
    one = fk.dense_gains(xs[:40], xs, cur)
    assert torch.equal(fk.dense_gains(xs[:40], xs, cur, workers=3), one)
    monkeypatch.setattr(fused, "_CONCURRENT", False)
    calls = []
    monkeypatch.setattr(fk, "shared_executor", lambda w: calls.append(w))
    assert torch.equal(fk.dense_gains(xs[:40], xs, cur, workers=3), one)
    assert calls == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_two_is_min_and_the_masked_min(dtype):
    """KMeans's one-pass (argmin, min, second min) equals torch's min and the min with the
    argmin masked, bit for bit; ties go to the first index and count as the second."""
    rng = np.random.default_rng(3)
    D = rng.normal(size=(50, 31)).astype(dtype)
    D[0, 4] = D[0, 9] = D[0].min() - 1  # a tie for the minimum
    D[1, :] = 2.0  # a constant row
    arg, m1, m2 = np.empty(50, np.int64), np.empty(50, dtype), np.empty(50, dtype)
    fused.nearest_two(D, arg, m1, m2)
    t = torch.from_numpy(D.copy())
    vals, idx = t.min(1)
    second = t.scatter(1, idx[:, None], float("inf")).min(1).values
    assert np.array_equal(arg, idx.numpy()) and arg[0] == 4 and arg[1] == 0
    assert np.array_equal(m1, vals.numpy()) and np.array_equal(m2, second.numpy())
    assert m2[0] == m1[0] and m2[1] == 2.0
    one = np.empty(50, dtype)
    fused.nearest_two(D[:, :1].copy(), arg, m1, one)
    assert np.isinf(one).all() and (arg == 0).all()


def test_gathered_sq_dist_is_the_distance_of_the_gathered_rows():
    rng = np.random.default_rng(4)
    X, C = rng.normal(size=(40, 384)).astype(np.float32), rng.normal(size=(7, 384)).astype(np.float32)
    rows, lab = np.array([3, 39, 0, 3], np.int64), np.array([6, 0, 2, 2], np.int64)
    out = np.empty(4, np.float32)
    fused.gathered_sq_dist(X, C, rows, lab, out)
    want = ((X[rows].astype(np.float64) - C[lab]) ** 2).sum(1)
    np.testing.assert_allclose(out, want, rtol=1e-5)
