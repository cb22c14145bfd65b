"""The optimizers a split part trains with, and their state as flat tensors.

Both sides of a cut build their optimizer here from the round's ``TrainingSettings``: ``sgd``
(``torch.optim.SGD`` with momentum and weight decay) or ``adamw`` (``torch.optim.AdamW``,
torch's default betas ``(0.9, 0.999)`` and eps ``1e-8``). Adam's update is elementwise per
parameter, like SGD's, so a split model steps exactly as the unsplit one does.

The state leaves the optimizer as one tensor per parameter and state entry, keyed
``"<param>"`` for SGD's momentum buffer (the key SGD's state always had) and
``"<param>.<entry>"`` for the others (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``), where
``<param>`` is a parameter's index (a client's ``context.state``) or name (the server part,
checkpoints). A client stores it between the messages of a round; with ``carry_momentum`` both
sides carry it into the next round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from flsplit.wire.protocol import OPTIMIZERS

__all__ = ["OPTIMIZERS", "build_optimizer", "state_tensors", "load_state_tensors", "state_fits"]

_MOMENTUM = "momentum_buffer"


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, learning_rate: float, momentum: float = 0.0,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (settings checked by ``TrainingSettings``)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def _key(param_key: str, entry: str) -> str:
    return param_key if entry == _MOMENTUM else f"{param_key}.{entry}"


def state_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Every state tensor of ``params`` (keyed by ``params``' keys), detached, not copied: the
    optimizer changes them in place when it steps again (a client's trainer does not: it is
    dropped once its state is stored)."""
    out = {}
    for key, param in params.items():
        for entry, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                out[_key(key, entry)] = value.detach()
    return out


def load_state_tensors(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.nn.Parameter],
                       state: Mapping[str, torch.Tensor], copy: bool = False) -> None:
    """Give each parameter the state ``state_tensors`` returned for it. A parameter whose state
    is missing an entry its optimizer keeps, or does not fit it (shape, dtype), starts fresh.
    ``copy``: the optimizer gets copies, and ``state`` is left as it is when it steps (a state
    the caller keeps); otherwise it takes the tensors themselves (a client's, just decoded)."""
    entries = _entries(optimizer)
    for key, param in params.items():
        found = {e: state.get(_key(key, e)) for e in entries}
        if any(v is None or not _fits(e, v, param) for e, v in found.items()):
            continue
        # Adam's step count stays on the CPU (torch's non-capturable Adam requires it there).
        optimizer.state[param] = {e: (v.clone() if copy else v) if e == "step" else v.to(param.device, copy=copy)
                                  for e, v in found.items()}


def state_fits(state: Mapping[str, torch.Tensor], params: Mapping[str, torch.nn.Parameter]) -> bool:
    """Whether every tensor of ``state`` belongs to one of ``params`` and fits it (shape and
    dtype; a step count is a scalar)."""
    for key, value in state.items():
        param_key, _, entry = key.partition(".")
        param = params.get(param_key)
        if param is None or not _fits(entry, value, param):
            return False
    return True


def _fits(entry: str, value: torch.Tensor, param: torch.nn.Parameter) -> bool:
    """A state tensor fits its parameter: the parameter's shape and dtype (a step count is a scalar)."""
    return entry == "step" or (value.shape == param.shape and value.dtype == param.dtype)


def _entries(optimizer: torch.optim.Optimizer) -> Sequence[str]:
    """The per-parameter state entries the optimizer keeps once it has stepped."""
    if isinstance(optimizer, torch.optim.AdamW):
        return ("step", "exp_avg", "exp_avg_sq")
    return (_MOMENTUM,)
