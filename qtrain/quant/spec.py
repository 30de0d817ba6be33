"""What an integer code is: the bit widths, their code ranges, and a layer's quantization spec.

The bit-width table :data:`WIDTHS` is the one place a width's facts live; everything else
(code ranges, implicit zero points, storage dtypes, which layouts a width allows) derives
from it:

====  ==================  ==========================  ===============  =======================
bits  stored code          implicit zero (symmetric)   signed range     layouts
====  ==================  ==========================  ===============  =======================
8     int8 [-128, 127]     0                           [-128, 127]      per output channel, symmetric
4     uint8 0..15          8 = 2^(bits-1)              [-8, 7]          groups along K, or asymmetric
====  ==================  ==========================  ===============  =======================

A new bit width is one row here (and, if it packs differently, a packed module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class BitWidth:
    """One weight bit width.

    Attributes:
        bits: bits per code.
        signed: codes stored as signed integers centred on 0 (no zero point); otherwise
            unsigned ``0 .. 2^bits - 1`` with the implicit zero ``2^(bits-1)``.
        grouped: weights may be quantized in groups along K (otherwise per output channel).
        asymmetric: an explicit per-group zero point is allowed.
    """

    bits: int
    signed: bool
    grouped: bool
    asymmetric: bool

    @property
    def code_range(self) -> tuple[int, int]:
        """Inclusive bounds of the stored codes."""
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)

    @property
    def implicit_zero(self) -> int:
        """The zero point of symmetric codes (0 for signed codes, the middle code otherwise)."""
        return 0 if self.signed else 1 << (self.bits - 1)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of unpacked codes."""
        return torch.int8 if self.signed else torch.uint8


WIDTHS: dict[int, BitWidth] = {
    4: BitWidth(4, signed=False, grouped=True, asymmetric=True),
    8: BitWidth(8, signed=True, grouped=False, asymmetric=False),
}
"""The supported weight bit widths."""
SUPPORTED_BITS = tuple(WIDTHS)
ACTIVATION_BITS = 8
"""Dynamic activation quantization (``activations="int8"``): signed 8-bit codes per token."""
ACTIVATION_MODES = ("none", "int8")


Row = TypeVar("Row")


def table_row(table: Mapping[str, Row], name: str, key: str) -> Row:
    """The row ``name`` of a registry (schemes, PTQ methods).

    Raises:
        ValueError: unknown name, naming the config ``key`` and listing the valid names.
    """
    if name not in table:
        raise ValueError(f"{key}={name!r} is not one of {list(table)}")
    return table[name]


def width(bits: int) -> BitWidth:
    """The :data:`WIDTHS` row of ``bits``.

    Raises:
        ValueError: an unsupported width (lists the supported ones).
    """
    if bits not in WIDTHS:
        raise ValueError(f"bits={bits} is not supported; use one of {list(SUPPORTED_BITS)}")
    return WIDTHS[bits]


def code_range(bits: int) -> tuple[int, int]:
    """Stored code range ``(lo, hi)``: (-128, 127) for 8 bits, (0, 15) for 4 bits.

    Raises:
        ValueError: unsupported bits.
    """
    return width(bits).code_range


def implicit_zero(bits: int) -> int:
    """Zero point of symmetric codes: 0 for int8, 8 for int4 (codes stored as q + 8)."""
    return width(bits).implicit_zero


def code_dtype(bits: int) -> torch.dtype:
    """Dtype of unpacked codes: int8 for 8 bits, uint8 for 4 bits."""
    return width(bits).dtype


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is quantized (the per-layer entry of a checkpoint manifest).

    Attributes:
        scheme: scheme name from :data:`qtrain.quant.schemes.SCHEMES` (informational here).
        bits: weight bits (a key of :data:`WIDTHS`).
        group_size: columns per scale along K, or -1 for one scale per output channel.
        symmetric: symmetric codes, or asymmetric with a uint8 zero point per group.
        activations: ``"none"`` or ``"int8"`` (dynamic per-token activation quantization).

    Example:
        >>> spec = LayerSpec("int4", bits=4, group_size=32)
        >>> LayerSpec.from_dict(spec.to_dict()) == spec
        True
    """

    scheme: str
    bits: int
    group_size: int = -1
    symmetric: bool = True
    activations: str = "none"

    def groups(self, in_features: int) -> int:
        """Scales per output row for a layer with ``in_features`` inputs."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check(self, layer: str, in_features: int) -> None:
        """Validate this spec for a layer.

        Args:
            layer: module name used in error messages.
            in_features: the layer's K.

        Raises:
            ValueError: unsupported bits; group size not -1 and not dividing K; a layout the
                width does not allow (int8: groups or asymmetric); unknown activation mode.
        """
        if self.bits not in WIDTHS:
            raise ValueError(f"{layer}: bits={self.bits} is not supported; use one of {list(SUPPORTED_BITS)}")
        if self.group_size != -1 and (self.group_size <= 0 or in_features % self.group_size != 0):
            raise ValueError(
                f"{layer}: group_size={self.group_size} does not divide its input size K={in_features}; "
                "use a divisor of K or -1 (per channel)"
            )
        w = WIDTHS[self.bits]
        if (not w.grouped and self.group_size != -1) or (not w.asymmetric and not self.symmetric):
            raise ValueError(
                f"{layer}: int{self.bits} weights are symmetric per output channel (group_size=-1, symmetric)"
            )
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(f"{layer}: activations={self.activations!r} is not one of {list(ACTIVATION_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        """Build from :meth:`to_dict` output; extra keys (layer metadata) are ignored.

        Raises:
            ValueError: ``scheme`` or ``bits`` is missing.
        """
        missing = [f.name for f in fields(cls) if f.name in ("scheme", "bits") and f.name not in data]
        if missing:
            raise ValueError(f"layer spec {data!r} lacks key(s) {missing}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class QuantizedWeight(NamedTuple):
    """Integer codes plus the parameters that reconstruct them.

    Attributes:
        codes: unpacked ``[N, K]`` codes (int8 for 8 bits, uint8 for 4 bits).
        scales: ``bfloat16 [N, G]``.
        zeros: ``uint8 [N, G]`` when asymmetric, else ``None``.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor | None
