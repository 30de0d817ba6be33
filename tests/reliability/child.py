"""`qtrain` with test-only fault hooks, run as a child process by the reliability tests.

Hooks, chosen by environment variables (nothing here is imported by qtrain itself):
- QTRAIN_TEST_PAUSE_AT_STEP=k, QTRAIN_TEST_READY_FILE=path: after optimizer step k completes
  (metrics logged), create the ready file and wait until a SIGTERM sets the stop flag; the
  test sends the real signal. A 120 s deadline guards against a lost signal.
- QTRAIN_TEST_KILL_BEFORE_MANIFEST=k: while saving step k, after the weights files are written
  and before manifest.json is, record the published checkpoints' hashes in
  QTRAIN_TEST_HASHES_FILE (if set) and SIGKILL this process.
- QTRAIN_TEST_HOLD_AFTER_STOP=1 (with the pause above): once the first signal has set the stop
  flag, create `<ready file>.stopping` and keep waiting (inside the step, 120 s deadline), so
  the test can send a second signal while the loop is still busy.
- QTRAIN_TEST_PAUSE_IN_EVAL=path: when `mode=eval` starts computing the validation loss, create
  the file and sleep (120 s deadline): a signal arrives outside training.
- QTRAIN_TEST_PAUSE_IN=module:function, QTRAIN_TEST_PAUSE_READY=path: after the first call of
  that function returns (a step of a mode's long loop: a sampled token, a GPTQ layer, a file
  hashed or written, a run read), create the ready file and sleep (120 s deadline): a signal
  arrives in the middle of the mode's work.
- QTRAIN_TEST_THREADS=n: torch threads, so the child computes exactly like the parent.
- QTRAIN_TEST_EVENTS=path: append one JSON line per barrier entry/exit and per checkpoint
  write (rank, pid, step, monotonic time), so a DDP test can check who published when.
- QTRAIN_TEST_FAIL_SAVE_STEP=k, QTRAIN_TEST_FAIL_SAVE_RANK=r: the save of step k fails on
  rank r (rank 0: an I/O error while writing the weights; other ranks: collecting their state).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def _install_pause(step: int, ready: Path, hold: bool) -> None:
    from qtrain.train import Trainer

    original = Trainer._after_step

    def after_step(self: Trainer, loss: float, grad_norm: float, dt: float) -> None:
        original(self, loss, grad_norm, dt)
        if self.step == step:
            ready.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not self.callbacks.stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)  # the SIGTERM handler runs between these sleeps
            if hold:
                ready.with_suffix(".stopping").write_text("")
                while time.monotonic() < deadline:
                    time.sleep(0.01)  # a second signal ends the run from inside this sleep

    Trainer._after_step = after_step  # type: ignore[method-assign]


def _install_eval_pause(ready: Path) -> None:
    from qtrain.modes import context

    def val_loss(*args: object, **kwargs: object) -> float:
        ready.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.01)  # the signal ends the run from inside this sleep
        raise AssertionError("no signal came")

    context.val_loss = val_loss  # type: ignore[assignment]


def _install_pause_in(target: str, ready: Path) -> None:
    import importlib

    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def paused(*args: object, **kwargs: object) -> object:
        result = original(*args, **kwargs)
        if not ready.exists():
            ready.write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)  # the signal ends the run from inside this sleep
            raise AssertionError("no signal came")
        return result

    setattr(module, name, paused)


def _install_kill(step: int, hashes_file: str | None) -> None:
    from qtrain import checkpoint as ck
    from qtrain.checkpoint import write as ck_write

    original = ck_write._write_json
    target = ck.step_dir_name(step)

    def write_json(path: Path, data: object) -> None:
        if path.name == ck.MANIFEST and target in path.parent.name:
            if hashes_file:
                root = path.parent.parent
                hashes = {
                    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(root.rglob("*"))
                    if p.is_file() and not p.relative_to(root).parts[0].startswith(ck.TMP_PREFIX)
                }
                Path(hashes_file).write_text(json.dumps(hashes))
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, data)

    ck_write._write_json = write_json  # type: ignore[assignment]


def _event(path: Path, **fields: object) -> None:
    line = json.dumps({"rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(), "t": time.monotonic(), **fields})
    with path.open("a") as f:  # one short O_APPEND write per line: safe across processes
        f.write(line + "\n")


def _install_events(path: Path) -> None:
    from qtrain import checkpoint as ck
    from qtrain import distributed

    original_barrier, original_save = distributed.barrier, ck.save_checkpoint

    def barrier() -> None:
        _event(path, event="barrier_enter")
        original_barrier()
        _event(path, event="barrier_exit")

    def save_checkpoint(root: Path, step: int, *args: object, **kwargs: object) -> Path:
        _event(path, event="save_start", step=step)
        out = original_save(root, step, *args, **kwargs)  # type: ignore[arg-type]
        _event(path, event="published", step=step)
        return out

    distributed.barrier = barrier  # type: ignore[assignment]
    ck.save_checkpoint = save_checkpoint  # type: ignore[assignment]


def _install_save_failure(step: int, fail_rank: int) -> None:
    if int(os.environ.get("RANK", "0")) != fail_rank:
        return
    from qtrain import checkpoint as ck
    from qtrain.train import Trainer

    if fail_rank == 0:
        original_write = ck.write_safetensors
        target = ck.step_dir_name(step)

        def write_safetensors(tensors: object, path: Path, *args: object, **kwargs: object) -> None:
            if target in path.parent.name:
                raise OSError(5, "Input/output error (injected)", str(path))
            original_write(tensors, path, *args, **kwargs)  # type: ignore[arg-type]

        ck.write_safetensors = write_safetensors  # type: ignore[assignment]
        return
    original_state = Trainer.state_dict

    def state_dict(self: Trainer) -> dict:
        if self.step == step:
            raise RuntimeError(f"rank {fail_rank} could not collect its state (injected)")
        return original_state(self)

    Trainer.state_dict = state_dict  # type: ignore[method-assign]


def main() -> None:
    import torch

    if os.environ.get("QTRAIN_TEST_THREADS"):
        torch.set_num_threads(int(os.environ["QTRAIN_TEST_THREADS"]))
    if os.environ.get("QTRAIN_TEST_PAUSE_AT_STEP"):
        hold = os.environ.get("QTRAIN_TEST_HOLD_AFTER_STOP") == "1"
        _install_pause(int(os.environ["QTRAIN_TEST_PAUSE_AT_STEP"]), Path(os.environ["QTRAIN_TEST_READY_FILE"]), hold)
    if os.environ.get("QTRAIN_TEST_PAUSE_IN_EVAL"):
        _install_eval_pause(Path(os.environ["QTRAIN_TEST_PAUSE_IN_EVAL"]))
    if os.environ.get("QTRAIN_TEST_PAUSE_IN"):
        _install_pause_in(os.environ["QTRAIN_TEST_PAUSE_IN"], Path(os.environ["QTRAIN_TEST_PAUSE_READY"]))
    if os.environ.get("QTRAIN_TEST_KILL_BEFORE_MANIFEST"):
        _install_kill(int(os.environ["QTRAIN_TEST_KILL_BEFORE_MANIFEST"]), os.environ.get("QTRAIN_TEST_HASHES_FILE"))
    if os.environ.get("QTRAIN_TEST_EVENTS"):
        _install_events(Path(os.environ["QTRAIN_TEST_EVENTS"]))
    if os.environ.get("QTRAIN_TEST_FAIL_SAVE_STEP"):
        _install_save_failure(
            int(os.environ["QTRAIN_TEST_FAIL_SAVE_STEP"]), int(os.environ["QTRAIN_TEST_FAIL_SAVE_RANK"])
        )
    from qtrain.cli import main as qtrain_main

    qtrain_main(sys.argv[1:])


if __name__ == "__main__":
    main()
