"""flsplit: split learning at the network edge on Flower.

The library, by layer (imports flow down this list's dependencies, never up):

model
    ``splitting`` (blocks and cuts; ``as_split_model``), ``graph_split`` (any ``nn.Module`` from
    its torch.fx graph), ``zoo`` (built-in models), ``profile`` (per-cut FLOPs and sizes).
wire
    ``protocol`` (record names, ``SplitConfig``, checks), ``codecs``, ``wire_bytes``, ``gate``
    (every reply checked before anything trains on it).
planes
    ``dataplane`` (the server half of a data plane, the traffic meter, Flower messages),
    ``endpoint`` (the client half and its registry), ``stream/`` (the TLS session plane, both
    halves), ``inprocess`` (a Grid for tests and benchmarks).
runtime
    ``trainer`` (the client's round, no Flower types), ``client`` and ``clientapp`` (the
    ClientApp side), ``server`` (server part and step rules), ``aggregation``, ``schedules``
    (one round over a plane; each declares its timing), ``exchange`` (a round's state as one
    value), ``checkpoint``, ``history``, ``rng``.
sim
    ``sim/`` (kernels, scenario types, workloads, traffic models, the one price),
    ``scenario`` (scenario files and run-config overrides).
planners
    ``planners/`` (``PlanningProblem``, ``Plan``, one registry, the solvers, planners in the loop).
data and cli
    ``data``, ``local_data``, ``cli`` with ``plan_command``, ``partition_command``,
    ``report``, ``deploy_keys``; ``extras`` (optional dependencies).

The Flower strategies, one module per scheme, are ``strategies`` (a link to the repository's
``strategies/``). The Flower app of this repository (``apps``) is not part of the installed
package.
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
