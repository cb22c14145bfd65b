"""Wire codecs for tensors on the data plane (smashed data up, gradients down).

A codec turns a tensor into the arrays that go into a Flower message and back:

``native``
    the tensor as it is (lossless in its own dtype; float64 stays float64).
``fp32``, ``fp16``, ``bf16``
    a cast; bf16 travels as its raw 16-bit pattern (numpy has no bfloat16).
``fp8-e4m3``, ``fp8-e5m2``
    torch's ``float8_e4m3fn`` / ``float8_e5m2`` with a per-tensor scale
    ``amax / max_finite`` (448 and 57344), one byte per value plus a float32 scale. Round-trip
    error is at most about ``amax / 28`` (E4M3) and ``amax / 14`` (E5M2): half the spacing of
    the top binade relative to its largest value.
``int8``
    symmetric per-tensor scale ``amax / 127``, values rounded; error at most ``amax / 254``.

An all-zero tensor gets scale 1 (no division by zero). NaN or infinite inputs are refused:
encoding them would silently turn them into garbage or saturated values.

Float edges. The scale travels as float32 when float32 holds it as a normal number (every
tensor whose amax is a normal float32 times the codec's maximum); otherwise (amax in float32's
subnormal range, float64 tensors with amax far below or above float32's range) it travels as
float64 and the division and the multiplication are done in float64, so the bound above holds
there too. A scale float64 cannot hold as a normal number is refused at encoding. Unscaled
casts (``fp32``, ``fp16``, ``bf16``) refuse values beyond the wire dtype's range instead of
sending infinities; values below its smallest subnormal become zero (an absolute error of at
most that subnormal). Decoding refuses a payload whose values come out NaN or infinite in the
target dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from flwr.app import ArrayRecord

from flsplit.wire.npy import array_of, tensor_of

__all__ = ["Codec", "CODECS", "get_codec", "CodecError", "all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` has no NaN or infinity (numpy's check: about 10x faster on CPU tensors)."""
    if not t.is_floating_point():
        return True
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


class CodecError(ValueError):
    """A tensor cannot be encoded, or a payload does not decode as its codec says."""


