"""QAT, fine-tuning and hooks through the mode functions (tiny shrunken model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain import quant as api
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from qtrain.modes.loading import model_from_checkpoint
from qtrain.modes.training import schedule_callback
from qtrain.quant.fake import FakeQuantLinear
from tests.conftest import SHRINK, compose_cfg

EVENTS: list[tuple[str, object]] = []


class RecordingHook:
    """Records every hook point; doubles one layer's weight to prove on_weight can change it."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def after_prepare(self, model: torch.nn.Module) -> None:
        EVENTS.append(("after_prepare", None))

    def on_weight(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        EVENTS.append(("on_weight", name))
        return w * self.scale if name == "blocks.0.mlp.down" else None

    def after_step(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        EVENTS.append(("after_step", step))
        return {"hook_step": float(step)}

    def before_convert(self, model: torch.nn.Module) -> None:
        EVENTS.append(("before_convert", None))


def _run(tmp: Path, name: str, overrides: list[str]) -> dict:
    cfg = compose_cfg([*SHRINK, *overrides])
    return run(RunContext(cfg=cfg, run_dir=tmp / name, device=torch.device("cpu"), overrides=overrides))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("qat")
    report = _run(tmp, "qat", ["mode=qat", "quant=int4", "train.max_steps=40", "train.lr=1e-2", "train.log_every=1"])
    return tmp / "qat", report


def test_qat_reduces_loss_and_converted_matches_fake_quant(qat_run: tuple[Path, dict]) -> None:
    run_dir, report = qat_run
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    # packed int4 (fast kernel, bf16 activations) vs fake-quant fp32: same codes, tiny numeric drift
    assert report["val_loss"] == pytest.approx(report["fake_quant_val_loss"], rel=2e-3)
    assert report["bits_per_weight"] == pytest.approx(4.5)
    assert report["decode_tokens_per_s"] > 0 and report["decode_tokens"] == 8  # the packed model's speed
    loaded = ck.load_checkpoint(report["checkpoint"])
    assert loaded.manifest["quant"]["state"] == "packed"
    layers = loaded.manifest["quant"]["layers"]
    assert set(layers) == {"blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.mlp.gate_up", "blocks.0.mlp.down"}
    assert all(v["bits"] == 4 and v["group_size"] == 32 for v in layers.values())


def test_finetune_on_a_second_corpus_lowers_its_loss_and_keeps_the_scheme(qat_run: tuple[Path, dict],
                                                                           tmp_path: Path) -> None:
    run_dir, _ = qat_run
    corpus = tmp_path / "second.txt"
    corpus.write_text("All the world's a stage, and all the men and women merely players. " * 300)
    report = _run(tmp_path, "ft", ["mode=finetune", f"init_from={run_dir}", "data=text", f"data.path={corpus}",
                                   "train.max_steps=30", "train.lr=1e-2"])
    assert report["val_loss"] < report["reference_val_loss"] - 0.3
    loaded = ck.load_checkpoint(report["checkpoint"])
    assert loaded.manifest["quant"]["config"]["scheme"] == "int4"
    assert {v["group_size"] for v in loaded.manifest["quant"]["layers"].values()} == {32}


def test_finetune_starts_from_exactly_the_checkpoint_codes(qat_run: tuple[Path, dict]) -> None:
    run_dir, _ = qat_run
    loaded = ck.load_checkpoint(ck.resolve_checkpoint(run_dir), with_trainer=False)
    packed = model_from_checkpoint(loaded, torch.device("cpu"), "reference")
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = packed(x)
        fake = api.to_fake(packed)(x)
    torch.testing.assert_close(fake, ref, rtol=0, atol=0)


def test_mismatched_scheme_and_full_precision_init_are_refused(qat_run: tuple[Path, dict], tmp_path: Path) -> None:
    from qtrain.errors import ConfigError

    run_dir, _ = qat_run
    with pytest.raises(ConfigError, match="int8.*int4"):
        _run(tmp_path, "bad", ["mode=finetune", f"init_from={run_dir}", "quant=int8"])
    with pytest.raises(ConfigError, match="mode=finetune"):
        _run(tmp_path, "bad2", ["mode=ptq", "quant=int4", f"init_from={run_dir}"])


def test_hooks_fire_in_order_and_can_change_a_weight(tmp_path: Path) -> None:
    EVENTS.clear()
    target = f"{__name__}.RecordingHook"
    report = _run(tmp_path, "hooks", ["mode=qat", "quant=int4", "train.max_steps=2", "train.log_every=1",
                                      f"hooks=[{{_target_: {target}, scale: 2.0}}]"])
    kinds = [e[0] for e in EVENTS]
    assert kinds[0] == "after_prepare" and kinds[-1] == "before_convert"
    assert [e[1] for e in EVENTS if e[0] == "after_step"] == [1, 2]
    assert {e[1] for e in EVENTS if e[0] == "on_weight"} >= {"blocks.0.mlp.down", "blocks.0.attn.qkv"}
    assert kinds.index("after_step") > kinds.index("on_weight")
    metrics = [json.loads(line) for line in (tmp_path / "hooks" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["hook_step"] == 1.0
    # the weight hook changes the forward: same input, hook on vs off
    cfg = compose_cfg([*SHRINK, "quant=int4"])
    from qtrain.model import GPT

    model = GPT(cfg.model)
    model.init_weights(0)
    api.prepare(model, cfg.quant)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        plain = model(x)
        remove = api.register_weight_hook(model, RecordingHook(2.0).on_weight)
        hooked = model(x)
        remove()
    assert not torch.equal(plain, hooked)
    assert report["step"] == 2


def test_schedule_takes_effect_exactly_at_the_configured_step() -> None:
    cfg = compose_cfg([*SHRINK, "mode=qat", "quant=int8da_int4w", "qat.start_step=3", "qat.act_start_step=5",
                       "qat.freeze_step=4", "qat.learn_scales=true"])
    from qtrain.model import GPT

    model = GPT(cfg.model)
    model.init_weights(0)
    api.prepare(model, cfg.quant, learn_scales=True)
    before = schedule_callback(cfg)
    mod = model.blocks[0].mlp.down
    assert isinstance(mod, FakeQuantLinear)
    seen = []
    for step in range(7):
        before(step, model)
        w, a, frozen = mod._flags()
        seen.append((step, w, a, frozen))
    assert [s[1] for s in seen] == [False, False, False, True, True, True, True]
    assert [s[2] for s in seen] == [False] * 5 + [True, True]
    assert [s[3] for s in seen] == [False] * 4 + [True, True, True]


def test_keep_full_precision_hook_skips_layers(tmp_path: Path) -> None:
    hook = "hooks=[{_target_: qtrain.quant.hooks.KeepFullPrecision, patterns: ['*.mlp.down']}]"
    report = _run(tmp_path, "keep", ["mode=qat", "quant=int4", "train.max_steps=2", hook])
    layers = ck.load_checkpoint(report["checkpoint"]).manifest["quant"]["layers"]
    assert "blocks.0.mlp.down" not in layers and "blocks.0.mlp.gate_up" in layers
    model = model_from_checkpoint(ck.load_checkpoint(report["checkpoint"]), torch.device("cpu"))
    assert type(model.blocks[0].mlp.down) is torch.nn.Linear


def test_ptq_says_it_does_not_run_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp = _run(tmp_path, "fp", ["mode=train", "train.max_steps=2"])
    EVENTS.clear()
    target = f"{__name__}.RecordingHook"
    hooks = f"hooks=[{{_target_: {target}}}]"
    _run(tmp_path, "ptq", ["mode=ptq", "quant=int4", f"init_from={fp['checkpoint']}", hooks])
    assert EVENTS == [] and "mode=ptq does not run hooks" in capsys.readouterr().err


def test_code_flips_hook_counts_changed_codes() -> None:
    from qtrain.model import GPT
    from qtrain.quant.hooks import CodeFlips

    cfg = compose_cfg([*SHRINK, "mode=qat", "quant=int4"])
    model = GPT(cfg.model)
    model.init_weights(0)
    api.prepare(model, cfg.quant)
    hook = CodeFlips(every=2, per_layer=True)
    assert hook.after_step(0, model) is None  # not a measuring step
    assert hook.after_step(1, model) is None  # first measurement: nothing to compare with yet
    assert hook.after_step(3, model)["code_flips"] == 0.0  # unchanged weights: no flips
    mod = model.blocks[0].mlp.down
    with torch.no_grad():
        mod.weight[:, :32] *= -1  # sign-flips one group of columns: their nonzero codes change
    out = hook.after_step(5, model)
    codes = mod.quantized().codes
    share = out["code_flips/blocks.0.mlp.down"]
    assert 0 < share <= 32 / codes.shape[1] and out["code_flips"] < share  # other layers unchanged
    assert out["code_flips/blocks.0.attn.qkv"] == 0.0
