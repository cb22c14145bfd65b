"""Flower strategies for split learning, one module per scheme.

Each is a ``flwr.serverapp.strategy.Strategy`` whose ``start()`` runs the split exchanges,
usable from any ServerApp::

    strategy = PSL(model_fn=..., input_shape=(1, 8, 8), num_classes=10, cut_layer=2)
    # or: PSL(SplitSettings(model_fn=..., input_shape=(1, 8, 8), num_classes=10), cut_layer=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.blocks.state_dict()))
"""

if __name__ != "flsplit.strategies":  # one name, one copy of each class
    raise ImportError(f"flsplit's strategies are imported as flsplit.strategies, not as {__name__!r}")

from flsplit.strategies.async_sl import AsyncSL
from flsplit.strategies.base import SplitStrategy
from flsplit.strategies.epsl import EPSL
from flsplit.strategies.psl import PSL
from flsplit.strategies.sflv1 import SFLV1
from flsplit.strategies.sflv2 import SFLV2
from flsplit.strategies.sflga import SFLGA
from flsplit.strategies.settings import SplitSettings
from flsplit.strategies.sl import SL

STRATEGIES = {"sl": SL, "sflv1": SFLV1, "sflv2": SFLV2, "psl": PSL, "epsl": EPSL, "sflga": SFLGA, "async": AsyncSL}

__all__ = ["SplitStrategy", "SplitSettings", "SL", "SFLV1", "SFLV2", "PSL", "EPSL", "SFLGA", "AsyncSL", "STRATEGIES"]
