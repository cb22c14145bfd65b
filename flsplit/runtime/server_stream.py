"""The server part's own random stream: dropout masks that depend on the strategy's seed only.

``ServerStream`` holds the generator states; ``StreamServerPart`` is a ``ServerPart`` whose
forward passes draw from one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from flsplit.model import rng
from flsplit.runtime.server import ServerPart

__all__ = ["ServerStream", "StreamServerPart"]


class ServerStream:
    """The random stream the server part's forward passes draw from: its dropout masks.

    Seeded from the strategy's seed, and swapped into torch's generator (under
    ``flsplit.model.rng``'s lock) for each server forward only, so the masks depend on the seed and
    on what the server has drawn before, not on what else the process draws (a ``model_fn``
    call, a client in the same process, the caller's own ``torch.rand``). On a CUDA server
    part the device's generator gets the same treatment.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.cpu = torch.Generator().manual_seed(self.seed).get_state()
        self.cuda: dict[int, torch.Tensor] = {}

    @contextmanager
    def drawing(self, device: torch.device) -> Iterator[None]:
        """Draws inside come from this stream; torch's own streams resume afterwards untouched."""
        cuda = []
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        with rng.shared(), torch.random.fork_rng(devices=cuda):
            torch.default_generator.set_state(self.cpu)
            for index in cuda:
                if index in self.cuda:
                    torch.cuda.set_rng_state(self.cuda[index], index)
                else:
                    torch.cuda.default_generators[index].manual_seed(self.seed)
            yield
            self.cpu = torch.default_generator.get_state()
            for index in cuda:
                self.cuda[index] = torch.cuda.get_rng_state(index)


class StreamServerPart(ServerPart):
    """A ``ServerPart`` whose forward passes draw from its strategy's ``ServerStream``."""

    stream: ServerStream

    def _forward(self, cut: int, x: torch.Tensor) -> torch.Tensor:
        with self.stream.drawing(x.device):
            return super()._forward(cut, x)
