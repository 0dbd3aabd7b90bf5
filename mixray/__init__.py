"""mixray: data-centric instruction tuning at cluster scale, on Ray.

Layers (see DESIGN.md): ``mixray.algorithms`` (pure numpy/torch),
``mixray.models`` (model loading and batch callables, no Ray),
``mixray.distributed`` (Ray Data / Ray actors), ``mixray.stages`` (config ->
Parquet in the run directory), ``mixray.cli`` (entry point).
"""

__version__ = "0.1.0"
