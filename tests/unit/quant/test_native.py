"""qtrain's own CPU kernels (qtrain.quant.native): accuracy, dispatch, build and fallbacks."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from qtrain.quant import native
from qtrain.quant import primitives as P
from qtrain.quant.kernels import NATIVE_MAX_ROWS
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.primitives import LayerSpec

CAN_BUILD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and any(
    shutil.which(c) for c in ("cc", "gcc", "clang")
)
needs_native = pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX2 CPU and a C compiler")

SPECS = {
    "int4": LayerSpec("int4", 4, 32),
    "int4_g64": LayerSpec("int4", 4, 64),
    "int4_g128": LayerSpec("int4", 4, 128),
    "int4_asym": LayerSpec("int4", 4, 32, False),
    "int4_g128_asym": LayerSpec("int4", 4, 128, False),
    "int4_channel": LayerSpec("int4", 4, -1),
    "int4_channel_asym": LayerSpec("int4", 4, -1, False),
    "int8da_int4w": LayerSpec("int8da_int4w", 4, 32, True, "int8"),
    "int8": LayerSpec("int8", 8),
    "int8_act": LayerSpec("int8", 8, -1, True, "int8"),
}


@pytest.fixture(autouse=True)
def fresh_library() -> Iterator[None]:
    native.reset()
    yield
    native.reset()


def _make(spec: LayerSpec, n: int, k: int, kernel: str = "native", seed: int = 0) -> PackedLinear:
    # kernel="native": these tests are about qtrain's kernels, which "auto" may not pick on this CPU
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    cls = Int8Linear if spec.bits == 8 else Int4Linear
    return cls.from_float(w, spec, kernel=kernel, name="layer")


def _input(rows: int, k: int, seed: int = 7) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) + 0.5
    x[:, : k // 3] *= 40.0  # blocks of very different ranges
    if rows > 1:
        x[1] = 0.0  # an all-zero row: block scale 0
    return x


def _int4_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The stated accuracy: each activation within 2^-16 of its 32-column block's largest
    magnitude (int16 rounding), plus float32 accumulation; 2^-14 leaves margin."""
    amax = x.abs().reshape(x.shape[0], -1, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(x.shape)
    return 2**-14 * (amax @ w.abs().t()) + 2**-18 * (x.abs() @ w.abs().t()) + 1e-7


@needs_native
def test_library_builds_on_this_machine() -> None:
    assert native.library() is not None


@needs_native
@pytest.mark.parametrize("name", [n for n in SPECS if SPECS[n].bits == 4])
@pytest.mark.parametrize("n,k", [(40, 96), (64, 288), (48, 512)])  # 3 blocks, 8 + 1 blocks, 16 blocks
@pytest.mark.parametrize("rows", [1, 3, NATIVE_MAX_ROWS])
def test_int4_kernel_accuracy(name: str, n: int, k: int, rows: int) -> None:
    spec = SPECS[name]
    if spec.group_size > 0 and k % spec.group_size:
        pytest.skip("group does not divide K")
    mod = _make(spec, n, k)
    x = _input(rows, k)
    x_in = P.fake_quantize_per_token(x) if spec.activations == "int8" else x
    w = mod.dequantize()
    truth = F.linear(x_in.double(), w.double()).float()
    y = mod(x)
    assert mod._fast_fn is not None and y.shape == (rows, n)
    assert ((y - truth).abs() <= _int4_bound(x_in, w)).all()
    # the kernel is what ran: the layer's output is the kernel's, bit for bit
    lib = native.library()
    assert lib is not None
    direct = native.int4_linear(lib, x_in, mod.weight_packed, mod.scales, mod.zeros, k // mod.scales.shape[1])
    assert torch.equal(y, direct)


@needs_native
@pytest.mark.parametrize("name", ["int8", "int8_act"])
@pytest.mark.parametrize("n,k", [(40, 96), (64, 288)])
@pytest.mark.parametrize("rows", [1, NATIVE_MAX_ROWS])
def test_int8_kernel_accuracy(name: str, n: int, k: int, rows: int) -> None:
    mod = _make(SPECS[name], n, k)
    x = _input(rows, k)
    x_in = P.fake_quantize_per_token(x) if SPECS[name].activations == "int8" else x
    w = mod.dequantize()
    truth = F.linear(x_in.double(), w.double()).float()
    y = mod(x)
    assert ((y - truth).abs() <= 2**-18 * (x_in.abs() @ w.abs().t()) + 1e-7).all()
    lib = native.library()
    assert lib is not None
    assert torch.equal(y, native.int8_linear(lib, x_in, mod.weight_int8, mod.scales.reshape(-1)))


@needs_native
def test_more_accurate_than_the_bf16_kernels() -> None:
    """Same layer, same input: qtrain's kernel error is far below PyTorch's bf16-input one."""
    ours, theirs = _make(SPECS["int4"], 256, 512), _make(SPECS["int4"], 256, 512, kernel="torch")
    theirs.load_state_dict(ours.state_dict())
    x = _input(1, 512)
    truth = F.linear(x.double(), ours.dequantize().double())
    err_ours, err_torch = (ours(x) - truth).abs().max(), (theirs(x) - truth).abs().max()
    assert err_ours * 50 < err_torch


@needs_native
def test_results_do_not_depend_on_thread_count() -> None:
    mod = _make(SPECS["int4_asym"], 100, 256)
    x = _input(2, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod(x)
        torch.set_num_threads(2)
        two = mod(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_native
def test_rows_above_the_native_limit_use_pytorch_kernel() -> None:
    mod = _make(SPECS["int4"], 64, 256)
    x = _input(NATIVE_MAX_ROWS + 1, 256)
    ref = mod.reference_forward(x)
    y = mod(x)
    lib = native.library()
    assert lib is not None
    assert not torch.equal(y, native.int4_linear(lib, x, mod.weight_packed, mod.scales, None, 32))
    assert ((y - ref).abs() <= 2**-7 * (x.abs() @ mod.dequantize().abs().t()) + 1e-6).all()


@needs_native
def test_bf16_activations_in_and_out() -> None:
    mod = _make(SPECS["int4"], 64, 256)
    x = _input(1, 256).bfloat16()
    y = mod(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, mod(x.float()).bfloat16())


def test_switch_off_falls_back_to_pytorch_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with caplog.at_level(logging.INFO, logger="qtrain.quant.native"):
        assert native.library() is None
    assert "QTRAIN_NATIVE_KERNELS=0" in caplog.text
    mod = _make(SPECS["int4"], 64, 256)
    x = _input(1, 256)
    y = mod(x)
    assert mod._fast_fn is not None  # PyTorch's kernel
    assert ((y - mod.reference_forward(x)).abs() <= 2**-7 * (x.abs() @ mod.dequantize().abs().t()) + 1e-6).all()


def test_failed_build_is_reported_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    if not CAN_BUILD:
        pytest.skip("no AVX2 CPU")
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.INFO, logger="qtrain.quant.native"):
        assert native.library() is None
    assert "build/load failed: false failed" in caplog.text
    mod = _make(SPECS["int8"], 32, 64)
    assert mod(_input(1, 64)).shape == (1, 32)


@needs_native
def test_build_goes_to_the_cache_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(root))
    assert native.library() is not None
    files = sorted(p.name for p in (root / "kernels").iterdir() if p.name != ".build.lock")
    assert len(files) == 2 and files[0].startswith("qgemv-") and files[0].endswith(".so")  # no temporary left
    assert files[1] == files[0] + ".sha256"  # its hash, recorded when it was built (case 40)
    native.reset()
    assert native.library() is not None  # loads the cached build
    assert sorted(p.name for p in (root / "kernels").iterdir() if p.name != ".build.lock") == files


def test_torch_kernel_option_skips_native() -> None:
    mod = _make(SPECS["int4"], 64, 256, kernel="torch")
    x = _input(1, 256)
    assert ((mod(x) - mod.reference_forward(x)).abs() <= 2**-7 * (x.abs() @ mod.dequantize().abs().t()) + 1e-6).all()
    if CAN_BUILD:
        lib = native.library()
        assert lib is not None
        assert not torch.equal(mod(x), native.int4_linear(lib, x, mod.weight_packed, mod.scales, None, 32))


@needs_native
@pytest.mark.parametrize("name", ["int4", "int4_asym", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_nan_rows(name: str, bad: float) -> None:
    mod = _make(SPECS[name], 48, 256)
    x = _input(3, 256)
    x[2, 100] = bad
    y = mod(x)
    assert torch.isnan(y[2]).all() or (bad == float("inf") and not torch.isfinite(y[2]).all())
    assert torch.isfinite(y[:2]).all()
