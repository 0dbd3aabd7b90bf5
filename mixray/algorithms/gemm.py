"""Float32 matrix products ``a @ (s·b).T + bias`` with a fixed right factor, on the faster CPU library.

torch computes a float32 ``@`` on CPU with its BLAS, Intel MKL in the x86 wheels.
MKL takes its AVX-512 kernels on Intel CPUs only: on an AMD EPYC with AVX-512
(the 2-vCPU benchmark host of 2026-12) a float32 product of 100K×384 by 384×1000
took 0.39 s with MKL and 0.18 s with oneDNN (which torch also ships, and which
dispatches on the CPU's features, not its vendor) — 2.1× for the same float32
arithmetic; on a Zen 4 EPYC, whose AVX-512 units are 256 bits wide, 0.48 vs 0.44 s
(1.1×). KMeans's E-step is one such product per iteration.

:class:`RightProduct` ``(b [n, d], scale, bias [n])`` prepares ``b`` once and then
maps ``a [m, d] -> a @ (scale·b).T + bias  [m, n]`` (float32) for any number of
left factors. The backend is :func:`cpu_backend`, one per process:

- ``"blas"``: ``torch.addmm`` (torch's BLAS). Used on GPU, for float64, on Intel
  CPUs, and wherever oneDNN's linear op is missing.
- ``"onednn"``: oneDNN's inner product with a pre-packed weight
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the ops
  torch's own compiler uses for float32 linear layers on CPU). Default on x86 CPUs
  that are not Intel's.

``MIXRAY_CPU_GEMM=blas|onednn|auto`` (default ``auto``) overrides the choice. Choosing
oneDNN also caps its per-shape caches (:func:`_limit_onednn_caches`) unless set already.

Int8 screening products (:func:`quantize_rows`, :func:`int8_products`): ``a ≈ s_a·q_a``
with one scale per row and ``q`` in int8, so ``a·b ≈ s_a·s_b·(q_a·q_b)`` where the
integer product is exact (int32 accumulation, ``torch._int_mm``: oneDNN's VNNI kernels).
With the residuals ``r = a − s·q`` kept as norms, Cauchy–Schwarz bounds the error of
every entry: ``|a·b − s_a s_b q_a·q_b| ≤ ‖ã‖‖r_b‖ + ‖r_a‖‖b̃‖ + ‖r_a‖‖r_b‖``
(``ã = s_a·q_a``). KMeans screens its E-step with it (:mod:`mixray.algorithms.kmeans`):
on the Zen 4 host one core did 50K×384 by 384×1000 in 0.093 s int8 against 0.39 s
float32. :func:`int8_screening` says whether this process uses it: CPUs with VNNI
(``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` in ``/proc/cpuinfo``), overridden by
``MIXRAY_INT8=on|off|auto``.

Both are plain float32 arithmetic (no bfloat16 or TF32 inside), so errors are
those of a float32 dot product of length ``d``; the rounding differs between the
two (sums in another order), so results are bit-identical within one backend and
equal up to float32 rounding across backends. Within a backend each entry of the
result does not depend on how many rows ``a`` has or where a row sits in it
(tested in ``tests/unit/test_gemm.py``), which the KMeans pruning relies on: a
point's distances are the same whether its row is computed alone or in a block.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BACKENDS = ("blas", "onednn")
ENV = "MIXRAY_CPU_GEMM"


def _cpuinfo(field: str) -> str:
    """The value of ``field`` for the first CPU in ``/proc/cpuinfo``, or '' (unreadable, absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vendor() -> str:
    """``vendor_id`` of ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD`` …), or ''."""
    return _cpuinfo("vendor_id")


def _onednn_ops() -> bool:
    """Whether this torch has oneDNN's linear ops (x86 CPU wheels do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def _asked(var: str, choices: tuple[str, ...]) -> str:
    """The environment variable ``var`` (default ``auto``), one of ``choices`` (ValueError otherwise)."""
    asked = os.environ.get(var, "auto").strip().lower() or "auto"
    if asked not in choices:
        raise ValueError(f"{var}={asked!r}: expected one of {', '.join(choices)}")
    return asked


@functools.cache
def cpu_backend() -> str:
    """The float32 CPU backend of this process: ``"blas"`` or ``"onednn"`` (module docstring)."""
    asked = _asked(ENV, (*BACKENDS, "auto"))
    if asked == "blas" or not _onednn_ops():
        return "blas"
    if asked == "onednn" or _cpu_vendor() not in ("GenuineIntel", ""):
        _limit_onednn_caches()
        return "onednn"
    return "blas"


def _cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty when unreadable)."""
    return set(_cpuinfo("flags").split())


INT8_ENV = "MIXRAY_INT8"
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_screening() -> bool:
    """Whether this process screens with int8 products (module docstring): ``MIXRAY_INT8``
    ``on``/``off``, or ``auto`` (default): when the CPU has VNNI and torch has ``_int_mm``."""
    asked = _asked(INT8_ENV, ("on", "off", "auto"))
    if asked == "off" or not hasattr(torch, "_int_mm"):
        return False
    return asked == "on" or bool(_cpu_flags() & VNNI_FLAGS)


@dataclass
class QuantizedRows:
    """``a [m, d] ≈ scale[:, None]·q``: ``q [m, d] int8`` in −127..127, ``scale [m]``,
    and the norms the error bound needs, rounded up: ``q_norm [m] ≥ ‖scale·q‖``,
    ``res_norm [m] ≥ ‖a − scale·q‖`` (float32)."""

    q: torch.Tensor
    scale: torch.Tensor
    q_norm: torch.Tensor
    res_norm: torch.Tensor


NORM_ROUND_UP = 1.0 + 1e-6  # float64 norms -> float32, never below the exact value


def quantize_rows(a: torch.Tensor) -> QuantizedRows:
    """Symmetric per-row int8 quantisation of a float32 ``a [m, d]`` (CPU):
    ``scale_i = max_j |a_ij| / 127`` (1 for a zero row), ``q = round(a / scale)``
    (:func:`mixray.algorithms.fused.quantize_rows`, one pass). The products ``scale·q``
    are exact in float64, so the residual norms are the residuals' own up to float64
    rounding (covered by ``NORM_ROUND_UP``). Memory: ``q``, a quarter of ``a``."""
    from mixray.algorithms import fused  # numba: imported when first needed

    a = a.contiguous()
    m = a.shape[0]
    q = torch.empty(a.shape, dtype=torch.int8)
    scale = torch.empty(m, dtype=torch.float32)
    q_sq, res_sq = torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64)
    fused.quantize_rows(a.numpy(), q.numpy(), scale.numpy(), q_sq.numpy(), res_sq.numpy())
    return QuantizedRows(q, scale, (q_sq.sqrt_() * NORM_ROUND_UP).float(), (res_sq.sqrt_() * NORM_ROUND_UP).float())


