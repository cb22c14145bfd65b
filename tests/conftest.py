"""Shared fixtures: every test gets its own FLWR_HOME and Flower's offline settings."""

from __future__ import annotations

import flwr
import pytest
import torch


def pytest_report_header(config):
    """The Flower and torch the suite runs on (CI runs it on more than one flwr)."""
    return f"flwr {flwr.__version__}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _flower_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small batches: one thread is as fast, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
