"""Shared fixtures: Hydra-composed configs shrunk for CPU, and CLI runners."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qtrain.config import RunConfig, register_configs

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# A model small enough that a few training steps take well under a second.
SHRINK = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.mlp_hidden=64", "model.block_size=32",
          "train.batch_size=4", "data.val_windows=4", "train.warmup_steps=2", "eval.decode_tokens=8"]

torch.set_num_threads(min(2, os.cpu_count() or 1))
# pytest-xdist's workers run with COLUMNS=80 LINES=24 in their environment; qtrain's output off a
# terminal must be tested as a user's pipe sees it (rich takes COLUMNS as a fixed width).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)


def free_port() -> int:
    """A TCP port nobody listens on now (torchrun's rendezvous; tests may run in parallel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose_cfg(overrides: list[str]) -> RunConfig:
    """Compose the shipped config with `overrides` into a typed RunConfig."""
    register_configs()
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("qtrain.conf", version_base=None).__enter__()
    dcfg = compose("config", overrides=overrides)
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, RunConfig)
    return cfg


def qtrain_in_process(args: list[str]) -> int:
    """Run `qtrain ARGS` in this process (`qtrain.cli.main`, the console script's entrypoint); its exit code.

    No interpreter, torch and Hydra start-up (seconds per child); output goes to pytest's
    capture (`capsys`). Keep `run_qtrain` for what needs a process of its own.
    """
    from qtrain.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def run_qtrain(args: list[str], cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run `python -m qtrain ARGS` in a child process; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qtrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def one_thread():  # noqa: ANN201
    """Tiny shapes: one intra-op thread for a module (on a busy 2-core machine, two threads
    waiting on each other made tiny compiled steps ~20x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shrink() -> list[str]:
    """Overrides for a tiny, fast model."""
    return list(SHRINK)
