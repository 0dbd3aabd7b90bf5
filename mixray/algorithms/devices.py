"""The one rule for GPUs and torch devices, shared by every layer.

``gpus_to_use(request, available)`` decides how many GPUs a component uses,
from what it asks for and what exists: ``"auto"`` takes one GPU when there is
one and none otherwise; a number is taken as given and must be available;
``device="cpu"`` forces none. ``resolve_device`` applies that rule to this
process's CUDA devices; ``mixray.distributed.runtime.gpus_per_actor`` applies
it to the GPUs of the Ray cluster (per actor). Nothing assumes CUDA.
"""

from __future__ import annotations

from numbers import Real

import torch

from mixray.choices import DEVICES
from mixray.errors import ConfigError, ResourceError


def gpus_to_use(request: float | str, available: float, *, device: str = "auto",
                where: str | None = None) -> float:
    """GPUs to use: ``"auto"`` -> 1 if ``available >= 1`` else 0; a number -> itself.

    ``device="cpu"`` -> 0 whatever the request; ``device="cuda"`` needs at least one
    GPU. Raises :class:`~mixray.errors.ResourceError` (naming ``where``) when the
    request exceeds ``available``, :class:`~mixray.errors.ConfigError` for a value
    that is neither ``"auto"`` nor a number >= 0.
    """
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {list(DEVICES)}, got {device!r}", where)
    if device == "cpu":
        return 0.0
    if request == "auto":
        want = 1.0 if available >= 1 else 0.0
    elif isinstance(request, bool) or not isinstance(request, Real) or request < 0:
        raise ConfigError(f"num_gpus must be 'auto' or a number >= 0, got {request!r}", where)
    else:
        want = float(request)
    if device == "cuda":
        want = max(want, 1.0)
    if want > available:
        have = "no CUDA device" if available == 0 else f"only {available:g} GPU(s)"
        raise ResourceError(f"{_asked(request, device)} but there is {have}; use device 'auto' "
                            "or 'cpu', or num_gpus 'auto' or 0", where)
    return want


def _asked(request: float | str, device: str) -> str:
    return "device='cuda'" if device == "cuda" else f"num_gpus={request}"


def resolve_device(device: str | torch.device | None = "auto", *, like=None,
                   where: str | None = None) -> torch.device:
    """The torch device of this process's work.

    ``None``: where ``like`` lives (a CUDA tensor stays on its GPU; numpy -> CPU);
    a ``torch.device`` or ``"cuda:N"``: as given; ``"auto"``: CUDA when this process
    sees a CUDA device, else CPU; ``"cpu"``; ``"cuda"``: CUDA, or ResourceError.
    """
    if device is None:
        return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str) and device.startswith("cuda:"):
        gpus_to_use("auto", torch.cuda.device_count(), device="cuda", where=where)
        return torch.device(device)
    use = gpus_to_use("auto", torch.cuda.device_count(), device=device, where=where)
    return torch.device("cuda" if use else "cpu")
