"""Post-training quantization: round to nearest, MSE clipping search, GPTQ.

All three produce the same packed modules as :func:`qtrain.quant.api.convert`; the scales
stored are exactly the ones the codes were computed with (bf16-rounded like everywhere).

- ``rtn``: :func:`~qtrain.quant.primitives.choose_qparams` then round to nearest.
- ``mse``: per group (per row for int8), try ``grid`` shrink ratios of the range,
  ``1, 1 - 1/grid, ...`` down to ``1 - MSE_MAX_SHRINK``, and keep the scales (and zeros)
  with the smallest squared reconstruction error of that group's weights.
- ``gptq``: Frantar et al. 2022, as in gpt-fast. Blocks are processed in order; inputs of the
  first block are captured on the calibration batches, each block's target linears get a
  Hessian ``H = 2 X^T X / n`` from their inputs, are quantized column by column with error
  compensation (dampening ``damp * mean(diag H)``, Cholesky of the inverse, lazy batch
  updates of ``GPTQ_BLOCK`` columns), and the block's outputs *with quantized weights* feed
  the next block. Group qparams are computed when a group's first column is reached, from the
  already-updated weights. Layers outside ``model.blocks`` (the head) are done last from one
  full forward pass; an embedding table (no inputs) uses round to nearest.

Example:
    >>> calib = [torch.randint(0, 256, (8, 128)) for _ in range(4)]
    >>> model = quantize_ptq(model, QuantConfig(scheme="int4"), "gptq", calib)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.progress import phase
from qtrain.quant import api
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import PackedLinear, QuantEmbedding
from qtrain.quant.primitives import LayerSpec, QuantizedWeight

METHODS = ("rtn", "mse", "gptq")
MSE_MAX_SHRINK = 0.8
"""The MSE search tries ranges down to (1 - MSE_MAX_SHRINK) of the full one."""
GPTQ_BLOCK = 128
"""Columns per lazy-batch update in GPTQ (raised to the group size when larger)."""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"ptq.method={method!r} is not one of {list(METHODS)}")


# -- per-weight methods -----------------------------------------------------------------------
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
            of max-abs; 0 keeps plain GPTQ.

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
) -> None:
    """Column loop of GPTQ, filling ``codes``/``scales``/``zeros`` in place (w is updated)."""
    k = w.shape[1]
    g = k if spec.group_size == -1 else spec.group_size
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # new group: qparams from the (already updated) group weights
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


class _HessianHook:
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
    hooks: dict[str, _HessianHook] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        hooks[name] = _HessianHook(api.layer_shape(mod)[0], _weight_of(model, name).device, act_int8)
        handles.append(mod.register_forward_pre_hook(hooks[name]))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {n: h.hessian() for n, h in hooks.items()}


def _swap_packed(model: nn.Module, name: str, qw: QuantizedWeight, spec: LayerSpec, kernel: str) -> None:
    mod = api.packed_class(spec).from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, name)
    api.set_module(model, name, mod)


def _weight_of(model: nn.Module, name: str) -> Tensor:
    mod = model.get_submodule(name)
    if isinstance(mod, FakeQuantLinear):
        raise ValueError(f"{name}: PTQ needs a full-precision model; this layer is fake-quantized (use convert)")
    if isinstance(mod, PackedLinear):
        raise ValueError(f"{name}: already quantized")
    w = mod.weight
    assert isinstance(w, Tensor)
    return w.detach()


def _gptq_model(
    model: nn.Module,
    names: list[str],
    spec: LayerSpec,
    calib: Sequence[Tensor],
    damp: float,
    kernel: str,
    grid: int = 0,
) -> None:
    """Sequential GPTQ over ``model.blocks`` then the remaining linear targets."""
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
                    _swap_packed(
                        model,
                        name,
                        gptq_quantize(_weight_of(model, name), hs[name], spec, damp, mse_grid=grid),
                        spec,
                        kernel,
                    )
                    done.add(name)
                    bar.advance()
                inputs = [((block(*args, **kwargs),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
        rest = [n for n in names if n not in done and n != api.EMBEDDING]
        if rest:
            bar.advance(0, note="output layers")
            hs = _hessians(lambda: [model(b) for b in calib], model, rest, spec.activations == "int8")
            for name in rest:
                qw = gptq_quantize(_weight_of(model, name), hs[name], spec, damp, mse_grid=grid)
                _swap_packed(model, name, qw, spec, kernel)
                bar.advance()


# -- entry points -----------------------------------------------------------------------------
def quantize_ptq(
    model: nn.Module,
    qcfg: QuantConfig,
    method: str = "rtn",
    calib: Sequence[Tensor] | None = None,
    damp: float = 0.01,
    grid: int = 100,
) -> nn.Module:
    """Post-training quantize a full-precision model into packed modules (in place).

    Args:
        model: full-precision model (eval mode recommended).
        qcfg: the quant config (scheme, targets, kernel).
        method: ``rtn``, ``mse`` or ``gptq``.
        calib: token-id batches ``(B, T)`` on the model's device (required for ``gptq``).
        damp: GPTQ dampening (fraction of the mean Hessian diagonal).
        grid: MSE search candidates.

    Returns:
        The same model object, converted.

    Raises:
        ValueError: unknown method, missing calibration data for gptq, or an invalid config.

    Example:
        >>> model = quantize_ptq(model, QuantConfig(scheme="int8"), "mse")
    """
    _check_method(method)
    spec = api.spec_from_config(qcfg)
    names = api.check_layers(model, qcfg)
    assert spec is not None
    if method == "gptq" and not calib:
        raise ValueError("ptq.method=gptq needs calibration batches (ptq.calib_batches > 0)")
    with torch.no_grad():
        if method == "mse":
            with phase("MSE scale search", total=len(names), unit="layers") as bar:
                for name in names:
                    if name != api.EMBEDDING:
                        _swap_packed(model, name, mse_quantize(_weight_of(model, name), spec, grid), spec, qcfg.kernel)
                    bar.advance()
        elif method == "gptq":
            assert calib is not None
            _gptq_model(model, [n for n in names if n != api.EMBEDDING], spec, calib, damp, qcfg.kernel, grid)
    return _finish_embedding(model, qcfg, method, grid)


def _finish_embedding(model: nn.Module, qcfg: QuantConfig, method: str, grid: int) -> nn.Module:
    """Convert what is left (embedding table, or everything for rtn)."""
    if method == "mse" and api.EMBEDDING in api.target_layers(model, qcfg) and not api.is_tied(model):
        spec = api.spec_from_config(qcfg)
        assert spec is not None
        espec = api.embedding_spec(spec)
        table = mse_quantize(_weight_of(model, api.EMBEDDING), espec, grid)
        cls = api.packed_class(espec)
        mod = cls.from_codes(table.codes, table.scales, table.zeros, espec, qcfg.kernel, api.EMBEDDING)
        api.set_module(model, api.EMBEDDING, QuantEmbedding(mod, None, api.EMBEDDING))
    return api.convert(model, qcfg)


def init_scales(
    model: nn.Module,
    qcfg: QuantConfig,
    method: str = "rtn",
    calib: Sequence[Tensor] | None = None,
    damp: float = 0.01,
    grid: int = 100,
) -> dict[str, QuantizedWeight]:
    """PTQ-initialised ``(codes, scales, zeros)`` per target layer, model left untouched.

    Feed the result to ``prepare(model, qcfg, learn_scales=..., init=...)`` so QAT starts from
    ``mse``/``gptq`` scales. The fake-quant forward then rounds the *current* weights with
    those scales; to start from GPTQ's exact codes instead, use
    ``to_fake(quantize_ptq(model, qcfg, "gptq", calib))``.

    Args:
        model: full-precision model.
        qcfg: the quant config.
        method: ``rtn``, ``mse`` or ``gptq``.
        calib: calibration batches (gptq).
        damp: GPTQ dampening.
        grid: MSE candidates.

    Returns:
        ``{layer name: QuantizedWeight}`` (an untied embedding under ``tok_emb``).

    Raises:
        ValueError: as :func:`quantize_ptq`.
    """
    _check_method(method)
    work = copy.deepcopy(model)
    quantize_ptq(work, qcfg, method, calib, damp, grid)
    out: dict[str, QuantizedWeight] = {}
    for name, m in work.named_modules():
        if isinstance(m, QuantEmbedding):
            if m.tied_to is None:
                out[name] = m.get_table().quantized()
        elif isinstance(m, PackedLinear) and not name.startswith(api.EMBEDDING + "."):
            out[name] = m.quantized()
    return out
