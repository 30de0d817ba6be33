"""Packed integer linear layers and their kernel dispatch.

Canonical layout (DESIGN.md section 4), identical on every device, all *persistent* buffers:

=============  ==================================  ==========================================
class          buffer                              meaning
=============  ==================================  ==========================================
Int8Linear     ``weight_int8``  int8  ``[N, K]``   codes in [-128, 127]
               ``scales``       bf16  ``[N, 1]``   one scale per output channel
Int4Linear     ``weight_packed`` uint8 ``[N, K/2]`` codes 0..15, low nibble = even column
               ``scales``       bf16  ``[N, G]``   G = K / group_size (1 when per channel)
               ``zeros``        uint8 ``[N, G]``   asymmetric only (symmetric: implicit 8)
=============  ==================================  ==========================================

Weight = ``(code - zero) * scale`` (see :mod:`qtrain.quant.primitives`).

A layer built from an ``nn.Linear`` with a bias (Qwen2's ``qkv``) also holds ``bias``, a float
``[N]`` buffer kept at full precision (``<layer>.bias`` in the state dict, absent without a
bias); every path adds it after the quantized matmul.

Kernels: ``quant.kernel=auto`` runs, per call, the first kernel of the one table in
:mod:`qtrain.quant.kernels` that fits the device, row count and layer (``native`` prefers
qtrain's own CPU decode kernels, ``torch`` skips them); otherwise, and with ``reference``, the
reference path: unpack, dequantize to float32, ``F.linear`` in float32, equal bit for bit to
:class:`~qtrain.quant.fake.FakeQuantLinear`'s forward on the same input. int8 dynamic
activations (``spec.activations == "int8"``) are quantized per token and dequantized first
(the same primitive as fake-quant).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.quant import kernels
from qtrain.quant import primitives as P
from qtrain.quant.embedding import TableEmbedding
from qtrain.quant.kernel_ops import PackedWeights
from qtrain.quant.kernels import INT4_KERNEL_GROUPS, KERNELS, check_kernel, kernel_group
from qtrain.quant.spec import LayerSpec

log = logging.getLogger(__name__)

__all__ = [  # check_kernel, kernel_group and the kernel names are re-exported from qtrain.quant.kernels
    "INT4_KERNEL_GROUPS",
    "KERNELS",
    "Int4Linear",
    "Int8Linear",
    "PackedLinear",
    "QuantEmbedding",
    "check_kernel",
    "kernel_group",
]


class PackedLinear(nn.Module):
    """Base of :class:`Int8Linear` and :class:`Int4Linear`: dispatch and kernel cache.

    Args:
        in_features: K.
        out_features: N.
        spec: the layer's spec (its bits must match the class).
        kernel: ``"auto"`` or ``"reference"``.
        name: module name, for errors and debug notes.
        device: where to allocate (``"meta"`` works).
        bias: hold a float32 ``[N]`` bias (zeros until set or loaded).

    Raises:
        ValueError: invalid spec for the layer, wrong bits for the class, unknown kernel.
    """

    bits: ClassVar[int] = 0
    scales: Tensor
    zeros: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        kernel: str = "auto",
        name: str = "",
        device: torch.device | str | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        cls_name = type(self).__name__
        spec.check(name or cls_name, in_features)
        if spec.bits != self.bits:
            raise ValueError(f"{name or cls_name}: {cls_name} needs bits={self.bits}, got {spec.bits}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.kernel = check_kernel(kernel)
        self.layer_name = name
        self._act_int8 = spec.activations == "int8"
        self._fast_key: tuple[object, ...] = ()
        self._fast_fn: kernels.Plan | None = None
        self._init_buffers(device)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    # -- subclass interface -------------------------------------------------------------------
    def _init_buffers(self, device: torch.device | str | None) -> None:
        """Register the zero-filled canonical buffers."""
        raise NotImplementedError

    def codes(self) -> Tensor:
        """Unpacked codes ``[N, K]`` (int8, or uint8 0..15)."""
        raise NotImplementedError

    def _row_codes(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def packed_weights(self) -> PackedWeights:
        """The canonical buffers, as the kernels take them."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def dequantize(self) -> Tensor:
        """Float32 weight ``[N, K]`` (reference path)."""
        return P.dequantize(self.codes(), self.scales, self.zeros, self.bits, self.spec.group_size)

    def dequantize_rows(self, idx: Tensor) -> Tensor:
        """Float32 rows ``idx`` of the weight: ``(...,)`` indices -> ``(..., K)``.

        Equal to ``dequantize()[idx]`` without dequantizing the other rows (embedding lookup).
        """
        flat = idx.reshape(-1)
        zeros = None if self.zeros is None else self.zeros[flat]
        w = P.dequantize(self._row_codes(flat), self.scales[flat], zeros, self.bits, self.spec.group_size)
        return w.reshape(*idx.shape, self.in_features)

    def quantized(self) -> P.QuantizedWeight:
        """Codes, scales and zeros as a :class:`~qtrain.quant.primitives.QuantizedWeight`."""
        return P.QuantizedWeight(self.codes(), self.scales, self.zeros)

    def set_bias(self, bias: Tensor | None) -> None:
        """Hold a copy of ``bias`` (``[N]``, float dtype kept), or none.

        Raises:
            ValueError: wrong shape or not a floating-point tensor (names the layer).
        """
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,) or not bias.is_floating_point():
                raise ValueError(
                    f"{self.layer_name}: bias must be a float tensor of shape ({self.out_features},), "
                    f"got {bias.dtype} {tuple(bias.shape)}"
                )
            bias = bias.detach().clone()
        self.register_buffer("bias", bias)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Unpack, dequantize, ``F.linear`` (bias included) in float32; output in x's dtype."""
        if self._act_int8:
            x = P.fake_quantize_per_token(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(), bias).to(x.dtype)

    def _fast(self, device: torch.device) -> kernels.Plan | None:
        """The kernel plan for ``device`` (:func:`qtrain.quant.kernels.plan`), built once per
        (device, kernel, buffer identity/version)."""
        bufs = [(b.data_ptr(), b._version) for b in self._buffers.values() if b is not None]
        key = (device, self.kernel, *bufs)
        if key != self._fast_key:
            self._fast_fn = kernels.plan(self.packed_weights(), device, self.kernel, self._note)
            self._fast_key = key
        return self._fast_fn

    def _note(self, why: str) -> None:
        log.debug("%s: fast int%d kernel unavailable (%s); using the reference path", self.layer_name, self.bits, why)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., K) -> (..., N)`` through the selected kernel, then the bias (if any)."""
        if self.kernel != "reference":
            fast = self._fast(x.device)
            if fast is not None:  # the fast path quantizes activations itself (int8 dynamic)
                y = fast(x if x.dim() == 2 else x.reshape(-1, self.in_features))
                if y is not None:
                    y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
                    return y if self.bias is None else y + self.bias.to(y.dtype)
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, activations={s.activations}, kernel={self.kernel}, "
            f"bias={self.bias is not None}"
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        kernel: str = "auto",
        name: str = "",
        device: torch.device | str | None = None,
        bias: bool = False,
    ) -> PackedLinear:
        """Zero-filled module of the right buffer shapes, to load a checkpoint into.

        Args:
            in_features: K.
            out_features: N.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.
            device: where to allocate (``"meta"`` works).
            bias: hold a float32 ``[N]`` bias.

        Returns:
            The module.
        """
        return cls(in_features, out_features, spec, kernel, name, device=device, bias=bias)

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        spec: LayerSpec,
        kernel: str = "auto",
        name: str = "",
        bias: Tensor | None = None,
    ) -> PackedLinear:
        """Module holding the given unpacked codes and parameters.

        Args:
            codes: ``[N, K]`` codes (int8, or uint8 0..15 for int4).
            scales: ``[N, G]`` scales (stored as bf16; must already be bf16 values).
            zeros: ``uint8 [N, G]`` (asymmetric int4) or None.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.
            bias: optional float ``[N]`` bias (copied, kept at full precision).

        Returns:
            The module.

        Raises:
            ValueError: shapes do not match the spec, or a bias of the wrong shape.
        """
        n, k = codes.shape
        mod = cls.empty(k, n, spec, kernel, name, device=codes.device)
        if tuple(scales.shape) != tuple(mod.scales.shape):
            raise ValueError(f"{name}: scales shape {tuple(scales.shape)} != expected {tuple(mod.scales.shape)}")
        mod._store(codes, scales, zeros)
        mod.set_bias(bias)
        return mod

    @classmethod
    def from_float(
        cls, weight: Tensor, spec: LayerSpec, kernel: str = "auto", name: str = "", bias: Tensor | None = None
    ) -> PackedLinear:
        """Quantize a float ``[N, K]`` weight (round to nearest) into a packed module.

        Args:
            weight: ``[N, K]`` float weight.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.
            bias: optional float ``[N]`` bias (kept at full precision).

        Returns:
            The module.

        Raises:
            ValueError: the spec does not fit the weight.
        """
        spec.check(name or cls.__name__, weight.shape[1])
        qw = P.quantize_weight(weight, spec.bits, spec.group_size, spec.symmetric)
        return cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name, bias)

    def _store(self, codes: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
        raise NotImplementedError


class Int8Linear(PackedLinear):
    """Int8 weight-only (optionally int8 dynamic activations) linear, per-channel scales.

    Buffers: ``weight_int8`` int8 ``[N, K]``, ``scales`` bf16 ``[N, 1]``.

    Example:
        >>> spec = LayerSpec("int8", bits=8)
        >>> q = Int8Linear.from_float(torch.randn(256, 128), spec)
        >>> y = q(torch.randn(1, 128))  # (1, 256)
    """

    bits = 8
    weight_int8: Tensor

    def _init_buffers(self, device: torch.device | str | None) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("weight_int8", torch.zeros(n, k, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(n, 1, dtype=P.SCALE_DTYPE, device=device))
        self.register_buffer("zeros", None)

    def _store(self, codes: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
        self.weight_int8.copy_(codes.to(torch.int8))
        self.scales.copy_(scales.to(P.SCALE_DTYPE))

    def codes(self) -> Tensor:
        return self.weight_int8

    def _row_codes(self, rows: Tensor) -> Tensor:
        return self.weight_int8[rows]

    def packed_weights(self) -> PackedWeights:
        return PackedWeights(8, self.weight_int8, self.scales, None, self.in_features, -1, self._act_int8)


class Int4Linear(PackedLinear):
    """Int4 per-group weight linear (symmetric or asymmetric), optional int8 activations.

    Buffers: ``weight_packed`` uint8 ``[N, K/2]``, ``scales`` bf16 ``[N, G]`` and, when
    asymmetric, ``zeros`` uint8 ``[N, G]``.

    Example:
        >>> spec = LayerSpec("int4", bits=4, group_size=32)
        >>> q = Int4Linear.from_float(torch.randn(256, 128), spec)
        >>> y = q(torch.randn(1, 128))  # (1, 256)
    """

    bits = 4
    weight_packed: Tensor

    def _init_buffers(self, device: torch.device | str | None) -> None:
        n, k, name = self.out_features, self.in_features, self.layer_name
        if k % 2 != 0:
            raise ValueError(f"{name or 'Int4Linear'}: int4 packing needs an even input size, got K={k}")
        g = self.spec.groups(k)
        self.register_buffer("weight_packed", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n, g, dtype=P.SCALE_DTYPE, device=device))
        zeros = None if self.spec.symmetric else torch.zeros(n, g, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)

    def _store(self, codes: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
        self.weight_packed.copy_(P.pack_int4(codes))
        self.scales.copy_(scales.to(P.SCALE_DTYPE))
        if self.zeros is not None:
            if zeros is None:
                raise ValueError(f"{self.layer_name}: asymmetric int4 needs zero points")
            self.zeros.copy_(zeros)

    def codes(self) -> Tensor:
        return P.unpack_int4(self.weight_packed)

    def _row_codes(self, rows: Tensor) -> Tensor:
        return P.unpack_int4(self.weight_packed[rows])

    def packed_weights(self) -> PackedWeights:
        s = self.spec
        group = kernel_group(s, self.in_features)
        return PackedWeights(
            4, self.weight_packed, self.scales, self.zeros, self.in_features, s.group_size, self._act_int8, group
        )


class QuantEmbedding(TableEmbedding):
    """Embedding lookup over a packed table: gathers code rows and dequantizes them.

    The table is an :class:`Int8Linear`/:class:`Int4Linear`; tied, it *is* the model's packed
    ``lm_head`` and the lookup reads the head's codes (see
    :class:`~qtrain.quant.embedding.TableEmbedding`).

    Args:
        table: the packed table module.
        tied_to: name of the module owning ``table`` when tied, else None.
        name: this module's name.
    """

    def get_table(self) -> PackedLinear:
        """The packed table (the tied head's module when tied)."""
        t = self.table_module()
        assert isinstance(t, PackedLinear)
        return t

    def forward(self, idx: Tensor) -> Tensor:
        """Dequantized rows: ``(B, T) -> (B, T, d)`` float32."""
        return self.get_table().dequantize_rows(idx)
