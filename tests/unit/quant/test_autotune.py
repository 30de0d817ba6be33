"""quant.kernel=auto picks, per machine, the faster correct CPU decode kernel (qtrain.quant.autotune)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from qtrain.quant import autotune, native
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear
from qtrain.quant.primitives import LayerSpec

CAN_BUILD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and any(
    shutil.which(c) for c in ("cc", "gcc", "clang")
)
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs an AVX2 CPU and a C compiler")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for this module (the library is built once)."""
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(autouse=True)
def private_cache(module_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No measurement cached or remembered; an idle machine unless a test says otherwise."""
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(module_cache))
    monkeypatch.delenv(autotune.ENV_FORCE, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    for old in module_cache.glob("kernels/choice-*.json"):
        old.unlink()
    autotune.reset()
    yield module_cache
    autotune.reset()


def _layer(bits: int, kernel: str) -> PackedLinear:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    if bits == 4:
        return Int4Linear.from_float(w, LayerSpec("int4", 4, 32), kernel=kernel, name="layer")
    return Int8Linear.from_float(w, LayerSpec("int8", 8), kernel=kernel, name="layer")


def _x() -> torch.Tensor:
    return torch.randn(1, 256, generator=torch.Generator().manual_seed(1))


def _entry(native_us: float, torch_us: float) -> dict[str, Any]:
    return {
        "shapes": [f"{k}x{n}" for k, n in autotune.SHAPES],  # a cached entry must describe the real shapes
        "native_us": [native_us] * len(autotune.SHAPES),
        "torch_us": [torch_us] * len(autotune.SHAPES),
        "native_ok": True,
        "torch_ok": True,
        "rounds": 1,
        "load_average": 0.0,
        "cores": 2,
        "measured_threads": 1,
    }


def _plant(native_us: float, torch_us: float) -> Path:
    """A measurement file for this process's key, as a previous process would have left it."""
    assert native.library() is not None
    key = autotune.cache_key(torch.get_num_threads())
    path = autotune.cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "int4": _entry(native_us, torch_us), "int8": _entry(native_us, torch_us)}))
    return path


def _measurements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = autotune.measure

    def measure(bits: int) -> dict[str, Any]:
        calls.append(bits)
        return original(bits)

    monkeypatch.setattr(autotune, "measure", measure)
    return calls


def test_the_choice_is_measured_once_cached_and_reused(
    private_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _measurements(monkeypatch)
    caplog.set_level(logging.INFO, logger="qtrain.quant.autotune")
    first = autotune.choose(4)
    assert calls == [4]
    files = list((private_cache / "kernels").glob("choice-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["key"]["threads"] == torch.get_num_threads() and stored["key"]["torch"] == torch.__version__
    assert stored["key"]["kernels"] == native.build_id()
    assert stored["int4"]["native_ok"] and stored["int4"]["torch_ok"]  # both correct on this CPU
    assert first == autotune.decide(stored["int4"])[0]
    assert "kernels: int4 decode on" in caplog.text and "measured now" in caplog.text
    caplog.clear()
    assert autotune.choose(4) == first and calls == [4]  # once per process, announced once
    assert "kernels:" not in caplog.text

    autotune.reset()  # a new process: reads the file, does not measure
    assert autotune.choose(4) == first and calls == [4]
    assert "cached in" in caplog.text
    assert autotune.decisions()["int4"]["kernel"] == first


@pytest.mark.parametrize("bits", [4, 8])
def test_a_slower_measurement_makes_auto_pick_the_other_kernel(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _measurements(monkeypatch)
    x = _x()
    ours, theirs = _layer(bits, "native")(x), _layer(bits, "torch")(x)
    assert not torch.equal(ours, theirs)  # the two kernels are told apart by their outputs

    _plant(native_us=500.0, torch_us=100.0)  # qtrain's kernel measured 5x slower
    assert autotune.choose(bits) == "torch"
    assert torch.equal(_layer(bits, "auto")(x), theirs)

    autotune.reset()
    _plant(native_us=100.0, torch_us=500.0)
    assert autotune.choose(bits) == "native"
    assert torch.equal(_layer(bits, "auto")(x), ours)
    assert calls == []  # the files decided


@pytest.mark.parametrize("bits", [4, 8])
def test_the_chosen_kernel_stays_within_the_packed_tolerance(bits: int) -> None:
    layer = _layer(bits, "auto")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    w = layer.dequantize()
    # the bf16-activation bound of the packed kernels' tests (test_packed.py): 2^-7 |x| @ |W|^T
    bound = 2**-7 * F.linear(x.abs(), w.abs()) + 1e-6
    assert ((layer(x) - F.linear(x, w)).abs() <= bound).all()
    assert f"int{bits}" in autotune.decisions()


def test_a_wrong_kernel_is_never_chosen() -> None:
    entry = _entry(native_us=10.0, torch_us=500.0)
    assert autotune.decide(entry)[0] == "native"
    assert autotune.decide({**entry, "native_ok": False}) == ("torch", "native failed the accuracy check")


def test_an_unreadable_or_foreign_file_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _measurements(monkeypatch)
    path = _plant(100.0, 500.0)
    path.write_text("{not json")
    autotune.choose(4)
    assert calls == [4] and json.loads(path.read_text())["int4"]["rounds"] >= 1  # rewritten
    autotune.reset()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "int4": {"native_us": "fast"}}))
    autotune.choose(4)
    assert calls == [4, 4]


def test_an_overloaded_measurement_is_redone_when_the_machine_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _measurements(monkeypatch)
    path = _plant(100.0, 500.0)
    data = json.loads(path.read_text())
    busy = {**data["int4"], "load_average": 9.0, "cores": 2}
    path.write_text(json.dumps({**data, "int4": busy}))
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))  # still busy: keep the cached one
    autotune.choose(4)
    assert calls == []
    autotune.reset()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # quiet now: measure again
    autotune.choose(4)
    assert calls == [4]


def test_a_busy_machine_is_measured_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    torch.set_num_threads(2)
    try:
        entry = autotune.measure(4)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert entry["measured_threads"] == 1 and entry["load_average"] == 64.0


@pytest.mark.parametrize("forced", ["native", "torch"])
def test_the_environment_forces_either_kernel(forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _measurements(monkeypatch)
    monkeypatch.setenv(autotune.ENV_FORCE, forced)
    x = _x()
    assert autotune.choose(4) == forced and calls == []
    assert torch.equal(_layer(4, "auto")(x), _layer(4, forced)(x))


def test_the_native_kernels_run_with_torchs_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = native.library()
    assert lib is not None
    assert [native.team_size(lib, n) for n in (1, 2)] == [1, 2]  # OpenMP honours the count asked

    seen: list[int] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            fn = getattr(lib, name)

            def call(*args: Any) -> Any:
                seen.append(args[-1])  # every kernel takes the thread count last
                return fn(*args)

            return call

    layer = _layer(4, "native")
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            native.int4_linear(Recording(), _x(), layer.weight_packed, layer.scales, None, 32)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2]