def int8_products(a_q: torch.Tensor, b_q_t: torch.Tensor) -> torch.Tensor:
    """``a_q [m, d] int8 @ b_q_t [d, n] int8 -> [m, n] int32``, exact (``torch._int_mm``;
    ``b_q_t`` may be the transposed view of a row-major ``[n, d]``)."""
    return torch._int_mm(a_q.contiguous(), b_q_t)


ONEDNN_CACHE_CAPACITY = "16"


def _limit_onednn_caches() -> None:
    """Keep oneDNN's per-shape caches small, unless the user set them: oneDNN (primitive
    cache, ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and torch's ideep layer (``LRU_CACHE_CAPACITY``)
    keep up to 1,024 primitives each, with buffers sized by the GEMM shape; the greedy's
    products come in hundreds of shapes (gathered columns), which measured +440 MB peak at
    N = 100K. With 16 each: +134 MB, time unchanged. The variables are read when oneDNN
    creates its first primitive, so this only acts in a process that has not used oneDNN yet."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, ONEDNN_CACHE_CAPACITY)


class RightProduct:
    """``a [m, d] -> a @ (scale·b).T + bias  [m, n]`` for a fixed ``b [n, d]`` (and ``bias [n]``).

    ``scale`` should be a power of two (then ``scale·b`` is exact). Naive equivalent::

        torch.addmm(bias, a, b.T, beta=1, alpha=scale)
    """

    def __init__(self, b: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None):
        self.b, self.scale, self.bias = b, scale, bias
        self.onednn = self.packs(b)
        if self.onednn:
            w = b * scale if scale != 1.0 else b.contiguous()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            self.bias = None if bias is None else bias.contiguous()

    @staticmethod
    def packs(b: torch.Tensor) -> bool:
        """Whether ``RightProduct(b)`` copies ``b`` into oneDNN's packed layout (CPU float32
        on the oneDNN backend): a transient copy of ``b`` that callers with a large ``b``
        avoid by taking it in row blocks."""
        return b.device.type == "cpu" and b.dtype == torch.float32 and cpu_backend() == "onednn"

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(a.contiguous(), self.packed, self.bias, "none", [], "")
        if self.bias is None:
            return a @ self.b.T if self.scale == 1.0 else torch.mm(a, self.b.T).mul_(self.scale)
        return torch.addmm(self.bias, a, self.b.T, beta=1, alpha=self.scale)
