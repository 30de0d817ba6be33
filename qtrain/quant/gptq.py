"""GPTQ (Frantar et al. 2022, as in gpt-fast): column-wise rounding with Hessian error compensation.

Blocks are processed in order; inputs of the first block are captured on the calibration
batches, each block's target linears get a Hessian ``H = 2 X^T X / n`` from their inputs, are
quantized column by column with error compensation (dampening ``damp * mean(diag H)``,
Cholesky of the inverse, lazy batch updates of ``GPTQ_BLOCK`` columns), and the block's outputs
*with quantized weights* feed the next block. With ``act_order`` (the default) columns go in
order of decreasing Hessian diagonal (the inputs that carry most energy first, while most
columns are left to absorb their error) and every group's qparams are fixed beforehand from the
original weights ("static groups": groups stay contiguous, so the packed format is unchanged);
without it, group qparams are computed when a group's first column is reached, from the
already-updated weights. Layers outside ``model.blocks`` (the head)
are done last from one full forward pass; an embedding table (no inputs) is left to convert
(round to nearest).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qtrain.progress import phase
from qtrain.quant import primitives as P
from qtrain.quant.schemes import EMBEDDING
from qtrain.quant.spec import LayerSpec, QuantizedWeight
from qtrain.quant.targets import layer_shape
from qtrain.quant.transforms import float_weight, swap_packed
from qtrain.quant.weight_methods import mse_qparams

GPTQ_BLOCK = 128
"""Columns per lazy-batch update in GPTQ (raised to the group size when larger)."""


def _inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the dead-column mask."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    spec: LayerSpec,
    damp: float = 0.01,
    block_size: int = GPTQ_BLOCK,
    mse_grid: int = 0,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ codes of one weight given its input Hessian.

    Args:
        weight: ``[N, K]`` float weight.
        hessian: ``[K, K]`` ``2 X^T X / n`` of the layer's inputs.
        spec: layer spec.
        damp: dampening as a fraction of the mean Hessian diagonal.
        block_size: columns per lazy batch update.
        mse_grid: when > 0, each group's qparams come from a clipping search (as in ``mse``)
            over the group's error-compensated weights at the moment GPTQ reaches it, instead
            of max-abs; 0 keeps plain GPTQ. With ``act_order`` the search runs once per group
            on the original weights.
        act_order: columns in order of decreasing Hessian diagonal, with static group qparams
            (see the module docstring).

    Returns:
        Codes, and the exact scales (zeros) they were computed with.

    Raises:
        ValueError: the spec does not fit, or the Hessian is not ``[K, K]``.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match K={k}")
    spec.check("gptq", k)
    with _single_thread():  # many small ops: intra-op threads only add sync (and stall badly on a busy CPU)
        if act_order:
            return _gptq_act_order(w, hessian, spec, damp, block_size, mse_grid)
        return _gptq(w, hessian, spec, damp, block_size, mse_grid)


def _gptq(w: Tensor, hessian: Tensor, spec: LayerSpec, damp: float, block_size: int, mse_grid: int) -> QuantizedWeight:
    n, k = w.shape
    hinv, dead = _inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0.0
    g = k if spec.group_size == -1 else spec.group_size
    block = max(block_size, g) // g * g  # groups never straddle a block
    n_groups = k // g
    codes = torch.empty(n, k, dtype=P.code_dtype(spec.bits), device=w.device)
    scales = torch.empty(n, n_groups, dtype=P.SCALE_DTYPE, device=w.device)
    zeros = None if spec.symmetric else torch.empty(n, n_groups, dtype=torch.uint8, device=w.device)
    _gptq_columns(w, hinv, spec, block, codes, scales, zeros, mse_grid)
    return QuantizedWeight(codes, scales, zeros)


def _gptq_act_order(
    w: Tensor, hessian: Tensor, spec: LayerSpec, damp: float, block_size: int, mse_grid: int
) -> QuantizedWeight:
    """GPTQ over the columns in decreasing ``diag(H)`` order with static (original-weight) group qparams."""
    k = w.shape[1]
    if mse_grid > 0:
        scales, zeros = mse_qparams(w, spec, mse_grid)
    else:
        scales, zeros = P.choose_qparams(w, spec.bits, spec.group_size, spec.symmetric)
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    hinv, dead = _inverse_hessian_factor(hessian[perm][:, perm], damp)
    wp = w[:, perm]
    wp[:, dead] = 0.0
    group = perm // (k if spec.group_size == -1 else spec.group_size)  # group of each permuted column
    codes_p = torch.empty(w.shape, dtype=P.code_dtype(spec.bits), device=w.device)
    _gptq_columns(wp, hinv, spec, block_size, codes_p, scales, zeros, static_group=group)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    return QuantizedWeight(codes, scales, zeros)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gptq_columns(
    w: Tensor,
    hinv: Tensor,
    spec: LayerSpec,
    block: int,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    mse_grid: int = 0,
    static_group: Tensor | None = None,
) -> None:
    """Column loop of GPTQ, filling ``codes``/``scales``/``zeros`` in place (w is updated).

    With ``static_group`` (the group of each column, act-order) ``scales``/``zeros`` are given
    and only read; without, each group's qparams are chosen when its first column is reached.
    """
    k = w.shape[1]
    g = k if spec.group_size == -1 else spec.group_size
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if static_group is not None:
                gi = int(static_group[col])
                s, z = scales[:, gi : gi + 1], None if zeros is None else zeros[:, gi : gi + 1]
            elif col % g == 0:  # new group: qparams from the (already updated) group weights
                slab = w1[:, i : i + g]
                if mse_grid > 0:
                    s, z = mse_qparams(slab, dataclasses.replace(spec, group_size=-1), mse_grid)
                else:
                    s, z = P.choose_qparams(slab, spec.bits, -1, spec.symmetric)
                scales[:, col // g] = s[:, 0]
                if zeros is not None and z is not None:
                    zeros[:, col // g] = z[:, 0]
            q = P.quantize(w1[:, i : i + 1], s, z, spec.bits, -1)  # (N, 1)
            codes[:, col] = q[:, 0]
            err = (w1[:, i] - P.dequantize(q, s, z, spec.bits, -1)[:, 0]) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


# -- calibration ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


class HessianHook:
    """Accumulates ``sum X^T X`` and the row count of a module's inputs.

    With ``act_int8`` the inputs are first fake-quantized per token, as the deployed layer
    (int8 dynamic activations) will see them, so GPTQ compensates the error of the product
    the model actually computes.
    """

    def __init__(self, k: int, device: torch.device, act_int8: bool = False) -> None:
        self.xtx = torch.zeros(k, k, device=device)
        self.rows = 0
        self.act_int8 = act_int8

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (rows, K)
        if self.act_int8:
            x = P.fake_quantize_per_token(x)
        self.xtx.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        return self.xtx * (2.0 / max(self.rows, 1))


def _capture_block_inputs(model: nn.Module, first: nn.Module, calib: Sequence[Tensor]) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` of the first block's call for each calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib:
            with contextlib.suppress(_Stop):
                model(batch)
    finally:
        handle.remove()
    return captured


def _hessians(run: Callable[[], object], model: nn.Module, names: list[str], act_int8: bool) -> dict[str, Tensor]:
    """Run ``run()`` with input hooks on ``names``; return their Hessians."""
    hooks: dict[str, HessianHook] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        hooks[name] = HessianHook(layer_shape(mod)[0], float_weight(model, name).device, act_int8)
        handles.append(mod.register_forward_pre_hook(hooks[name]))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: h.hessian() for n, h in hooks.items()}


def quantize_layers(
    model: nn.Module,
    names: list[str],
    spec: LayerSpec,
    calib: Sequence[Tensor],
    damp: float,
    kernel: str,
    grid: int = 0,
    act_order: bool = True,
) -> None:
    """Sequential GPTQ over ``model.blocks`` then the remaining linear targets (``act_order``: see the module)."""
    blocks = getattr(model, "blocks", None)
    done: set[str] = set()
    bar = phase("GPTQ", total=len(names), unit="layers")
    with bar:
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            inputs = _capture_block_inputs(model, blocks[0], calib)
            for bi, block in enumerate(blocks):
                prefix = f"blocks.{bi}."
                mine = [n for n in names if n.startswith(prefix)]
                bar.advance(0, note=f"block {bi + 1}/{len(blocks)}")

                def run_block(blk: nn.Module = block, batches: list[tuple[tuple, dict]] = inputs) -> None:
                    for args, kwargs in batches:
                        blk(*args, **kwargs)

                hs = _hessians(run_block, model, mine, spec.activations == "int8")
                for name in mine:
                    swap_packed(
                        model,
                        name,
                        gptq_quantize(
                            float_weight(model, name), hs[name], spec, damp, mse_grid=grid, act_order=act_order
                        ),
                        spec,
                        kernel,
                    )
                    done.add(name)
                    bar.advance()
                inputs = [((block(*args, **kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        rest = [n for n in names if n not in done and n != EMBEDDING]
        if rest:
            bar.advance(0, note="output layers")

            def run_model() -> None:
                for b in calib:
                    model(b)  # one batch's logits at a time

            hs = _hessians(run_model, model, rest, spec.activations == "int8")
            for name in rest:
                qw = gptq_quantize(float_weight(model, name), hs[name], spec, damp, mse_grid=grid, act_order=act_order)
                swap_packed(model, name, qw, spec, kernel)
                bar.advance()
