"""flsplit: split learning at the network edge on Flower.

The library, by layer: one subpackage per layer, imports flow down this list, never up
(``tests/test_layers.py`` checks it):

``flsplit.model``
    ``splitting`` (blocks and cuts; ``as_split_model``), ``graph_split`` (any ``nn.Module`` from
    its torch.fx graph), ``zoo`` (built-in models), ``profile`` (per-cut FLOPs and
    sizes), ``rng`` (torch's generator shared by threads: dropout masks a client redraws).
``flsplit.wire``
    ``protocol`` (record names, ``SplitConfig``, checks), ``codecs``, ``wire_bytes``, ``gate``
    (every reply checked before anything trains on it).
``flsplit.sim``
    kernels, scenario types, ``schemes`` (each scheme's traffic model and timing, one table),
    workloads, traffic models, the one price, ``checks`` (the one validator family); ``scenario_files``
    (scenario files and run-config overrides) and the shipped ``scenarios``.
``flsplit.data``
    ``datasets`` (the run's data and partitions), ``local`` (a device's own files).
``flsplit.planes``
    ``dataplane`` (the server half of a data plane, the traffic meter, Flower messages),
    ``endpoint`` (the client half and its registry), ``registry`` (every plane folder, reached
    from the run config), ``stream`` (the TLS session plane, both halves), ``inprocess`` (a
    Grid for tests and benchmarks).
``flsplit.runtime``
    ``trainer`` (the client's round, no Flower types), ``client`` and ``clientapp`` (the
    ClientApp side), ``server`` (server part and step rules), ``optim`` (SGD or AdamW, their
    state as tensors), ``aggregation``, ``schedules``
    (one round over a plane), ``exchange`` (a round's state as one
    value), ``checkpoint`` (and ``checkpoint_seal``, the digests of its JSON), ``history``;
    ``server_stream`` (the server part's own dropout stream).
``flsplit.planners``
    ``PlanningProblem``, ``Plan``, one registry, the solvers, planners in the loop.
``flsplit.strategies``
    the Flower strategies, one module per scheme (a link to the repository's ``strategies/``).
``flsplit.cli``
    the ``flsplit`` command: ``plan``, ``partition``, ``report`` (over ``report_runs`` and
    ``report_plots``), ``make_certs``; ``args`` (argument types they share).

``flsplit.extras`` names the optional dependencies. The Flower app of this repository
(``apps``) is not part of the installed package.
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

from flsplit.runtime.client import SplitClient  # noqa: E402
from flsplit.runtime.clientapp import register_split_handlers, split_client_app  # noqa: E402
from flsplit.data.datasets import TensorData  # noqa: E402
from flsplit.model.splitting import SplitModel, as_split_model, flatten_torchvision  # noqa: E402
from flsplit.model.zoo import build_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "SplitClient", "SplitModel", "TensorData", "as_split_model", "build_model", "flatten_torchvision",
    "register_split_handlers", "split_client_app",
]
