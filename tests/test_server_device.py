"""The server part's device (``server-device``, issue 13 item 3).

This machine has no GPU: the CUDA comparison below runs only where torch sees one; here the
tests check how the key is resolved and refused.
"""

from __future__ import annotations

import pytest
import torch

from apps.task import RunSettings
from flsplit.runtime.server import resolve_device
from flsplit.strategies import EPSL, PSL, SFLV1
from tests.helpers import random_data, run_strategy


def test_auto_is_cuda_when_present_else_the_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", "", "mps"])
def test_a_device_that_is_not_cpu_or_cuda_is_refused_naming_the_key(spec):
    with pytest.raises(ValueError, match="server-device must be"):
        resolve_device(spec)
    with pytest.raises(ValueError, match="server-device must be"):
        RunSettings({"server-device": spec})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="torch sees 0 CUDA device"):
        run_strategy(PSL, [random_data(8, seed=1)], server_device="cuda")
    RunSettings({"server-device": "cuda:1"})  # the run config is valid: clients need no GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", [PSL, EPSL, SFLV1])
def test_server_part_on_cuda_equals_the_cpu_run_to_float_tolerance(scheme):
    parts = [random_data(16, seed=2), random_data(16, seed=3)]
    settings = dict(num_rounds=2, cut_layer=3, batch_size=8, momentum=0.9)
    _, on_cpu, _ = run_strategy(scheme, parts, **settings)
    strategy, on_gpu, _ = run_strategy(scheme, parts, server_device="cuda", **settings)
    assert next(strategy.model.blocks.parameters()).is_cuda
    a, b = on_cpu.arrays.to_torch_state_dict(), on_gpu.arrays.to_torch_state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-10) for k in a)
