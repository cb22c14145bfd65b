"""Optional dependencies: import one where a feature needs it, or say which extra installs it.

The base install (``pip install flsplit``) runs the Flower app, the strategies, the simulator
and ``flsplit plan`` without energy-budgeted convex programs. Three features need more:

- ``planners`` (cvxpy): EPSL's power step with energy budgets and ``allocate_sflga(solver="cvxpy")``;
- ``reports`` (matplotlib): the PNG plots of ``flsplit report``;
- ``transformers`` (transformers, peft): Hugging Face models cut at a block (``flsplit.model.hf``)
  and LoRA adapters on a split model's blocks (``flsplit.model.lora``).

Each import site calls :func:`require`, so importing ``flsplit`` or the default ClientApp and
ServerApp imports neither cvxpy nor matplotlib, and a missing one is an ``ImportError`` that
names the feature and the command that installs it. (flwr-datasets, a base dependency because
its partitioners split every simulated dataset, requires matplotlib and imports it when the
first partition is drawn; so today ``reports`` adds nothing to a base install, and it states
flsplit's own need for matplotlib.)
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "install_command", "require"]

# Each optional top-level module, and the extra of pyproject.toml that installs it.
EXTRAS = {"cvxpy": "planners", "matplotlib": "reports", "transformers": "transformers", "peft": "transformers"}


class MissingExtra(ImportError):
    """An optional dependency that a feature needs is not installed."""


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f'pip install "flsplit[{extra}]"'


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"cvxpy"`` or ``"matplotlib.figure"``) for ``feature``.

    Raises
    ------
    MissingExtra
        When ``module`` or a package above it is not installed: ``"{feature} needs {package}:
        pip install "flsplit[{extra}]""``. An installed package that fails for another reason
        (one of its own dependencies broken) raises its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        parts = module.split(".")
        missing = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if err.name not in missing:
            raise
        raise MissingExtra(f"{feature} needs {parts[0]}: {install_command(extra)}", name=parts[0]) from err
