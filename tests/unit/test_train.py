"""Training loop: loss goes down, schedule, accumulation, the non-finite guard, bit-identical resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig, TrainConfig
from qtrain.data import BatchSampler
from qtrain.errors import NonFiniteError
from qtrain.model import GPT
from qtrain.train import TrainCallbacks, Trainer, lr_factor

CFG = ModelConfig(n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=32)
TOKENS = torch.tensor(list(("the quick brown fox jumps over the lazy dog. " * 200).encode()), dtype=torch.uint8)


def _trainer(steps: int, seed: int = 0, **kw) -> Trainer:
    model = GPT(CFG)
    model.init_weights(seed)
    tcfg = TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, **kw)
    return Trainer(model, tcfg, BatchSampler(TOKENS, CFG.block_size, 8, seed), torch.device("cpu"))


def test_a_few_steps_reduce_the_loss() -> None:
    t = _trainer(30)
    first, _ = t.train_step()
    t.fit()
    last = sum(t.train_step()[0] for _ in range(3)) / 3
    assert last < first - 1.0


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


def test_gradient_accumulation_matches_one_big_batch() -> None:
    big = _trainer(1)
    big.cfg.batch_size = 8
    acc = _trainer(1, grad_accum=2)
    acc.sampler = BatchSampler(TOKENS, CFG.block_size, 4, 0)
    l_big, _ = big.train_step()
    l_acc, _ = acc.train_step()
    assert l_acc == pytest.approx(l_big, rel=1e-5)
    for a, b in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_before_the_optimizer_step() -> None:
    t = _trainer(5)
    t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    with torch.no_grad():
        t.model.norm.weight.fill_(float("nan"))
    before[-1] = t.model.norm.weight.detach().clone()
    with pytest.raises(NonFiniteError) as info:
        t.train_step()
    assert info.value.step == 2 and math.isnan(info.value.loss)
    for a, b in zip(before, t.model.parameters(), strict=True):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
    assert t.step == 1


def _save(tmp: Path, t: Trainer) -> Path:
    payload = ck.Payload(model_state=dict(t.model.state_dict()), trainer_meta={"trainer": t.state_dict()},
                         manifest={"model": vars(CFG).copy()})
    return ck.save_checkpoint(tmp, t.step, payload, keep=3)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = _trainer(12)
    losses = [straight.train_step()[0] for _ in range(12)]
    first = _trainer(12)
    part = [first.train_step()[0] for _ in range(5)]
    path = _save(tmp_path, first)
    resumed = _trainer(12, seed=99)  # different init: everything must come from the checkpoint
    loaded = ck.load_checkpoint(path)
    resumed.model.load_state_dict(loaded.model_state)
    resumed.load_state_dict(loaded.trainer_meta["trainer"])
    rest = [resumed.train_step()[0] for _ in range(7)]
    assert part + rest == losses
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_periodic_eval_and_save_callbacks() -> None:
    saved: list[int] = []
    t = _trainer(6)
    t.cfg.eval_every, t.cfg.save_every = 3, 2
    t.callbacks = TrainCallbacks(eval_fn=lambda m: 1.5, save_fn=lambda step, state: saved.append(step))
    summary = t.fit()
    assert saved == [2, 4] and summary["val_loss"] == 1.5 and summary["step"] == 6
