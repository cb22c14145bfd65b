"""flsplit: split learning at the network edge on Flower.

The library: splitting models at a cut (``splitting``, ``zoo``), measured per-cut profiles
(``profile``), the split exchange over Flower messages (``protocol``, ``dataplane``), the
client and server runtimes (``client``, ``server``), layer-wise aggregation, data and run
history. Strategies live in the top-level ``strategies`` package, the Flower app in ``apps``.
"""

from flsplit.splitting import SplitModel, as_split_model, flatten_torchvision
from flsplit.zoo import build_model

__version__ = "0.1.0"
__all__ = ["SplitModel", "as_split_model", "build_model", "flatten_torchvision"]
