"""Layer 1: pure functions on numpy arrays / torch tensors. No Ray, no I/O, no config.

Imports only the standard library, numpy, scipy, torch, scikit-learn,
``mixray.algorithms``, ``mixray.errors`` and ``mixray.choices``
(tests/unit/test_layers.py checks every import, function-level ones included).

- ``facility`` (package): QDIT's exact, matrix-free facility-location greedy; ``qdit``:
  its sklearn-shaped facade, validation and baselines;
- ``kmeans``: Lloyd KMeans kernels, the Lloyd loop and the ``KMeans`` estimator;
- ``mdit``: MDIT's mix planner, mixed vectors, nearest-to-centroid selection;
- ``losses``, ``batching``, ``sampling``, ``ifd``, ``pooling``: training and scoring math;
- ``devices`` (the one GPU/device rule), ``params`` (declarative parameter checks),
  ``cores`` (how many CPUs a process may use), ``threads`` (torch threads, heap trimming).
"""
