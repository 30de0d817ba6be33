"""Int8Linear / Int4Linear: layout, reference oracle, fast CPU kernels, fallbacks, CUDA paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtrain.quant import kernels
from qtrain.quant import primitives as P
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, QuantEmbedding
from qtrain.quant.primitives import LayerSpec

SPECS = {
    "int8": LayerSpec("int8", 8),
    "int8_act": LayerSpec("int8", 8, -1, True, "int8"),
    "int4": LayerSpec("int4", 4, 32),
    "int4_g128": LayerSpec("int4", 4, 128),
    "int4_asym": LayerSpec("int4", 4, 32, False),
    "int4_channel": LayerSpec("int4", 4, -1),
    "int4_channel_asym": LayerSpec("int4", 4, -1, False),
    "int8da_int4w": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
}
# (N, K): model shapes (tiny has K=96), N not a multiple of 16 (padded), a wide down projection.
SHAPES = [(288, 96), (40, 128), (96, 256), (256, 384)]


def _make(spec: LayerSpec, n: int, k: int, kernel: str = "auto", seed: int = 0) -> PackedLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    return cls.from_float(w, spec, kernel=kernel, name="layer")


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Stated tolerance of the bf16 kernels: 2^-7 * (|x| @ |W|^T) elementwise.

    Covers bf16 rounding of the activations (2^-9 relative), of the output (2^-9) and of the
    asymmetric zero offset (2^-9), with margin for accumulation order.
    """
    return 2**-7 * (x.abs().reshape(-1, x.shape[-1]) @ w.abs().t()).reshape(*x.shape[:-1], w.shape[0]) + 1e-6


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 8])
def test_fast_cpu_kernel_matches_reference(name: str, n: int, k: int, rows: int) -> None:
    spec = SPECS[name]
    if spec.group_size > 0 and k % spec.group_size:
        pytest.skip("group does not divide K")
    mod = _make(spec, n, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(7)) + 0.5  # non-zero mean
    fast, ref = mod(x), mod.reference_forward(x)
    assert mod._fast_fn is not None, "fast path expected for this shape"
    assert fast.shape == (rows, n) and fast.dtype == torch.float32
    x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
    assert ((fast - ref).abs() <= _bound(x_in, mod.dequantize())).all()
    assert not torch.equal(fast, torch.zeros_like(fast))


@pytest.mark.parametrize("name", ["int8", "int4", "int4_asym", "int8da_int4w"])
def test_many_rows_use_the_exact_reference_path(name: str) -> None:
    mod = _make(SPECS[name], 64, 128)
    x = torch.randn(2, kernels.CPU_KERNEL_MAX_ROWS, 128)
    assert torch.equal(mod(x), mod.reference_forward(x))


def test_reference_is_dequantize_then_fp32_linear() -> None:
    mod = _make(SPECS["int4_asym"], 96, 256, kernel="reference")
    x = torch.randn(3, 256)
    assert torch.equal(mod(x), F.linear(x, mod.dequantize()))
    assert mod(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "spec,n,k",
    [(SPECS["int8"], 16, 12), (SPECS["int4_channel"], 32, 48), (LayerSpec("int4", 4, 16), 32, 64)],
    ids=["int8_K12", "int4_channel_K48", "int4_g16"],
)
def test_shapes_the_kernels_reject_fall_back_to_reference(spec: LayerSpec, n: int, k: int) -> None:
    """int8 needs K % 8 == 0 (it would crash the process), int4 a kernel group 32..256."""
    mod = _make(spec, n, k)
    x = torch.randn(1, k)
    assert torch.equal(mod(x), mod.reference_forward(x))
    assert mod._fast_fn is None


def test_kernel_cache_follows_loaded_weights() -> None:
    a, b = _make(SPECS["int4"], 64, 128, seed=1), _make(SPECS["int4"], 64, 128, seed=2)
    x = torch.randn(1, 128)
    y_a = a(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), y_a)


@pytest.mark.parametrize("name", list(SPECS))
def test_buffers_layout_and_empty_skeleton(name: str) -> None:
    spec = SPECS[name]
    mod = _make(spec, 48, 256)
    sd = mod.state_dict()
    g = 1 if spec.group_size == -1 else 256 // spec.group_size
    if spec.bits == 8:
        assert list(sd) == ["weight_int8", "scales"]
        assert sd["weight_int8"].dtype == torch.int8 and sd["weight_int8"].shape == (48, 256)
    else:
        assert list(sd) == ["weight_packed", "scales"] + ([] if spec.symmetric else ["zeros"])
        assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].shape == (48, 128)
    assert sd["scales"].dtype == torch.bfloat16 and sd["scales"].shape == (48, g)
    empty = type(mod).empty(256, 48, spec)
    empty.load_state_dict(sd, strict=True)
    x = torch.randn(2, 256)
    assert torch.equal(empty(x), mod(x))
    meta = type(mod).empty(256, 48, spec, device="meta")
    assert all(b.is_meta for b in meta.buffers())


def test_dequantize_rows_and_quant_embedding() -> None:
    mod = _make(SPECS["int4_asym"], 256, 64)
    idx = torch.randint(0, 256, (3, 9))
    assert torch.equal(mod.dequantize_rows(idx), mod.dequantize()[idx])
    emb = QuantEmbedding(mod, None)
    assert torch.equal(emb(idx), mod.dequantize()[idx]) and list(emb.state_dict())[0] == "table.weight_packed"
    assert list(QuantEmbedding(mod, tied_to="lm_head").state_dict()) == []


def test_constructor_errors_name_the_layer() -> None:
    with pytest.raises(ValueError, match="blocks.0.attn.out: group_size=64"):
        Int4Linear.from_float(torch.randn(8, 96), LayerSpec("int4", 4, 64), name="blocks.0.attn.out")
    with pytest.raises(ValueError, match="needs bits=8"):
        Int8Linear(64, 8, LayerSpec("int4", 4, 32), name="x")
    with pytest.raises(ValueError, match="quant.kernel"):
        Int8Linear(64, 8, SPECS["int8"], kernel="fast")
    with pytest.raises(ValueError, match="scales shape"):
        Int4Linear.from_codes(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 3), None, SPECS["int4"])


def test_fast_path_never_dequantizes(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _make(SPECS["int4"], 64, 128)

    def boom(*_: object, **__: object) -> torch.Tensor:
        raise AssertionError("fast path dequantized the weight")

    mod(torch.randn(1, 128))  # build the cache
    monkeypatch.setattr(P, "dequantize", boom)
    mod(torch.randn(1, 128))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["int8", "int8_act", "int4", "int4_asym", "int4_channel", "int8da_int4w"])
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_cuda_kernels_match_reference(name: str, rows: int) -> None:
    spec = SPECS[name]
    mod = _make(spec, 256, 512).cuda()
    x = torch.randn(rows, 512, device="cuda")
    fast, ref = mod(x), mod.reference_forward(x)
    x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
    bound = 2**-6 * (x_in.abs() @ mod.dequantize().abs().t()) + 1e-5
    assert ((fast - ref).abs() <= bound).all()


@pytest.mark.gpu
@cuda
def test_cuda_checkpoint_loads_on_cpu() -> None:
    mod = _make(SPECS["int4"], 128, 256).cuda()
    x = torch.randn(2, 256)
    y_gpu = mod(x.cuda()).cpu()
    cpu = Int4Linear.empty(256, 128, SPECS["int4"])
    cpu.load_state_dict({k: v.cpu() for k, v in mod.state_dict().items()})
    assert ((cpu(x) - y_gpu).abs() <= _bound(x, cpu.dequantize()) * 2).all()