@dataclass(frozen=True)
class Codec:
    """How one tensor crosses the wire.

    Attributes
    ----------
    name : str
        Codec name as used in run config (``codec-up``, ``codec-down``).
    wire_dtype : torch.dtype or None
        Dtype the values are cast to (``None``: keep the tensor's dtype).
    view_dtype : torch.dtype or None
        Integer dtype the payload is reinterpreted as for serialization (numpy has no
        bfloat16 or float8).
    max_value : float or None
        Largest finite value of a scaled codec; ``None`` for unscaled codecs.
    """

    name: str
    wire_dtype: Optional[torch.dtype] = None
    view_dtype: Optional[torch.dtype] = None
    max_value: Optional[float] = None

    @property
    def scaled(self) -> bool:
        return self.max_value is not None

    def encode_into(self, record: ArrayRecord, key: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` into ``record`` under ``key`` (and ``key + ".scale"`` if scaled)."""
        x = tensor.detach()
        if not all_finite(x):
            raise CodecError(f"{key}: refusing to encode NaN or infinite values with codec '{self.name}'")
        if self.scaled:
            amax = float(x.abs().max()) if x.numel() else 0.0
            scale = _scale_tensor(key, self.name, amax / self.max_value if amax > 0 else 1.0)
            record[f"{key}.scale"] = array_of(scale)
            work = torch.float64 if x.dtype == torch.float64 or scale.dtype == torch.float64 else torch.float32
            x = x.to(work) / float(scale)
            if self.wire_dtype == torch.int8:
                x = x.round().clamp_(-self.max_value, self.max_value)
        if self.wire_dtype is not None:
            narrowing = not self.scaled and x.is_floating_point() and torch.finfo(self.wire_dtype).max < torch.finfo(x.dtype).max
            x = x.to(self.wire_dtype)
            if narrowing and not all_finite(x):
                raise CodecError(f"{key}: values beyond {self.wire_dtype}'s range "
                                 f"(|x| > {torch.finfo(self.wire_dtype).max:.6g}) cannot be sent with codec '{self.name}'")
        if self.view_dtype is not None:
            x = x.view(self.view_dtype)
        record[key] = array_of(x.contiguous())

    def bytes_per_element(self, dtype: torch.dtype) -> int:
        """Payload bytes per value on the wire for tensors of ``dtype`` (scales not counted)."""
        return (self.view_dtype or self.wire_dtype or dtype).itemsize

    def decode_from(self, record: ArrayRecord, key: str, dtype: torch.dtype) -> torch.Tensor:
        """Read ``key`` from ``record`` and return it as a ``dtype`` tensor.

        Raises ``CodecError`` if the key, its scale, or the payload's dtype is not what this
        codec writes.
        """
        x = _read(record, key)
        expected = self.view_dtype or self.wire_dtype or dtype
        if x.dtype != expected:
            raise CodecError(f"{key}: wrong dtype {x.dtype}, expected {expected} (codec '{self.name}')")
        if self.view_dtype is not None:
            x = x.view(self.wire_dtype)
        x = x.to(dtype)
        if self.scaled:
            scale_key = f"{key}.scale"
            scale = _read(record, scale_key, f" (codec '{self.name}')")
            if scale.dtype not in (torch.float32, torch.float64):
                raise CodecError(f"{scale_key}: wrong dtype {scale.dtype}, expected float32 or float64")
            if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
                raise CodecError(f"{scale_key}: scale must be one positive finite number")
            if scale.dtype == torch.float64 and dtype != torch.float64:
                x = (x.to(torch.float64) * scale).to(dtype)  # the scale may not fit the target dtype
            else:
                x = x * scale.to(dtype)
            if not all_finite(x):
                raise CodecError(f"{key}: decodes to values beyond {dtype}'s range (scale {float(scale):.6g})")
        return x


def _read(record: ArrayRecord, key: str, missing_note: str = "") -> torch.Tensor:
    """The array at ``key`` as a new CPU tensor (one copy of the payload: ``flsplit.wire.npy``);
    ``CodecError`` if the key is missing (``missing_note`` appended to that message) or its payload
    is corrupt."""
    if key not in record:
        raise CodecError(f"missing key '{key}'{missing_note}")
    try:
        return tensor_of(record[key])
    except Exception as err:  # a corrupt numpy payload
        raise CodecError(f"cannot decode '{key}': {err}") from err


def _scale_tensor(key: str, codec: str, scale: float) -> torch.Tensor:
    """The scale as it travels: float32 when float32 holds it as a normal number, else float64;
    refused (``CodecError``) if float64 cannot either."""
    f32 = torch.finfo(torch.float32)
    if f32.tiny <= scale <= f32.max:
        return torch.tensor(scale, dtype=torch.float32)
    f64 = torch.finfo(torch.float64)
    if f64.tiny <= scale <= f64.max:
        return torch.tensor(scale, dtype=torch.float64)
    raise CodecError(f"{key}: amax too small or too large for codec '{codec}' (scale {scale:.3g} is not a normal float64)")


CODECS: dict[str, Codec] = {
    "native": Codec("native"),
    "fp32": Codec("fp32", torch.float32),
    "fp16": Codec("fp16", torch.float16),
    "bf16": Codec("bf16", torch.bfloat16, view_dtype=torch.int16),
    "fp8-e4m3": Codec("fp8-e4m3", torch.float8_e4m3fn, torch.uint8, float(torch.finfo(torch.float8_e4m3fn).max)),
    "fp8-e5m2": Codec("fp8-e5m2", torch.float8_e5m2, torch.uint8, float(torch.finfo(torch.float8_e5m2).max)),
    "int8": Codec("int8", torch.int8, max_value=127.0),
}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; unknown names raise ``ValueError`` listing the known ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return CODECS[name]
