"""The float32 product backends (mixray.algorithms.gemm): the choice, the values, and the
shape invariance that KMeans's pruning and the exact facility-location gains rely on."""

from __future__ import annotations

import pytest
import torch

from mixray.algorithms import gemm
from mixray.algorithms.gemm import RightProduct, cpu_backend


@pytest.fixture
def backend(request, monkeypatch):
    """Run a test under ``MIXRAY_CPU_GEMM=<param>`` (the per-process choice re-read)."""
    monkeypatch.setenv(gemm.ENV, request.param)
    cpu_backend.cache_clear()
    yield cpu_backend()
    cpu_backend.cache_clear()


@pytest.mark.parametrize("backend", ["blas", "onednn"], indirect=True)
def test_right_product_is_the_float32_product(backend):
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(70, 48, generator=g), torch.randn(33, 48, generator=g), torch.randn(33, generator=g)
    want = (a.double() @ (-2 * b.double()).T + bias.double())
    got = RightProduct(b, -2.0, bias)(a)
    assert got.shape == (70, 33) and got.dtype == torch.float32
    # float32 dot products of length 48 with |terms| ≲ 10: errors ~1e-5, not bfloat16's 1e-1
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=0)
    assert torch.allclose(RightProduct(b)(a).double(), a.double() @ b.double().T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["blas", "onednn"], indirect=True)
def test_every_entry_is_independent_of_the_call_shape(backend):
    """A row's products are bit-identical in any block of rows (oneDNN: even alone; MKL: in
    blocks of at least 16 rows, what qsims pads to), gathered in any order, against any
    slice of at least 16 columns, on 1 or 2 threads."""
    g = torch.Generator().manual_seed(1)
    X = torch.nn.functional.normalize(torch.randn(700, 384, generator=g), dim=1).mul_(2048)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = RightProduct(X)(X)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in ((1, 3) if backend == "onednn" else ()) + (16, 37, 256, 700):
                rows = torch.randperm(700, generator=g)[:m]
                assert torch.equal(RightProduct(X)(X[rows]), ref[rows])
            for c0, c1 in ((0, 16), (5, 517), (16, 700)):
                assert torch.equal(RightProduct(X[c0:c1])(X), ref[:, c0:c1])
    finally:
        torch.set_num_threads(before)


def test_the_choice_follows_the_cpu_and_the_override(monkeypatch):
    limited = []
    monkeypatch.setattr(gemm, "_limit_onednn_caches", lambda: limited.append(True))
    cpu_backend.cache_clear()
    try:
        monkeypatch.setenv(gemm.ENV, "auto")
        monkeypatch.setattr(gemm, "_onednn_ops", lambda: True)
        monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "GenuineIntel")
        assert cpu_backend() == "blas" and not limited  # MKL's own CPUs keep MKL
        cpu_backend.cache_clear()
        monkeypatch.setattr(gemm, "_cpu_vendor", lambda: "AuthenticAMD")
        assert cpu_backend() == "onednn" and limited == [True]  # and its shape caches capped
        cpu_backend.cache_clear()
        monkeypatch.setenv(gemm.ENV, "blas")
        assert cpu_backend() == "blas"
        cpu_backend.cache_clear()
        monkeypatch.setattr(gemm, "_onednn_ops", lambda: False)
        monkeypatch.setenv(gemm.ENV, "onednn")
        assert cpu_backend() == "blas"  # asked for, but this torch has no oneDNN linear ops
        cpu_backend.cache_clear()
        monkeypatch.setenv(gemm.ENV, "mkl")
        with pytest.raises(ValueError, match="MIXRAY_CPU_GEMM='mkl'"):
            cpu_backend()
    finally:
        cpu_backend.cache_clear()


def test_float64_and_the_blas_backend_are_torch_addmm():
    g = torch.Generator().manual_seed(2)
    a, b, bias = (torch.randn(20, 8, generator=g, dtype=torch.float64), torch.randn(9, 8, generator=g,
                  dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64))
    assert torch.equal(RightProduct(b, -2.0, bias)(a), torch.addmm(bias, a, b.T, beta=1, alpha=-2))


def test_qsims_pads_packed_products_to_a_short_ladder():
    """oneDNN keeps state per GEMM shape: its products are padded to ≤ 1/8 more, ~8 sizes per octave."""
    from mixray.algorithms.facility.kernels import _round_up_ladder

    got = [_round_up_ladder(n) for n in (1, 16, 17, 100, 129, 257, 1000, 1025, 4097)]
    assert got == [16, 16, 32, 112, 144, 288, 1024, 1152, 4608]
    sizes = {_round_up_ladder(n) for n in range(1, 200_001)}
    assert len(sizes) < 100 and all(s % 16 == 0 for s in sizes)
    assert all(n <= _round_up_ladder(n) <= max(16, n * 9 / 8 + 16) for n in range(1, 5000))


