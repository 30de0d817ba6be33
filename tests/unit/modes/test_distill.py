"""QAT distillation: the loss, its KL-weight schedule, when a run distils (the default), and the
memory guard's remedy of turning it off."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qtrain.config import distills
from qtrain.model import GPT
from qtrain.modes import memory, memory_fixes
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from qtrain.modes.qat import DistillLoss
from tests.conftest import SHRINK, compose_cfg, qtrain_in_process


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(compose_cfg(SHRINK).model).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 16), generator=g)
    return x, torch.randint(0, 256, (2, 16), generator=g)


def test_loss_is_cross_entropy_plus_weighted_kl_to_the_teacher() -> None:
    student, teacher = _model(1), _model(2)
    x, y = _batch()
    logits, t_logits = student(x).float(), teacher(x).float()
    ce = F.cross_entropy(logits.view(-1, 256), y.reshape(-1))
    p_t = F.softmax(t_logits, -1)
    kl = (p_t * (F.log_softmax(t_logits, -1) - F.log_softmax(logits, -1))).sum(-1).sum() / (2 * 16)
    assert kl > 1e-4
    loss = DistillLoss(teacher, 0.5, 1.0, "constant", 100)(student, x, y)
    torch.testing.assert_close(loss, ce + 0.5 * kl)
    # its own teacher: no KL, the loss is the cross-entropy alone
    torch.testing.assert_close(DistillLoss(copy.deepcopy(student), 0.5, 2.0, "constant", 100)(student, x, y), ce)


def test_linear_schedule_takes_the_kl_weight_to_zero_at_the_last_step() -> None:
    student, teacher = _model(1), _model(2)
    x, y = _batch()
    loss = DistillLoss(teacher, 0.8, 1.0, "linear", 100)
    weights = []
    for step in (0, 50, 100, 150):
        loss.before_step(step, student)
        weights.append(loss.weight)
    assert weights == pytest.approx([0.8, 0.4, 0.0, 0.0])
    ce = F.cross_entropy(student(x).float().view(-1, 256), y.reshape(-1))
    torch.testing.assert_close(loss(student, x, y), ce)  # weight 0: no teacher forward, CE alone
    const = DistillLoss(teacher, 0.8, 1.0, "constant", 100)
    const.before_step(90, student)
    assert const.weight == 0.8


def test_a_qat_run_distils_by_default_when_it_has_a_full_precision_init_from() -> None:
    qat = [*SHRINK, "mode=qat", "quant=int4"]
    assert distills(compose_cfg([*qat, "init_from=runs/fp"]))
    assert not distills(compose_cfg([*qat, "init_from=runs/fp", "qat.distill=false"]))
    assert not distills(compose_cfg(qat))  # from scratch: no teacher
    assert not distills(compose_cfg([*SHRINK, "mode=train", "init_from=runs/fp"]))
    assert compose_cfg(qat).qat.distill_weight == 0.5


def _run(tmp: Path, name: str, overrides: list[str]) -> dict:
    cfg = compose_cfg([*SHRINK, *overrides])
    return run(RunContext(cfg=cfg, run_dir=tmp / name, device=torch.device("cpu"), overrides=overrides))


def test_default_run_distils_and_false_or_no_teacher_does_not(tmp_path: Path) -> None:
    _run(tmp_path, "fp", ["mode=train", "train.max_steps=4"])
    fp = f"init_from={tmp_path / 'fp'}"
    qat = ["mode=qat", "quant=int4", "train.max_steps=2", fp]
    assert _run(tmp_path, "kd", qat)["quant"]["method"] == "qat+distill"
    assert _run(tmp_path, "ce", [*qat, "qat.distill=false"])["quant"]["method"] == "qat"
    assert _run(tmp_path, "scratch", ["mode=qat", "quant=int4", "train.max_steps=2"])["quant"]["method"] == "qat"


def test_distill_true_without_a_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = qtrain_in_process(["mode=qat", "quant=int4", "qat.distill=true", f"hydra.run.dir={tmp_path / 'q'}"])
    assert rc == 2
    assert "qat.distill" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_memory_guard_offers_turning_distillation_off() -> None:
    cfg = compose_cfg([*SHRINK, "mode=qat", "quant=int4", "init_from=runs/fp", "train.activation_checkpointing=true",
                       "train.batch_size=1"])
    with_teacher = memory.estimate(cfg, cfg.model).total
    without = compose_cfg([*SHRINK, "mode=qat", "quant=int4", "init_from=runs/fp", "qat.distill=false",
                           "train.activation_checkpointing=true", "train.batch_size=1"])
    assert memory.estimate(without, without.model).total < with_teacher
    fixes = memory_fixes.remedies(cfg, cfg.model, with_teacher - 1)
    assert any(f.startswith("qat.distill=false") for f in fixes), fixes
