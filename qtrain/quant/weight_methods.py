"""PTQ of one weight at a time: round to nearest, and the MSE clipping search.

- ``rtn``: :func:`~qtrain.quant.primitives.choose_qparams` then round to nearest.
- ``mse``: per group (per row for int8), try ``grid`` shrink ratios of the range,
  ``1, 1 - 1/grid, ...`` down to ``1 - MSE_MAX_SHRINK``, and keep the scales (and zeros)
  with the smallest squared reconstruction error of that group's weights.

The scales returned are exactly the ones the codes are computed with (bf16-rounded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtrain.quant import primitives as P
from qtrain.quant.spec import LayerSpec, QuantizedWeight

MSE_MAX_SHRINK = 0.8
"""The MSE search tries ranges down to (1 - MSE_MAX_SHRINK) of the full one."""


def mse_qparams(weight: Tensor, spec: LayerSpec, grid: int = 100) -> tuple[Tensor, Tensor | None]:
    """Per-group clipping search minimising the weight's squared reconstruction error.

    Args:
        weight: ``[N, K]`` float weight.
        spec: layer spec (bits, group size, symmetry).
        grid: number of candidate shrink ratios.

    Returns:
        ``(scales bf16 [N, G], zeros uint8 [N, G] | None)``; never worse than round to nearest
        (ratio 1 is a candidate).

    Raises:
        ValueError: grid < 1 or the spec does not fit the weight.
    """
    if grid < 1:
        raise ValueError(f"ptq.mse_grid must be >= 1 (got {grid})")
    w = weight.detach().float()
    wg = P.group_view(w, spec.group_size)  # (N, G, g)
    best_s: Tensor | None = None
    best_z: Tensor | None = None
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    for i in range(grid):
        ratio = 1.0 - MSE_MAX_SHRINK * i / grid
        s, z = P.choose_qparams(w, spec.bits, spec.group_size, spec.symmetric, clip_ratio=ratio)
        w_hat, _ = P.fake_quantize(w, s, z, spec.bits, spec.group_size)
        err = (P.group_view(w_hat, spec.group_size) - wg).square_().sum(dim=-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = s if best_s is None else torch.where(better, s, best_s)
        if z is not None:
            best_z = z if best_z is None else torch.where(better, z, best_z)
    assert best_s is not None
    return best_s, best_z


def rtn_quantize(weight: Tensor, spec: LayerSpec) -> QuantizedWeight:
    """Round-to-nearest codes with the primitives' qparams."""
    return P.quantize_weight(weight, spec.bits, spec.group_size, spec.symmetric)


def mse_quantize(weight: Tensor, spec: LayerSpec, grid: int = 100) -> QuantizedWeight:
    """Codes with :func:`mse_qparams` scales."""
    scales, zeros = mse_qparams(weight, spec, grid)
    return QuantizedWeight(P.quantize(weight, scales, zeros, spec.bits, spec.group_size), scales, zeros)