@pytest.mark.parametrize("backend", ["blas", "onednn"], indirect=True)
def test_qsims_is_the_same_product_either_way_round(backend):
    """On oneDNN qsims packs a factor of few rows (``(b @ a.T).T``) and the lazy greedy's
    evaluations (1–512 candidate rows against 4,096 columns) take ``qsims_transposed`` blocks:
    every entry must be the one the other orientation gives — the first pass computes it the
    other way, and the symmetric first pass uses each block for both of its sides."""
    from mixray.algorithms.facility.kernels import (
        _round_up,
        _round_up_ladder,
        qsims,
        qsims_transposed,
    )

    g = torch.Generator().manual_seed(3)
    X = torch.nn.functional.normalize(torch.randn(4700, 384, generator=g), dim=1).mul_(2048)
    pad = _round_up_ladder if RightProduct.packs(X) else _round_up

    def padded(x):
        return torch.cat([x, x.new_zeros(pad(len(x)) - len(x), x.shape[1])])

    b = X[500:]
    for r in (1, 16, 37, 512):
        a = X[:r]
        s = qsims(a, b)
        assert s.shape == (r, len(b)) and s.is_contiguous()
        # the product as it was computed before: b packed, a streamed
        ref = RightProduct(padded(b))(padded(a))[:r, : len(b)].floor()
        assert torch.equal(s, ref)
        assert torch.equal(qsims(b, a), s.T)
        if RightProduct.packs(X):  # the evaluations' transposed blocks, padding included
            assert torch.equal(qsims_transposed(a, b)[: len(b), :r], s.T)


def test_quantized_rows_bound_every_product_and_the_integer_product_is_exact():
    """The int8 screen's contract: ``a·b − s_a·s_b·(q_a·q_b)`` is within
    ``‖ã‖‖r_b‖ + ‖r_a‖‖b̃‖ + ‖r_a‖‖r_b‖`` for every pair (rows of very different scales, a zero
    row, an outlier entry), and ``int8_products`` is the exact integer product."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(60, 40, generator=g) * torch.logspace(-3, 3, 60)[:, None]
    a[7] = 0.0
    a[8, 3] = 1e4  # one large entry: a coarse scale for that row, still bounded
    b = torch.randn(30, 40, generator=g) * 5
    qa, qb = gemm.quantize_rows(a), gemm.quantize_rows(b)
    assert qa.q.dtype == torch.int8 and int(qa.q.abs().max()) == 127
    assert qa.scale[7] == 1.0 and not qa.q[7].any() and qa.q_norm[7] == 0 and qa.res_norm[7] == 0
    approx = (qa.scale.double()[:, None] * qa.q.double(), qb.scale.double()[:, None] * qb.q.double())
    assert (qa.q_norm.double() >= approx[0].norm(dim=1)).all()
    assert (qa.res_norm.double() >= (a.double() - approx[0]).norm(dim=1)).all()
    Q = gemm.int8_products(qa.q, qb.q.T)
    assert Q.dtype == torch.int32 and torch.equal(Q.long(), qa.q.long() @ qb.q.long().T)
    err = (a.double() @ b.double().T - qa.scale.double()[:, None] * qb.scale.double()[None, :] * Q.double()).abs()
    qn, rn, qbn, rbn = (t.double() for t in (qa.q_norm, qa.res_norm, qb.q_norm, qb.res_norm))
    bound = qn[:, None] * rbn[None, :] + rn[:, None] * qbn[None, :] + rn[:, None] * rbn[None, :]
    assert (err <= bound).all()
    assert (err.sum() > 0) and (bound < 0.05 * qn[:, None] * qbn[None, :] + 1e-12).all()  # and it is tight


def test_int8_screening_follows_the_cpu_flags_and_the_override(monkeypatch):
    gemm.int8_screening.cache_clear()
    try:
        monkeypatch.setenv(gemm.INT8_ENV, "auto")
        monkeypatch.setattr(gemm, "_cpu_flags", lambda: {"avx2", "avx512f"})
        assert not gemm.int8_screening()  # no VNNI: oneDNN's int8 would not pay
        gemm.int8_screening.cache_clear()
        monkeypatch.setattr(gemm, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
        assert gemm.int8_screening()
        gemm.int8_screening.cache_clear()
        monkeypatch.setenv(gemm.INT8_ENV, "off")
        assert not gemm.int8_screening()
        gemm.int8_screening.cache_clear()
        monkeypatch.setattr(gemm, "_cpu_flags", lambda: set())
        monkeypatch.setenv(gemm.INT8_ENV, "on")
        assert gemm.int8_screening()
        gemm.int8_screening.cache_clear()
        monkeypatch.setenv(gemm.INT8_ENV, "yes")
        with pytest.raises(ValueError, match="MIXRAY_INT8='yes'"):
            gemm.int8_screening()
    finally:
        gemm.int8_screening.cache_clear()
