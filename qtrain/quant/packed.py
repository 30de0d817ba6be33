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

Kernels (``kernel="auto"``; ``"native"`` forces qtrain's own CPU decode kernels where they
build and fit, ``"torch"`` skips them; ``"reference"`` forces the oracle; built by
:mod:`qtrain.quant.fastpaths`, whose constants are the row limits named here):

- reference: unpack, dequantize to float32, ``F.linear`` in float32. Equal bit for bit to
  :class:`~qtrain.quant.fake.FakeQuantLinear`'s forward on the same input.
- CPU, at most ``NATIVE_MAX_ROWS`` rows (decode): qtrain's own AVX2 kernels
  (:mod:`qtrain.quant.native`), reading the canonical buffers directly with float32
  activations, when they build (C compiler, AVX2), the layer fits them (int4 groups, int8 K a
  multiple of 32) and, with ``auto``, they are the faster on this machine: measured once per
  CPU, torch version, kernel build and thread count against PyTorch's kernels and cached
  (:mod:`qtrain.quant.autotune`; about 2x PyTorch's at one row on an AVX2 EPYC, slower than
  PyTorch's int4 on an AVX-512/AMX Xeon). Otherwise the next item.
- CPU, at most ``CPU_KERNEL_MAX_ROWS`` rows: ``aten._weight_int8pack_mm`` and
  ``aten._weight_int4pack_mm_for_cpu`` fed **bf16** activations (fp32 inputs are several
  times slower), output cast back. int4 weights are repacked once, on the first call that
  needs it, with ``_convert_weight_to_int4pack_for_cpu`` into a non-persistent cache. Above the row limit
  (prefill, evaluation) the dequantize + float32 matmul of the reference path is faster on
  CPU than these kernels, so it is used (transiently, per call).
- CUDA: int4 uses tinygemm ``aten._weight_int4pack_mm`` (bf16) for at most
  ``CUDA_TINYGEMM_MAX_ROWS`` rows, dequantize to bf16 + matmul above; int8 weights with int8
  activations use ``torch._int_mm`` (int8 x int8 -> int32, then both scales) above 16 rows;
  int8 at most ``GEMV_MAX_ROWS`` rows uses a ``torch.compile``-fused dequantize-GEMV
  (:func:`~qtrain.quant.fastpaths.int8_gemv`); otherwise dequantize to bf16 + matmul.
- int8 dynamic activations (``spec.activations == "int8"``): the input is quantized per token
  and dequantized (the same primitive as fake-quant), then the weight path runs on those
  activations.

Kernel conventions found by testing (torch 2.13, CPU): tinygemm computes
``(q - 8) * scale + zero`` from ``scale_and_zero [K/g, N, 2]`` (bf16), so symmetric codes
(``q = code``, zero 8) get ``zero = 0`` and asymmetric ones ``zero = (8 - z) * scale``
(rounded to bf16, hence not bit exact). Constraints: int4 CPU needs N % 16 == 0 (we pad N
with zero rows) and a group in {32, 64, 128, 256} (per channel uses the largest of those
dividing K with repeated scales; K % 32 != 0 falls back to reference); the int8 CPU kernel
needs K % 8 == 0 and **crashes the process** otherwise, so such layers use the reference.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.quant import fastpaths as fp
from qtrain.quant import primitives as P
from qtrain.quant.fastpaths import FastPath
from qtrain.quant.primitives import LayerSpec

log = logging.getLogger(__name__)

KERNELS = ("auto", "native", "torch", "reference")
INT4_KERNEL_GROUPS = (256, 128, 64, 32)


def check_kernel(kernel: str) -> str:
    """Return ``kernel`` if it is one of :data:`KERNELS`.

    Raises:
        ValueError: any other value (names ``quant.kernel``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"quant.kernel={kernel!r} is not one of {list(KERNELS)}")
    return kernel


def kernel_group(spec: LayerSpec, in_features: int) -> int | None:
    """Group size the int4 kernels can run this layer with, or None.

    Per-channel layers use the largest supported group dividing K (scales repeated).

    Args:
        spec: the layer spec.
        in_features: K.

    Returns:
        32, 64, 128 or 256, or None when no kernel group fits.
    """
    if spec.group_size in INT4_KERNEL_GROUPS:
        return spec.group_size
    if spec.group_size == -1:
        return next((g for g in INT4_KERNEL_GROUPS if in_features % g == 0), None)
    return None


class PackedLinear(nn.Module):
    """Base of :class:`Int8Linear` and :class:`Int4Linear`: dispatch and kernel cache.

    Args:
        in_features: K.
        out_features: N.
        spec: the layer's spec (its bits must match the class).
        kernel: ``"auto"`` or ``"reference"``.
        name: module name, for errors and debug notes.

    Raises:
        ValueError: invalid spec for the layer, wrong bits for the class, unknown kernel.
    """

    bits: ClassVar[int] = 0
    scales: Tensor
    zeros: Tensor | None

    def __init__(
        self, in_features: int, out_features: int, spec: LayerSpec, kernel: str = "auto", name: str = ""
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
        self._fast_fn: FastPath | None = None

    # -- subclass interface -------------------------------------------------------------------
    def codes(self) -> Tensor:
        """Unpacked codes ``[N, K]`` (int8, or uint8 0..15)."""
        raise NotImplementedError

    def _row_codes(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def _build_fast(self, device: torch.device) -> FastPath | None:
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

    def reference_forward(self, x: Tensor) -> Tensor:
        """Unpack, dequantize, ``F.linear`` in float32; output in x's dtype."""
        if self._act_int8:
            x = P.fake_quantize_per_token(x)
        return F.linear(x.float(), self.dequantize()).to(x.dtype)

    def _fast(self, device: torch.device) -> FastPath | None:
        """Fast path for ``device`` built once per (device, buffer identity/version)."""
        bufs = [(b.data_ptr(), b._version) for b in self._buffers.values() if b is not None]
        key = (device, self.kernel, *bufs)
        if key != self._fast_key:
            self._fast_fn = self._build_fast(device)
            self._fast_key = key
        return self._fast_fn

    def _note(self, why: str) -> None:
        log.debug("%s: fast int%d kernel unavailable (%s); using the reference path", self.layer_name, self.bits, why)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., K) -> (..., N)`` through the selected kernel."""
        if self.kernel != "reference":
            fast = self._fast(x.device)
            if fast is not None:  # the fast path quantizes activations itself (int8 dynamic)
                y = fast(x if x.dim() == 2 else x.reshape(-1, self.in_features))
                if y is not None:
                    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, activations={s.activations}, kernel={self.kernel}"
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
    ) -> PackedLinear:
        """Zero-filled module of the right buffer shapes, to load a checkpoint into.

        Args:
            in_features: K.
            out_features: N.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.
            device: where to allocate (``"meta"`` works).

        Returns:
            The module.
        """
        return cls(in_features, out_features, spec, kernel, name, device=device)  # type: ignore[call-arg]

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, zeros: Tensor | None, spec: LayerSpec, kernel: str = "auto", name: str = ""
    ) -> PackedLinear:
        """Module holding the given unpacked codes and parameters.

        Args:
            codes: ``[N, K]`` codes (int8, or uint8 0..15 for int4).
            scales: ``[N, G]`` scales (stored as bf16; must already be bf16 values).
            zeros: ``uint8 [N, G]`` (asymmetric int4) or None.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.

        Returns:
            The module.

        Raises:
            ValueError: shapes do not match the spec.
        """
        n, k = codes.shape
        mod = cls.empty(k, n, spec, kernel, name, device=codes.device)
        if tuple(scales.shape) != tuple(mod.scales.shape):
            raise ValueError(f"{name}: scales shape {tuple(scales.shape)} != expected {tuple(mod.scales.shape)}")
        mod._store(codes, scales, zeros)
        return mod

    @classmethod
    def from_float(cls, weight: Tensor, spec: LayerSpec, kernel: str = "auto", name: str = "") -> PackedLinear:
        """Quantize a float ``[N, K]`` weight (round to nearest) into a packed module.

        Args:
            weight: ``[N, K]`` float weight.
            spec: layer spec.
            kernel: ``"auto"`` or ``"reference"``.
            name: module name.

        Returns:
            The module.

        Raises:
            ValueError: the spec does not fit the weight.
        """
        spec.check(name or cls.__name__, weight.shape[1])
        qw = P.quantize_weight(weight, spec.bits, spec.group_size, spec.symmetric)
        return cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name)

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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        kernel: str = "auto",
        name: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, spec, kernel, name)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, 1, dtype=P.SCALE_DTYPE, device=device))
        self.register_buffer("zeros", None)

    def _store(self, codes: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
        self.weight_int8.copy_(codes.to(torch.int8))
        self.scales.copy_(scales.to(P.SCALE_DTYPE))

    def codes(self) -> Tensor:
        return self.weight_int8

    def _row_codes(self, rows: Tensor) -> Tensor:
        return self.weight_int8[rows]

    def _build_fast(self, device: torch.device) -> FastPath | None:
        w, scales, act = self.weight_int8, self.scales, self._act_int8
        if device.type == "cuda":
            return fp.int8_cuda(w, scales, act)
        if device.type != "cpu":
            self._note(f"no fast path on {device.type}")
            return None
        if self.in_features % 8 != 0:
            self._note(f"_weight_int8pack_mm needs K % 8 == 0, K={self.in_features}")
            return None
        return fp.int8_cpu(w, scales, act, self.kernel)


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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        kernel: str = "auto",
        name: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, spec, kernel, name)
        if in_features % 2 != 0:
            raise ValueError(f"{name or 'Int4Linear'}: int4 packing needs an even input size, got K={in_features}")
        g = spec.groups(in_features)
        packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scales", torch.ones(out_features, g, dtype=P.SCALE_DTYPE, device=device))
        zeros = None if spec.symmetric else torch.zeros(out_features, g, dtype=torch.uint8, device=device)
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

    def _build_fast(self, device: torch.device) -> FastPath | None:
        group = kernel_group(self.spec, self.in_features)
        if group is None:
            self._note(f"int4 kernels need a group in {list(INT4_KERNEL_GROUPS)} dividing K={self.in_features}")
            return None
        w = fp.Int4Weight(self.weight_packed, self.scales, self.zeros, self.in_features, self.spec.group_size)
        if device.type == "cuda":
            return fp.int4_cuda(w, group, self._act_int8, self._note)
        if device.type != "cpu":
            self._note(f"no fast path on {device.type}")
            return None
        return fp.int4_cpu(w, group, self._act_int8, self.kernel)


class QuantEmbedding(nn.Module):
    """Embedding lookup over a packed table: gathers code rows and dequantizes them.

    The table is an :class:`Int8Linear`/:class:`Int4Linear` over the ``[V, d]`` matrix. With
    tied embeddings it *is* the model's packed ``lm_head`` (held by reference, not registered,
    so its buffers are stored once, under ``lm_head``), and the lookup reads the head's codes.

    Args:
        table: the packed table module.
        tied_to: name of the module owning ``table`` when tied, else None.
        name: this module's name.
    """

    def __init__(self, table: PackedLinear, tied_to: str | None = None, name: str = "tok_emb") -> None:
        super().__init__()
        self.tied_to = tied_to
        self.layer_name = name
        if tied_to is None:
            self.table = table
        else:
            self.__dict__["_tied_table"] = table

    def get_table(self) -> PackedLinear:
        """The packed table (the tied head's module when tied)."""
        t = self.__dict__.get("_tied_table")
        if t is None:
            t = self._modules["table"]
        assert isinstance(t, PackedLinear)
        return t

    def forward(self, idx: Tensor) -> Tensor:
        """Dequantized rows: ``(B, T) -> (B, T, d)`` float32."""
        return self.get_table().dequantize_rows(idx)

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to}"
