"""The one GPU/device rule (mixray.algorithms.devices), pure: no Ray, no GPU needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixray.algorithms.devices import gpus_to_use, resolve_device
from mixray.errors import ConfigError, ResourceError


@pytest.mark.parametrize("request_, available, device, want", [
    ("auto", 0, "auto", 0.0), ("auto", 4, "auto", 1.0), (0, 4, "auto", 0.0), (2, 4, "auto", 2.0),
    (0.5, 1, "auto", 0.5), ("auto", 4, "cpu", 0.0), (2, 0, "cpu", 0.0), ("auto", 1, "cuda", 1.0),
])
def test_gpus_to_use(request_, available, device, want):
    assert gpus_to_use(request_, available, device=device) == want


def test_asking_for_more_than_there_is_names_the_setting():
    with pytest.raises(ResourceError, match=r"num_gpus=2 but there is only 1 GPU\(s\).*\(cluster.num_gpus\)"):
        gpus_to_use(2, 1, where="cluster.num_gpus")
    with pytest.raises(ResourceError, match=r"device='cuda' but there is no CUDA device.*\(select.device\)"):
        gpus_to_use("auto", 0, device="cuda", where="select.device")
    with pytest.raises(ConfigError, match="num_gpus must be 'auto' or a number >= 0, got 'many'"):
        gpus_to_use("many", 1)
    with pytest.raises(ConfigError, match=r"device must be one of \['auto', 'cpu', 'cuda'\], got 'gpu'"):
        gpus_to_use("auto", 1, device="gpu")


@pytest.fixture
def cpu_machine(monkeypatch):
    """What a machine without CUDA sees (the tests also run on GPU machines)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_on_a_cpu_machine(cpu_machine):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, like=np.zeros(3)) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ResourceError, match="device='cuda' but there is no CUDA device"):
        resolve_device("cuda", where="select.device")
    with pytest.raises(ResourceError):
        resolve_device("cuda:1")


def test_selector_asking_for_cuda_fails_with_one_line(cpu_machine):
    """Issue 9: select.device=cuda on a CPU machine must be a user error, not a traceback."""
    from mixray.algorithms.qdit import QDITSelector

    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ResourceError, match=r"device='cuda'.*\(device\)"):
        QDITSelector(3, 0.0, device="cuda").fit(x)
