"""flsplit.wire.npy: the same bytes as Flower's Array(tensor), the same tensors (and errors) as
Array.numpy()."""

import numpy as np
import pytest
import torch
from flwr.app import Array

from flsplit.wire.npy import array_of, tensor_of

TENSORS = [
    torch.randn(64, 6, 14, 14),
    torch.randn(()),
    torch.tensor(1.5, dtype=torch.float64),
    torch.randint(0, 10, (64,)),
    torch.zeros(0, 3),
    torch.zeros(2, 0, 5),
    torch.randn(3, 4).half(),
    torch.ones(5, dtype=torch.bool),
    torch.randint(0, 255, (7, 3), dtype=torch.uint8),
    torch.arange(10, dtype=torch.int8),
    torch.randn(2, 3, 4, 5, 6, 7, 8),
    torch.randn(10, 10).t(),  # not C-contiguous: Flower's own path
]


@pytest.mark.parametrize("tensor", TENSORS, ids=lambda t: f"{t.dtype}-{tuple(t.shape)}-{t.is_contiguous()}")
def test_same_bytes_and_values_as_flower(tensor):
    ours, flowers = array_of(tensor), Array(tensor)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    back, ref = tensor_of(flowers), torch.from_numpy(flowers.numpy())
    assert back.dtype == ref.dtype and back.shape == ref.shape and torch.equal(back, ref)
    again = tensor_of(flowers)  # the header now comes from the cache
    assert torch.equal(again, ref)
    assert not tensor.numel() or again.data_ptr() != back.data_ptr()  # a new tensor each time


def test_decoded_tensor_owns_its_memory():
    array = Array(torch.ones(4))
    t = tensor_of(array)
    t.zero_()  # writable, and the payload is untouched
    assert torch.equal(torch.from_numpy(array.numpy()), torch.ones(4))


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as err:  # noqa: BLE001
        return type(err), str(err)


ones = Array(torch.ones(3))
BAD = {
    "garbage": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x93NUMPY garbage"),
    "pickle-stype": Array(dtype="float32", shape=(3,), stype="pickle", data=ones.data),
    "short-payload": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=ones.data[:-4]),
    "no-magic": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not npy at all"),
    "header-only": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=ones.data[:12]),
    "strings": Array(np.array(["a", "b"])),
    "big-endian": Array(np.ones(3, dtype=">f4")),
    "fortran-order": Array(np.asfortranarray(np.ones((3, 4)))),
    "trailing-bytes": Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=ones.data + b"xx"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_odd_payloads_as_numpy_reads_them(name):
    array = BAD[name]
    old, new = _outcome(lambda: torch.from_numpy(array.numpy())), _outcome(lambda: tensor_of(array))
    if old[0] == "ok":
        assert new[0] == "ok" and torch.equal(old[1], new[1])
    else:
        assert new == old
