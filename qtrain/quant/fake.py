"""Fake-quantized modules for quantization-aware training.

:class:`FakeQuantLinear` replaces ``nn.Linear`` during QAT: its forward quantizes and
dequantizes the weight with exactly the rounding of :mod:`qtrain.quant.primitives` (so the
codes it trains with are the codes ``convert`` stores) and passes gradients straight
through. Scales come from one of three sources:

- dynamic (default): recomputed from the weight on every forward (``choose_qparams``);
- learnable (``learn_scales=True``): an fp32 ``nn.Parameter`` initialised from the same
  qparams (or from PTQ scales), trained LSQ-style; the forward uses its bf16 rounding, with a
  straight-through gradient to the fp32 value. Asymmetric int4 keeps its integer zero point
  *fixed* at the initial value (zero points must stay integers to be stored);
- frozen (after :meth:`FakeQuantLinear.freeze`, or explicit scales from a packed
  checkpoint): fixed values; the codes then depend only on the weight.

State dict of a FakeQuantLinear: ``weight``, ``bias`` (only when the wrapped linear has one:
full precision, never quantized, added after the fake-quantized matmul), ``scales`` (fp32 ``[N, G]``; a parameter when
learnable), ``zeros`` (uint8 ``[N, G]``, asymmetric int4 only), and the bool flags
``weight_enabled``, ``act_enabled``, ``frozen``. In dynamic mode ``scales``/``zeros`` hold the
values of the last forward.

Example:
    >>> spec = LayerSpec("int4", bits=4, group_size=32)
    >>> fq = FakeQuantLinear.from_linear(nn.Linear(64, 32, bias=False), spec, name="proj")
    >>> y = fq(torch.randn(4, 64))  # trains with int4 group-32 fake quantization
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.quant import primitives as P
from qtrain.quant.autograd import FakeQuantWeight, FakeQuantWeightLSQ, fake_quantize_activation
from qtrain.quant.embedding import TableEmbedding
from qtrain.quant.spec import LayerSpec, QuantizedWeight

WeightHook = Callable[[str, Tensor], Tensor | None]
"""``fn(module_name, fake_weight) -> replacement or None``, run on every fake-quantized weight."""


class FakeQuantLinear(nn.Module):
    """``nn.Linear`` whose weight, and optionally input, are fake-quantized (a bias stays full precision).

    Args:
        in_features: K.
        out_features: N.
        spec: the layer's quantization spec.
        learn_scales: make ``scales`` a learnable parameter (LSQ).
        name: module name passed to weight hooks and used in errors.
        device: where to allocate (ignored when ``weight`` is given).
        weight: an existing parameter to use (shared, not copied).
        bias: an existing ``[N]`` bias parameter to use (shared, not copied), or None (no bias).

    Raises:
        ValueError: the spec is invalid for this layer (names the layer).
    """

    scales: Tensor
    zeros: Tensor | None
    bias: nn.Parameter | None
    weight_enabled: Tensor
    act_enabled: Tensor
    frozen: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: LayerSpec,
        learn_scales: bool = False,
        name: str = "",
        device: torch.device | str | None = None,
        weight: nn.Parameter | None = None,
        bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        spec.check(name or "FakeQuantLinear", in_features)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.layer_name = name
        self.learn_scales = learn_scales
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        elif tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({out_features},)")
        device = weight.device
        self.weight = weight
        self.register_parameter("bias", bias)
        scales = torch.ones(out_features, spec.groups(in_features), device=device)
        if learn_scales:
            self.scales = nn.Parameter(scales)
        else:
            self.register_buffer("scales", scales)
        self.register_buffer("zeros", None if spec.symmetric else torch.zeros_like(scales, dtype=torch.uint8))
        self.register_buffer("weight_enabled", torch.tensor(True, device=device))
        self.register_buffer("act_enabled", torch.tensor(spec.activations == "int8", device=device))
        self.register_buffer("frozen", torch.tensor(False, device=device))
        self.weight_hooks: list[WeightHook] = []
        lo, hi = P.code_range(spec.bits)
        q_pos = hi - (lo if not spec.symmetric else P.implicit_zero(spec.bits))
        g = in_features if spec.group_size == -1 else spec.group_size
        self.grad_scale = 1.0 / math.sqrt(g * q_pos)
        self._flag_key: tuple[int, ...] = ()
        self._flag_val = (True, spec.activations == "int8", False)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: LayerSpec,
        name: str = "",
        learn_scales: bool = False,
        scales: Tensor | None = None,
        zeros: Tensor | None = None,
    ) -> FakeQuantLinear:
        """Wrap an ``nn.Linear``, sharing its weight (ties survive) and bias parameters.

        Args:
            linear: the module to replace.
            spec: quantization spec.
            name: module name (hooks, errors).
            learn_scales: learnable LSQ scales.
            scales: optional initial ``[N, G]`` scales (e.g. from MSE/GPTQ PTQ); without
                ``learn_scales`` they are kept fixed (frozen).
            zeros: initial ``uint8 [N, G]`` zero points (asymmetric, with ``scales``).

        Returns:
            The new module.

        Raises:
            ValueError: the spec does not fit the linear.
        """
        w = cast(nn.Parameter, linear.weight)  # nn.Module keeps parameters as nn.Parameter
        bias = cast(nn.Parameter | None, linear.bias)
        fq = cls(w.shape[1], w.shape[0], spec, learn_scales, name, weight=w, bias=bias)
        explicit = scales is not None
        if scales is None and w.device.type != "meta":
            scales, zeros = P.choose_qparams(w, spec.bits, spec.group_size, spec.symmetric)
        if scales is not None:
            fq._set_qparams(scales, zeros)
        if explicit and not learn_scales:
            fq.frozen.fill_(True)
        fq._flags()
        return fq

    @classmethod
    def from_packed(cls, packed: nn.Module, name: str = "", learn_scales: bool = False) -> FakeQuantLinear:
        """Fake-quant module reproducing a packed layer's codes exactly (for fine-tuning).

        The weight is the dequantized codes and the scales (and zeros) are the packed ones,
        frozen unless ``learn_scales``; its forward re-derives the very same codes. A packed
        bias becomes a trainable bias parameter (a copy).

        Args:
            packed: an ``Int8Linear`` / ``Int4Linear``.
            name: module name.
            learn_scales: continue training the scales (initialised from the packed ones).

        Returns:
            The new module.
        """
        spec: LayerSpec = packed.spec  # type: ignore[assignment]
        w = nn.Parameter(packed.dequantize())  # type: ignore[operator]
        b = packed.bias
        bias = None if b is None else nn.Parameter(b.detach().clone())  # type: ignore[operator]
        fq = cls(w.shape[1], w.shape[0], spec, learn_scales, name, weight=w, bias=bias)
        fq._set_qparams(packed.scales, packed.zeros)  # type: ignore[arg-type]
        if not learn_scales:
            fq.frozen.fill_(True)
        fq._flags()
        return fq

    def to_linear(self) -> nn.Linear:
        """Plain ``nn.Linear`` sharing this module's weight (and bias) parameter."""
        lin = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        lin.weight = self.weight
        lin.register_parameter("bias", self.bias)
        return lin

    def _set_qparams(self, scales: Tensor, zeros: Tensor | None) -> None:
        with torch.no_grad():
            self.scales.copy_(P.round_scale(scales.detach().float()).float())
            if self.zeros is not None:
                if zeros is None:
                    raise ValueError(f"{self.layer_name}: asymmetric scales need zero points")
                self.zeros.copy_(zeros)

    # -- flags ------------------------------------------------------------------------------
    def _flags(self) -> tuple[bool, bool, bool]:
        """(weight_enabled, act_enabled, frozen) as Python bools, re-read only on change.

        Eagerly, a change of the flag buffers (by the methods below, ``load_state_dict`` or
        a direct ``fill_``) is noticed through their version counters. Under
        ``torch.compile`` the cached bools are constants of the graph (guarded, so a change
        made through :meth:`enable`, :meth:`freeze` or ``load_state_dict`` recompiles) and no
        tensor is read, which would break the graph at every layer.
        """
        if torch.compiler.is_compiling() or self.weight_enabled.is_meta:  # meta: a shape-only skeleton
            return self._flag_val
        bufs = (self.weight_enabled, self.act_enabled, self.frozen)
        key = tuple(x for b in bufs for x in (b.data_ptr(), b._version))
        if key != self._flag_key:
            self._flag_val = (bool(bufs[0]), bool(bufs[1]), bool(bufs[2]))
            self._flag_key = key
        return self._flag_val

    def flags(self) -> tuple[bool, bool, bool]:
        """``(weight_enabled, act_enabled, frozen)`` as Python bools (no device sync)."""
        return self._flags()

    def enable(self, weight: bool | None = None, activations: bool | None = None) -> None:
        """Switch weight and/or activation fake quantization on or off.

        Args:
            weight: new weight flag (None: unchanged).
            activations: new activation flag (None: unchanged); only meaningful for
                ``spec.activations == "int8"``.
        """
        if weight is not None:
            self.weight_enabled.fill_(weight)
        if activations is not None:
            self.act_enabled.fill_(activations)
        self._flags()

    def freeze(self) -> None:
        """Fix the scales (and zeros) at their current effective bf16 values.

        Learnable scales stop receiving gradients (``requires_grad=False``); dynamic scales
        stop tracking the weight. Afterwards the codes depend only on the weight.
        """
        qw = self.qparams()
        self._set_qparams(qw[0], qw[1])
        self.frozen.fill_(True)
        if isinstance(self.scales, nn.Parameter):
            self.scales.requires_grad_(False)
        self._flags()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._flags()  # refresh the cached bools (a compiled forward reads only those)

    # -- quantization -----------------------------------------------------------------------
    def qparams(self) -> tuple[Tensor, Tensor | None]:
        """Effective ``(scales bf16 [N, G], zeros uint8 [N, G] | None)`` for the current weight."""
        _, _, frozen = self._flags()
        if frozen or self.learn_scales:
            return P.round_scale(self.scales.detach().float()), self.zeros
        s = self.spec
        return P.choose_qparams(self.weight, s.bits, s.group_size, s.symmetric)

    def quantized(self) -> QuantizedWeight:
        """Codes and parameters the next forward uses (what ``convert`` stores)."""
        scales, zeros = self.qparams()
        codes = P.quantize(self.weight, scales, zeros, self.spec.bits, self.spec.group_size)
        return QuantizedWeight(codes, scales, zeros)

    def _quant_dequant(self) -> Tensor:
        s = self.spec
        _, _, frozen = self._flags()
        if self.learn_scales and not frozen:
            out: Tensor = FakeQuantWeightLSQ.apply(
                self.weight, self.scales, self.zeros, s.bits, s.group_size, self.grad_scale
            )
            return out
        scales, zeros = self.qparams()
        if not frozen and not self.learn_scales:
            with torch.no_grad():  # record the last forward's dynamic qparams
                self.scales.copy_(scales)
                if self.zeros is not None and zeros is not None:
                    self.zeros.copy_(zeros)
        out = FakeQuantWeight.apply(self.weight, scales, zeros, s.bits, s.group_size)
        return out

    def fake_weight(self, hook_name: str | None = None) -> Tensor:
        """The weight as the forward sees it (fake-quantized when enabled, hooks applied).

        Args:
            hook_name: name passed to hooks (default: this module's name).

        Returns:
            ``[N, K]`` tensor with gradient to ``weight`` (and learnable ``scales``).
        """
        w_on, _, _ = self._flags()
        if not w_on:
            return self.weight
        w = self._quant_dequant()
        for fn in self.weight_hooks:
            out = fn(hook_name or self.layer_name, w)
            if out is not None:
                w = out
        return w

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(fq_act(x), fq(weight), bias)``; shapes ``(..., K) -> (..., N)``."""
        _, a_on, _ = self._flags()
        if a_on:
            x = fake_quantize_activation(x)
        return F.linear(x, self.fake_weight(), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
            f"group_size={s.group_size}, symmetric={s.symmetric}, activations={s.activations}, "
            f"learn_scales={self.learn_scales}, bias={self.bias is not None}"
        )


class FakeQuantEmbedding(TableEmbedding):
    """Embedding lookup that reads a fake-quantized table (a :class:`FakeQuantLinear`).

    See :class:`~qtrain.quant.embedding.TableEmbedding` for the table and the tied case.

    Args:
        table: the fake-quant table module.
        tied_to: name of the module owning ``table`` when tied (e.g. ``"lm_head"``), else None.
        name: this module's name (passed to weight hooks).
    """

    def get_table(self) -> FakeQuantLinear:
        """The fake-quant table (the tied head's module when tied)."""
        t = self.table_module()
        assert isinstance(t, FakeQuantLinear)
        return t

    @classmethod
    def from_embedding(
        cls,
        emb: nn.Embedding,
        spec: LayerSpec,
        name: str = "tok_emb",
        learn_scales: bool = False,
        **qparams: Tensor | None,
    ) -> FakeQuantEmbedding:
        """Own fake-quant table for an untied ``nn.Embedding`` (shares its weight parameter).

        ``qparams``: optional initial ``scales``/``zeros``, as in :meth:`FakeQuantLinear.from_linear`.
        """
        lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
        lin.weight = emb.weight
        return cls(FakeQuantLinear.from_linear(lin, spec, name, learn_scales, **qparams), None, name)

    def to_embedding(self) -> nn.Embedding:
        """Plain ``nn.Embedding`` sharing the table's weight parameter."""
        t = self.get_table()
        emb = nn.Embedding(t.out_features, t.in_features, device="meta")
        emb.weight = t.weight
        return emb

    def forward(self, idx: Tensor) -> Tensor:
        """Rows of the fake-quantized table: ``(B, T) -> (B, T, d)``."""
        return F.embedding(idx, self.get_table().fake_weight(self.layer_name))
