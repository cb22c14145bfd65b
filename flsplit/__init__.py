"""flsplit: split learning at the network edge on Flower.

The library: splitting models at a cut (``splitting``, ``zoo``), measured per-cut profiles
(``profile``), the split exchange over Flower messages (``protocol``, ``dataplane``), the
client and server runtimes (``client``, ``clientapp``, ``server``), layer-wise aggregation,
data and run history; the Flower strategies, one module per scheme (``strategies``). The
Flower app of this repository (``apps``) is not part of the installed package.
"""

import os as _os

# flsplit/strategies is a relative symlink to the repository's strategies/, which git, static
# tools, editable installs and the wheel (as plain files) all follow. Flower's FAB builder
# (`flwr run .`) drops symlinks, so a FAB has strategies/ beside flsplit/ and no
# flsplit/strategies: there the package's search path gains that directory (as
# pkgutil.extend_path extends it), so flsplit.strategies is still the one copy of the strategies.
if not _os.path.isdir(_os.path.join(__path__[0], "strategies")) and _os.path.isfile(
    _os.path.join(_os.path.dirname(__path__[0]), "strategies", "__init__.py")
):
    __path__.append(_os.path.dirname(__path__[0]))

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
