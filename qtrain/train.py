"""The training loop: AdamW, warmup + cosine, accumulation, clipping, a non-finite guard, DDP.

The loop knows nothing about checkpoint files or quantization schemes: the caller passes
`TrainCallbacks` (a `save_fn`, an `eval_fn`, step callbacks such as QAT schedules and
quantization hooks) and the parameter groups. It only looks at parameter names once: under
DDP, learnable quantization scales (parameters named ``*.scales``) get no gradient before QAT
starts or once frozen, so DDP is told to expect unused parameters. Its whole state
(optimizer, step, sampler position) round-trips through `state_dict` / `load_state_dict`,
which is what makes a resumed run bit-identical to an uninterrupted one.

Example:
    >>> trainer = Trainer(model, cfg.train, sampler, torch.device("cpu"))
    >>> summary = trainer.fit()
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qtrain import distributed
from qtrain.config import TrainConfig
from qtrain.console import rank
from qtrain.data import BatchSampler
from qtrain.errors import NonFiniteError, Preempted
from qtrain.progress import TrainProgress
from qtrain.rundir import append_text

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


StepCallback = Callable[[int, nn.Module], "dict[str, float] | None"]
"""Called with the step index about to run (`before`) or just completed (`after`)."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per byte)."""
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))


def default_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on norms and other vectors."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]


@dataclass
class StopFlag:
    """Set from a signal handler; the loop saves and stops at the next step boundary."""

    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        """Ask the loop to stop."""
        self.event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked."""
        return self.event.is_set()


@dataclass
class TrainCallbacks:
    """Optional callbacks the caller wires into the loop (not `qtrain.quant.hooks`, which act on layers)."""

    eval_fn: Callable[[nn.Module], float] | None = None
    """Validation loss of the model."""
    eval_extra: Callable[[float], dict[str, Any]] | None = None
    """More metrics of an evaluation from its validation loss (bits per byte), logged beside it."""
    save_fn: Callable[[int, dict[str, Any]], Any] | None = None
    """Publish a checkpoint for (step, trainer state)."""
    before_step: list[StepCallback] = field(default_factory=list)
    """Run before each optimizer step's forward (schedules)."""
    after_step: list[StepCallback] = field(default_factory=list)
    """Run after each optimizer step; may return metrics to log."""
    stop: StopFlag = field(default_factory=StopFlag)
    """SIGTERM flag."""


