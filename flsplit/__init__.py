"""flsplit: split learning at the network edge on Flower.

The library: splitting models at a cut (``splitting``, ``zoo``), measured per-cut profiles
(``profile``), the split exchange over Flower messages (``protocol``, ``dataplane``), the
client and server runtimes (``client``, ``clientapp``, ``server``), layer-wise aggregation,
data and run history; the Flower strategies, one module per scheme (``strategies``). The
Flower app of this repository (``apps``) is not part of the installed package.
"""

from flsplit import _checkout

_checkout.install()  # a source checkout: flsplit.strategies is the repository's strategies/

from flsplit.client import SplitClient  # noqa: E402
from flsplit.clientapp import register_split_handlers, split_client_app  # noqa: E402
from flsplit.data import TensorData  # noqa: E402
from flsplit.splitting import SplitModel, as_split_model, flatten_torchvision  # noqa: E402
from flsplit.zoo import build_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "SplitClient", "SplitModel", "TensorData", "as_split_model", "build_model", "flatten_torchvision",
    "register_split_handlers", "split_client_app",
]
