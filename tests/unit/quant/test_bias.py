"""Quantized linears with a bias (Qwen2's qkv): the bias stays full precision on every path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtrain.config import ModelConfig, QuantConfig
from qtrain.quant import primitives as P
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.recipe import QuantRecipe
from qtrain.quant.spec import LayerSpec

SPECS = {
    "int8": LayerSpec("int8", 8),
    "int8_act": LayerSpec("int8", 8, -1, True, "int8"),
    "int4_g32": LayerSpec("int4", 4, 32),
    "int4_g32_asym": LayerSpec("int4", 4, 32, False),
    "int8da_int4w": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
}
CONFIGS = {
    "int8": QuantConfig(scheme="int8"),
    "int4_g32": QuantConfig(scheme="int4", group_size=32),
    "int4_g32_asym": QuantConfig(scheme="int4", group_size=32, symmetric=False),
    "int8da_int4w": QuantConfig(scheme="int8da_int4w", group_size=32),
}
K, N = 128, 96  # K: a multiple of 32, so every CPU kernel takes the layer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(seed: int = 0, k: int = K, n: int = N) -> nn.Linear:
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=_gen(seed)) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=_gen(seed + 1)))  # large next to the products: a lost bias shows
    return lin


def _x(rows: int, seed: int = 7) -> Tensor:
    return torch.randn(rows, K, generator=_gen(seed)) + 0.5  # non-zero mean


def _bound(x: Tensor, w: Tensor) -> Tensor:
    """The bf16 kernels' stated tolerance, as in test_packed: 2^-7 * (|x| @ |W|^T) elementwise."""
    return 2**-7 * (x.abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize("name", list(SPECS))
def test_fake_quant_forward_adds_the_shared_full_precision_bias(name: str) -> None:
    spec, lin = SPECS[name], _linear()
    fq = FakeQuantLinear.from_linear(lin, spec, name="qkv")
    assert fq.bias is lin.bias and fq.weight is lin.weight  # shared, like the weight
    assert list(dict(fq.named_parameters())) == ["weight", "bias"]
    x = _x(5)
    qw = fq.quantized()
    x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
    want = F.linear(x_in, P.dequantize(qw.codes, qw.scales, qw.zeros, spec.bits, spec.group_size), lin.bias)
    # float32 products of the same operands; only the GEMM's summation order may differ
    torch.testing.assert_close(fq(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fq(x), want - lin.bias, atol=1e-2)
    fq(x).sum().backward()  # the bias trains like any parameter
    assert lin.bias.grad is not None and torch.allclose(lin.bias.grad, torch.full((N,), 5.0))
    assert fq.to_linear().bias is lin.bias


@pytest.mark.parametrize("name", list(SPECS))
def test_packed_layer_matches_fake_quant_on_every_cpu_kernel(name: str) -> None:
    spec, lin = SPECS[name], _linear()
    fq = FakeQuantLinear.from_linear(lin, spec, name="qkv")
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    qw = fq.quantized()
    with torch.no_grad():
        ref = cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, "reference", "qkv", lin.bias)
        assert ref.bias is not None and ref.bias.dtype == torch.float32 and torch.equal(ref.bias, lin.bias)
        for rows in (1, 4, 80):  # decode kernels, then the reference path past CPU_KERNEL_MAX_ROWS
            x = _x(rows)
            want = fq(x)
            assert torch.equal(ref(x), want)  # the reference path is fake-quant's forward, bit for bit
            x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
            for kernel in ("auto", "native", "torch"):
                mod = cls.from_codes(qw.codes, qw.scales, qw.zeros, spec, kernel, "qkv", lin.bias)
                got = mod(x)
                assert ((got - want).abs() <= _bound(x_in, ref.dequantize())).all(), (kernel, rows)
            assert ref(x.bfloat16()).dtype == torch.bfloat16


def test_bias_is_added_after_the_fast_kernel_for_any_input_rank() -> None:
    lin = _linear()
    mod = Int4Linear.from_float(lin.weight.detach(), SPECS["int4_g32"], "torch", "qkv", lin.bias)
    no_bias = Int4Linear.from_float(lin.weight.detach(), SPECS["int4_g32"], "torch", "qkv")
    x = torch.randn(1, 2, K, generator=_gen(3))
    with torch.no_grad():
        assert mod._fast(x.device) is not None
        torch.testing.assert_close(mod(x), no_bias(x) + lin.bias)  # one float32 add: rounding only


def test_bias_shape_and_dtype_are_checked() -> None:
    mod = Int8Linear.empty(K, N, SPECS["int8"], name="blocks.0.attn.qkv")
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv: bias must be a float tensor of shape \(96,\)"):
        mod.set_bias(torch.zeros(N + 1))
    with pytest.raises(ValueError, match="bias must be a float tensor"):
        mod.set_bias(torch.zeros(N, dtype=torch.int64))
    assert "bias" not in mod.state_dict()
    assert list(Int8Linear.empty(K, N, SPECS["int8"], bias=True).state_dict()) == ["weight_int8", "scales", "bias"]


class _Net(nn.Module):
    """Two biased linears and a bias-free one: what the quant package sees of a Qwen2 block."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = _linear(0, K, K)
        self.out = nn.Linear(K, K, bias=False)
        self.proj = _linear(2, K, N)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.out(self.qkv(x))))


def _biases(model: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n.endswith(".bias")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_and_to_fake_keep_the_bias(name: str) -> None:
    qcfg, net = CONFIGS[name], _Net()
    recipe = QuantRecipe.from_config(qcfg)
    assert recipe.problems(net) == []
    before = _biases(net)
    x = _x(6)
    fake = recipe.prepare(copy.deepcopy(net))
    assert isinstance(fake.qkv, FakeQuantLinear) and fake.qkv.bias is not None and fake.out.bias is None
    with torch.no_grad():
        want = fake(x)
        packed = QuantRecipe.from_config(dataclasses.replace(qcfg, kernel="reference")).convert(fake)
        assert isinstance(packed.qkv, PackedLinear) and packed.out.bias is None
        assert torch.equal(packed(x), want)
        assert _biases(packed).keys() == before.keys()
        assert all(torch.equal(_biases(packed)[n], b) for n, b in before.items())
        back = recipe.to_fake(packed)
        assert isinstance(back.qkv, FakeQuantLinear) and isinstance(back.qkv.bias, nn.Parameter)
        assert torch.equal(back(x), want)


@pytest.mark.parametrize("method", ["rtn", "mse", "gptq"])
@pytest.mark.parametrize("name", ["int4_g32", "int8da_int4w"])
def test_ptq_leaves_the_bias_bit_identical(method: str, name: str) -> None:
    net = _Net().eval()
    before = _biases(net)
    calib = [torch.randn(4, 8, K, generator=_gen(i)) for i in range(2)]
    with torch.no_grad():
        QuantRecipe.from_config(CONFIGS[name]).quantize(net, method, calib)
        assert all(isinstance(getattr(net, n), PackedLinear) for n in ("qkv", "out", "proj"))
        after = _biases(net)
        assert after.keys() == before.keys() and all(torch.equal(after[n], b) for n, b in before.items())
        x = _x(3)
        h = F.gelu(net.out(net.qkv(x)))
        # the packed output is dequant(W) x + b (reference path past the decode rows or not: bf16 bound)
        want = F.linear(P.fake_quantize_per_token(h) if name == "int8da_int4w" else h, net.proj.dequantize())
        assert ((net.proj(h) - want - before["proj.bias"]).abs() <= _bound(h, net.proj.dequantize())).all()


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta"])
def test_packed_state_dict_round_trip_through_the_manifest_skeleton(meta: bool) -> None:
    recipe = QuantRecipe.from_config(CONFIGS["int4_g32_asym"])
    net = recipe.convert(_Net())
    section = recipe.manifest_section(net, "rtn")
    assert section is not None and set(section["layers"]) == {"qkv", "out", "proj"}
    assert "bias" not in section["layers"]["qkv"]  # the bias comes from the model, not the layer spec
    state = net.state_dict()
    assert state["qkv.bias"].dtype == torch.float32 and "out.bias" not in state
    bits = recipe.bits_report(net)["bits_per_weight"]
    assert bits == pytest.approx(4 + (16 + 8) / 32)  # codes, a bf16 scale and a uint8 zero per 32: no bias
    if meta:
        with torch.device("meta"):
            fresh = _Net()
    else:
        fresh = _Net()
    skeleton = QuantRecipe.from_manifest(section).rebuild(fresh, "auto")
    assert isinstance(skeleton.qkv, PackedLinear) and skeleton.qkv.bias is not None and skeleton.out.bias is None
    skeleton.load_state_dict(state, strict=True, assign=meta)
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(skeleton(x), net(x))


def test_gpt_with_attention_biases_quantizes_and_rebuilds() -> None:
    from qtrain.model import GPT

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, mlp_hidden=128, attn_bias=True)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    if model.blocks[0].attn.qkv.bias is None:
        pytest.skip("qtrain.model does not build attention biases yet (ModelConfig.attn_bias)")
    recipe = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32, kernel="reference"))
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=_gen(0))
    with torch.no_grad():
        bias = model.blocks[0].attn.qkv.bias.detach().clone()
        fake_logits = recipe.prepare(model)(idx)
        recipe.convert(model)
        assert torch.equal(model.blocks[0].attn.qkv.bias, bias) and torch.equal(model(idx), fake_logits)
        rebuilt = QuantRecipe.from_manifest(recipe.manifest_section(model, "qat")).rebuild(GPT(cfg), "reference")
        rebuilt.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(rebuilt(idx), fake_logits)
