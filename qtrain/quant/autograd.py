"""The autograd functions of fake quantization: forward through the primitives, custom backward.

- :class:`FakeQuantWeight`: quantize-dequantize with fixed scales; the straight-through
  gradient passes where the code was not clamped.
- :class:`FakeQuantWeightLSQ`: the same forward with a learnable scale (LSQ): the weight
  gradient as above, the scale gradient ``round(v) - v`` inside the range and the clamped
  level outside, times a per-layer ``grad_scale``; bf16 rounding of the scale is the identity.
- :class:`FakeQuantActivation`: int8 dynamic per-token quantize-dequantize, identity gradient.

Both weight functions round with :func:`qtrain.quant.primitives.round_clamp`, the rule convert
and PTQ use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant import primitives as P


class FakeQuantWeight(torch.autograd.Function):
    """Quantize-dequantize with fixed scales; gradient passes where the code was not clamped."""

    @staticmethod
    def forward(ctx, weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> Tensor:  # type: ignore[override]
        w_hat, inside = P.fake_quantize(weight, scales, zeros, bits, group_size)
        ctx.save_for_backward(inside)
        return w_hat.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class FakeQuantWeightLSQ(torch.autograd.Function):
    """Quantize-dequantize with a learnable scale (LSQ gradient, bf16 rounding as identity)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, weight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int, grad_scale: float
    ) -> Tensor:
        s = P.round_scale(scales.detach()).float()
        w_hat, _ = P.fake_quantize(weight, s, zeros, bits, group_size)
        ctx.save_for_backward(weight, scales, s, zeros)
        ctx.meta = (bits, group_size, grad_scale)
        return w_hat.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, scales, s, zeros = ctx.saved_tensors
        bits, group_size, grad_scale = ctx.meta
        lo, hi = P.signed_bounds(bits, zeros)
        n, k = weight.shape
        v = torch.div(P.group_view(weight.detach().float(), group_size), s.unsqueeze(-1))  # (N, G, g)
        qc, inside = P.round_clamp(v, lo, hi, inside=True, keep=True)  # the forward's codes
        assert inside is not None
        g = P.group_view(grad.float(), group_size)
        grad_w = (g * inside).reshape(n, k).to(weight.dtype)
        # d w_hat / d s: round(v) - v inside the range (where qc == round(v)), the clamped level outside (LSQ).
        dq_ds = torch.where(inside, qc - v, qc)
        grad_s = (g * dq_ds).sum(dim=-1) * grad_scale
        grad_s = grad_s * (scales >= P.SCALE_EPS)  # clamp_min in round_scale
        return grad_w, grad_s.to(scales.dtype), None, None, None, None


class FakeQuantActivation(torch.autograd.Function):
    """Per-token int8 quantize-dequantize; identity gradient (no clamping happens)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return P.fake_quantize_per_token(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def fake_quantize_activation(x: Tensor) -> Tensor:
    """Int8 dynamic per-token fake quantization with a straight-through gradient.

    Args:
        x: ``[..., K]`` activations.

    Returns:
        Tensor like ``x``, equal to :func:`primitives.fake_quantize_per_token`.
    """
    out: Tensor = FakeQuantActivation.apply(x)
    return out
