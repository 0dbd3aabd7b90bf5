"""Torch threads and heap hygiene for the CPU kernels (facility location, KMeans).

``threads`` in mixray's glossary is the number of torch threads of one process
(the driver, a Ray actor or a Ray Train worker); its default is
:func:`mixray.algorithms.cores.available_cores`.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


class gemm_threads:
    """Context: run the enclosed (large, matrix-product-heavy) work with ``n`` torch threads.

    ``n = None`` leaves the setting as it is. The greedy's many small
    sparse/elementwise ops run single-threaded: on a shared or oversubscribed
    machine, short parallel regions stall on descheduled threads (measured 3-4x
    slower with 2 threads on 2 busy cores), while long matrix products still
    profit from every core. The previous setting is restored on exit.
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


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTORS_LOCK = threading.Lock()


def shared_executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, kept between calls (no per-call thread
    start-up, and each thread's OpenMP/MKL state is set up once). Used by KMeans's row
    workers and the facility-location gain products."""
    with _EXECUTORS_LOCK:
        if workers not in _EXECUTORS:
            _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mixray-workers")
        return _EXECUTORS[workers]


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    The first pass and compactions of the facility-location cache free many
    MB-sized temporaries of varying sizes; glibc keeps them in the heap, which
    measured +40% RSS at N = 50K.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
