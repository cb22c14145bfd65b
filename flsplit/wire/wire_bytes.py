"""The wire's own traffic model: bytes of each piece of a round as the data plane serializes it.

``SerializedWire`` implements ``flsplit.sim.traffic.WireModel`` by encoding tensors of the
right shapes through the run's codecs and Flower's records, exactly as the runtime does, and
counting ``Array.data`` (payload, ``.npy`` header, per-tensor scale, labels). A workload
predicted with it equals the one measured from a finished round, so the two prices agree to
rounding (``tests/test_one_price.py``). Sizes are cached per (cut, rows).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord

from flsplit.wire import protocol as p
from flsplit.wire.codecs import get_codec
from flsplit.model.splitting import SplitModel, block_output_shapes

__all__ = ["SerializedWire"]


def _record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


class SerializedWire:
    """Exact bytes per piece for one model, input shape and pair of codecs.

    Parameters
    ----------
    model : SplitModel
        The model (its dtype and per-cut activation shapes).
    input_shape : tuple of int
        One input sample's shape.
    codec_up, codec_down : str
        The run's codecs for smashed data and gradients.
    """

    def __init__(self, model: SplitModel, input_shape: tuple[int, ...], codec_up: str = "native",
                 codec_down: str = "native") -> None:
        self.model = model
        self.shapes = block_output_shapes(model, tuple(input_shape))
        self.dtype = next(model.blocks.parameters()).dtype
        self.codec_up, self.codec_down = get_codec(codec_up), get_codec(codec_down)
        self.up = lru_cache(maxsize=None)(self._up)
        self.down = lru_cache(maxsize=None)(self._down)
        self.broadcast = lru_cache(maxsize=None)(self._broadcast)
        self.part = lru_cache(maxsize=None)(self._part)

    def _tensor(self, cut: int, rows: float) -> torch.Tensor:
        return torch.ones((int(rows), *self.shapes[cut - 1]), dtype=self.dtype)

    def _up(self, cut: int, rows: float) -> float:
        x = self._tensor(cut, rows)
        batch = p.SmashedBatch(x, torch.zeros(int(rows), dtype=torch.int64))
        return float(_record_bytes(p.encode_batches([batch], self.codec_up)))

    def _down(self, cut: int, rows: float) -> float:
        return float(_record_bytes(p.encode_grads([self._tensor(cut, rows)], self.codec_down)))

    def _broadcast(self, cut: int, rows: float) -> float:
        record = ArrayRecord()
        self.codec_down.encode_into(record, "b", self._tensor(cut, rows))
        return float(_record_bytes(record))

    def _part(self, cut: int) -> float:
        return float(_record_bytes(ArrayRecord(self.model.client_part(cut).state_dict())))
