"""The cross-CPU tolerance is tight enough to catch a wrong load or a wrong migration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from qtrain.modes.loading import model_from_checkpoint
from tests.numerics import assert_close_across_cpus, model_reductions, summation_order_tol

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOKENS = torch.arange(32).view(1, 32)


def _model(name: str, kernel: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    loaded = ck.load_checkpoint(FIXTURES / name, with_trainer=False)
    expected = load_file(str(FIXTURES / name) + ".expected.safetensors")["logits"]
    return model_from_checkpoint(loaded, torch.device("cpu"), kernel), expected, loaded.manifest["model"]


def test_bound_covers_another_summation_order() -> None:
    model, expected, shape = _model("v1_fp", "auto")
    with torch.no_grad():
        # Same model in float64 (every sum exact to ~1e-16), rounded back: a different order.
        exact = model.double()(TOKENS).float()
    assert_close_across_cpus(exact, expected, **model_reductions(shape))
    assert summation_order_tol(expected, **model_reductions(shape)) < 1e-5


@pytest.mark.parametrize("mistake", ["mlp_down_off_by_0.1%", "norm_eps_1e-6", "head_untied"])
def test_a_wrongly_loaded_model_fails(mistake: str) -> None:
    model, expected, shape = _model("v1_fp", "auto")
    with torch.no_grad():
        if mistake == "mlp_down_off_by_0.1%":
            model.blocks[0].mlp.down.weight.mul_(1.001)
        elif mistake == "norm_eps_1e-6":
            for norm in (m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)):
                norm.eps = 1e-6
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.01)
        got = model(TOKENS)
    with pytest.raises(AssertionError):
        assert_close_across_cpus(got, expected, **model_reductions(shape))


def test_a_wrong_int4_code_fails() -> None:
    model, expected, shape = _model("v2_int4", "torch")
    layer = next(m for m in model.modules() if hasattr(m, "weight_packed"))
    with torch.no_grad():
        layer.weight_packed[0, 0] ^= 0x01  # one code of one weight off by one step (before any repack)
        got = model(TOKENS)
    with pytest.raises(AssertionError):
        assert_close_across_cpus(got, expected, **model_reductions(shape))
