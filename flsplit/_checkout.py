"""In a source checkout, ``flsplit.strategies`` is the repository's top-level ``strategies/``.

The repository keeps the design card's layout (``flsplit/``, ``strategies/``, ``apps/`` side by
side); a built wheel ships ``strategies/`` as ``flsplit/strategies`` (pyproject's
``[tool.hatch.build.targets.wheel.sources]``), so an installed flsplit adds nothing at top
level but ``flsplit``. An editable install puts the checkout on ``sys.path`` instead of
building that tree, and this finder makes ``import flsplit.strategies`` find the checkout's
directory. Installed from a wheel, ``flsplit/strategies`` exists and this finder is not added.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Optional, Sequence

_NAME = "flsplit.strategies"
_SOURCE = Path(__file__).resolve().parent.parent / "strategies"


class _CheckoutStrategies(importlib.abc.MetaPathFinder):
    """Finds ``flsplit.strategies`` (only that name; its submodules follow its ``__path__``)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target=None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(_NAME, _SOURCE / "__init__.py",
                                                      submodule_search_locations=[str(_SOURCE)])


def install() -> None:
    """Add the finder when this is a checkout (no ``flsplit/strategies`` beside this file)."""
    shipped = Path(__file__).resolve().parent / "strategies"
    if not shipped.is_dir() and (_SOURCE / "__init__.py").is_file():
        if not any(isinstance(f, _CheckoutStrategies) for f in sys.meta_path):
            sys.meta_path.append(_CheckoutStrategies())