class Trainer:
    """One training run's loop and state."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        sampler: BatchSampler,
        device: torch.device,
        *,
        callbacks: TrainCallbacks | None = None,
        loss_fn: LossFn = cross_entropy_loss,
        param_groups: list[dict[str, Any]] | None = None,
        metrics_path: Path | None = None,
        compile_model: bool = False,
    ) -> None:
        self.model, self.cfg, self.sampler, self.device = model, cfg, sampler, device
        if hasattr(model, "activation_checkpointing"):  # a qtrain GPT: recompute blocks in backward
            setattr(model, "activation_checkpointing", cfg.activation_checkpointing)  # noqa: B010
        self.callbacks = callbacks or TrainCallbacks()
        self.loss_fn = loss_fn
        self.metrics_path = metrics_path
        self.step = 0
        self.last_val_loss: float | None = None
        groups = param_groups if param_groups is not None else default_param_groups(model, cfg)
        fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all params; CPU unchanged
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.run_model: nn.Module = model
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            # learnable scales get no gradient before qat.start_step or once frozen
            unused = any(n.endswith(".scales") for n, _ in model.named_parameters())
            self.run_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
        self.cudagraphs = compile_model and device.type == "cuda" and self.world == 1
        if compile_model:
            # Measured on an H200 (scripts/gpu_check.py, model=small, batch 16 x 256, bf16 autocast,
            # fused AdamW): the whole model compiled with mode="reduce-overhead" (forward and backward
            # replayed as CUDA graphs) took 2.7 ms/step against 10.4 ms with each block compiled on
            # its own (regional), and kept fake-quant int4 at 1.04x fp: at these sizes a step is
            # bound by kernel launches, which the graphs remove. Single-process CUDA only: DDP's
            # backward all-reduce hooks cannot be captured, and the CPU keeps the default mode.
            mode = "reduce-overhead" if self.cudagraphs else None
            self.run_model = torch.compile(self.run_model, mode=mode)  # type: ignore[assignment]
        self.params = [p for g in groups for p in g["params"]]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, step and sampler position, as nested tensors and scalars."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by `state_dict`."""
        opt = state["optimizer"]
        opt["state"] = {int(k): v for k, v in opt["state"].items()}
        for saved, g in zip(opt["param_groups"], self.optimizer.param_groups, strict=False):
            saved["fused"] = g.get("fused")  # this device's choice, not the saver's (steps placed to match)
        self.optimizer.load_state_dict(opt)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])

    # ------------------------------------------------------------------ loop

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        for i in range(self.cfg.grad_accum):
            x, y = self.sampler.next_batch()
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                i == self.cfg.grad_accum - 1,
            )

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss, grad norm). Raises NonFiniteError before stepping."""
        for cb in self.callbacks.before_step:
            cb(self.step, self.model)
        loss_sum = torch.zeros((), device=self.device)
        for x, y, last in self._micro_batches():
            if self.cudagraphs:  # a new replay: the previous micro-batch's graph outputs are done with
                torch.compiler.cudagraph_mark_step_begin()
            sync = contextlib.nullcontext() if (last or self.world == 1) else self.run_model.no_sync()  # type: ignore[operator]
            with sync, self._autocast():
                loss = self.loss_fn(self.run_model, x, y) / self.cfg.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        if self.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        loss_val = float(loss_sum)
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(self.step + 1, loss_val, grad_norm)  # the step being attempted, 1-based
        factor = lr_factor(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("base_lr", self.cfg.lr) * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_val, grad_norm

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None and rank() == 0:
            append_text(self.metrics_path, json.dumps(record) + "\n")  # never through a planted link

    def evaluate(self) -> float | None:
        """Validation loss through `eval_fn` (model in eval mode), or None without one."""
        if self.callbacks.eval_fn is None:
            return None
        self.model.eval()
        with torch.no_grad(), self._autocast():
            val = self.callbacks.eval_fn(self.model)
        self.model.train()
        self.last_val_loss = val
        return val

    def save(self) -> Any:
        """Publish a checkpoint through `save_fn` (rank 0 writes, after a barrier).

        Under DDP every rank calls this; if any rank fails to collect its state, nothing is
        written; if rank 0 fails to write, every rank raises.
        """
        if self.callbacks.save_fn is None:
            return None
        distributed.barrier()
        state, result, error = None, None, None
        try:
            state = self.state_dict()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = err
        if distributed.any_rank(error is not None):  # every rank agrees before rank 0 writes anything
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint at step {self.step} failed on another rank; nothing published, stopping")
        assert state is not None
        try:
            result = self.callbacks.save_fn(self.step, state)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = err
        if distributed.any_rank(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint at step {self.step} failed on another rank; stopping")
        return result

    def _after_step(self, loss: float, grad_norm: float, dt: float) -> None:
        cfg = self.cfg
        record: dict[str, Any] = {}
        for cb in self.callbacks.after_step:
            extra = cb(self.step, self.model)
            if extra:
                record.update(extra)
        is_last = self.step == cfg.max_steps
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or is_last):
            record["val_loss"] = self.evaluate()
            if record["val_loss"] is not None and self.callbacks.eval_extra is not None:
                record.update(self.callbacks.eval_extra(record["val_loss"]))
        if record or self.step % cfg.log_interval() == 0 or is_last:
            tokens = self.sampler.batch_size * self.sampler.block_size * cfg.grad_accum * self.world
            lr = self.optimizer.param_groups[0]["lr"]
            self._log(
                {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens / max(dt, 1e-9),
                    **record,
                }
            )
        if cfg.save_every and self.step % cfg.save_every == 0 and not is_last:
            self.save()

    def fit(self, progress: TrainProgress | None = None) -> dict[str, Any]:
        """Run until `cfg.max_steps` (saving every `train.save_every` steps, not at the end: the
        caller saves the result). SIGTERM saves and raises Preempted.

        `progress` (a :class:`~qtrain.progress.TrainProgress`) shows the run: a live display
        on a terminal, a plain line every `train.log_every` steps elsewhere.
        """
        self.model.train()
        start_step, t_start = self.step, time.perf_counter()
        tokens_per_step = self.sampler.batch_size * self.sampler.block_size * self.cfg.grad_accum * self.world
        loss = float("nan")
        if progress is not None:
            progress.start(self.step, self.cfg.max_steps, tokens_per_step, self.cfg.log_interval())
        try:
            while self.step < self.cfg.max_steps:
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step()
                step_s = time.perf_counter() - t0
                self._after_step(loss, grad_norm, step_s)
                if progress is not None:
                    lr = self.optimizer.param_groups[0]["lr"]
                    progress.update(self.step, loss, lr, self.last_val_loss, step_s)
                if distributed.any_rank(self.callbacks.stop.is_set()):
                    self.save()
                    raise Preempted(f"SIGTERM at step {self.step}: checkpoint saved, exiting")
        finally:
            if progress is not None:
                progress.close()
        elapsed = time.perf_counter() - t_start
        if self.cfg.eval_every == 0 and self.callbacks.eval_fn is not None:
            self.evaluate()
        steps = self.step - start_step
        return {
            "step": self.step,
            "loss": loss,
            "train_s": elapsed,
            "tokens_per_s": steps * tokens_per_step / elapsed if steps and elapsed > 0 else 0.0,
            "val_loss": self.last_val_loss,
        }
