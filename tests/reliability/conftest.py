"""Helpers for the fault catalogue (RELIABILITY.md): in-process CLI runs, tree hashes, child runs.

In-process runs call `qtrain.cli.main` and return its exit code; faults inside writes are
monkeypatched. Real signals go to children started through `child.py`, whose environment
hooks stop the child at an exact point (never sleep-and-hope).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qtrain import cli
from qtrain.config import RunConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CHILD = HERE / "child.py"
SHRINK = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.mlp_hidden=64",
    "model.block_size=32",
    "train.batch_size=4",
    "data.val_windows=4",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "eval.decode_tokens=8",  # the decode timing of packed results still runs: 8 tokens, not 64 (seconds per run)
]


def qtrain(args: list[str]) -> int:
    """Run `qtrain ARGS` in this process; return its exit code (0 when main returns)."""
    try:
        cli.main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


_BASE: list[RunConfig] = []


def config(changes: dict[str, Any] | None = None) -> RunConfig:
    """The shrunken `mode=train` config (composed with Hydra once), with dotted-key `changes`.

    Example: ``config({"mode.name": "verify", "init_from": str(path)})``.
    """
    if not _BASE:
        from hydra.core.global_hydra import GlobalHydra

        from tests.conftest import compose_cfg

        _BASE.append(compose_cfg(["mode=train", *SHRINK]))
        GlobalHydra.instance().clear()
    cfg = copy.deepcopy(_BASE[0])
    for key, value in (changes or {}).items():
        *parents, leaf = key.split(".")
        node: Any = cfg
        for part in parents:
            node = getattr(node, part)
        assert hasattr(node, leaf), key
        setattr(node, leaf, value)
    return cfg


def execute(changes: dict[str, Any], run_dir: Path) -> int:
    """Run one job like the CLI does after composing (`cli.execute`: error mapping, SIGTERM); return its exit code.

    Skips Hydra's composition (about a second per call here), so most cases use this; the
    command-line behaviour itself (precheck, same command re-run) goes through `qtrain`.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [f"{k}={v}" for k, v in changes.items()]  # what the command line would have said
    return cli.execute(config(changes), run_dir, overrides)


def train_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    """A shrunken `mode=train` command line in `run_dir`."""
    return ["mode=train", *SHRINK, f"train.max_steps={steps}", *extra, f"hydra.run.dir={run_dir}"]


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root`, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def published_hashes(ckpt_root: Path) -> dict[str, str]:
    """Hashes of the published checkpoints (step dirs and `latest`), ignoring temporaries."""
    return {k: v for k, v in tree_hashes(ckpt_root).items() if not k.startswith(".tmp-")}


def temps(ckpt_root: Path) -> list[str]:
    """Leftover temporary entries of interrupted writes."""
    return sorted(p.name for p in ckpt_root.glob(".tmp-*"))


def step_names(ckpt_root: Path) -> list[str]:
    """Published checkpoint directory names, oldest first."""
    return sorted(p.name for p in ckpt_root.glob("step_*"))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) for every line of metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The stored model tensors of a checkpoint directory."""
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical model tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def rewrite_listed_file(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a listed file and update its size and hash in the manifest (an 'altered but consistent' file)."""
    (ckpt / name).write_bytes(data)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(ckpt, m)


def write_manifest(ckpt: Path, m: dict[str, Any]) -> None:
    """Write `m` as the checkpoint's manifest, resealed (`manifest_sha256`): a forger who rewrites both."""
    from qtrain import checkpoint as ck

    (ckpt / ck.MANIFEST).write_bytes(ck.json_file_bytes(ck.seal_manifest(m)))


def start_child(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `python tests/reliability/child.py ARGS` (qtrain with test hooks) in its own session."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "QTRAIN_TEST_THREADS": str(torch.get_num_threads()), **env}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        cwd=REPO,
        env=full,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_file(path: Path, proc: subprocess.Popen[str], deadline_s: float = 120) -> None:
    """Poll until `path` exists; fail if the child exits first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited {proc.returncode} before {path.name}:\n{out}\n{err}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"child never reached {path.name} within {deadline_s}s")
        time.sleep(0.02)


def sigterm_at_step(args: list[str], step: int, tmp: Path) -> tuple[int, str, str]:
    """Run a child until it completes `step`, send it a real SIGTERM, return (exit code, stdout, stderr)."""
    ready = tmp / f"ready-{step}"
    proc = start_child(args, {"QTRAIN_TEST_PAUSE_AT_STEP": str(step), "QTRAIN_TEST_READY_FILE": str(ready)})
    wait_for_file(ready, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a run dir for a test to damage."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shrunken run with checkpoints at steps 2 and 4 (do not modify: copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert execute({"train.max_steps": 4, "train.save_every": 2, "train.log_every": 1}, run) == 0
    assert step_names(run / "checkpoints") == ["step_0000002", "step_0000004"]
    return run


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 8-step run, one metrics line per step (the baseline for resume cases)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert execute({"train.max_steps": 8, "train.log_every": 1, "train.save_every": 0}, run) == 0
    return run


def manifest(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's manifest as stored."""
    return json.loads((ckpt / "manifest.json").read_text())


@pytest.fixture(scope="module")
def catchable_sigint() -> Iterator[None]:
    """Children start with SIGINT at its default even when this test run has it ignored (a
    background job of a script): qtrain rightly keeps an inherited SIG_IGN."""
    original = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", popen)
        yield
