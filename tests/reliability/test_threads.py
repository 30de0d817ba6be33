"""`threads=auto|N` (issue 12 item 4): PyTorch's threads, report.json, and the load-average warning."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain import runtime
from qtrain.config_rules import validate
from qtrain.train import Trainer
from tests.reliability.conftest import config, execute, qtrain


def _report(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("n", [1, 2])
def test_threads_set_torchs_threads_for_the_run_and_are_reported(
    n: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = Trainer.fit

    def fit(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    other = 3 - n
    torch.set_num_threads(other)  # the caller's setting, restored afterwards
    try:
        assert execute({"threads": n, "train.max_steps": 1}, tmp_path / "run") == 0
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    assert seen == [n]
    assert _report(tmp_path / "run")["threads"] == n


def test_threads_auto_uses_the_cores_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert runtime.resolve_threads("auto") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of a node share them
    assert runtime.resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit environment (torchrun sets 1) wins
    assert runtime.resolve_threads("auto") == 2
    assert runtime.resolve_threads(4) == 4 and runtime.resolve_threads("4") == 4


def test_bad_threads_values_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (0, -2, "many", 1.5, True):
        assert any(p.startswith("threads:") for p in validate(config({"threads": bad}))), bad
    assert not validate(config({"threads": "auto"})) and not validate(config({"threads": 3}))
    assert qtrain(["mode=train", "threads=0", f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "threads: '0' must be auto or a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _eval(trained: Path, run: Path) -> int:
    changes = {
        "mode.name": "eval",
        "init_from": str(trained / "checkpoints" / "step_0000004"),
        "eval.decode_tokens": 4,
        "eval.decode_repeats": 1,
        "eval.prefill_tokens": 0,
        "threads": 1,
    }
    return execute(changes, run)


def test_eval_says_when_the_load_average_exceeds_its_threads(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 6.0, 3.0))  # a busy machine
    assert _eval(trained, tmp_path / "busy") == 0
    err = capsys.readouterr().err
    assert f"load average 7.50 exceeds the {max(1, runtime.available_cores())} core" in err and "unreliable" in err
    report = _report(tmp_path / "busy")
    assert report["speed_reliable"] is False and report["load_average"] == [7.5, 7.5]
    assert report["threads"] == 1 and report["decode_tokens_per_s"] > 0

    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # below the one core it uses
    assert _eval(trained, tmp_path / "quiet") == 0
    assert "load average" not in capsys.readouterr().err
    assert _report(tmp_path / "quiet")["speed_reliable"] is True

    # The run's own thread is in the load: one thread on an otherwise idle 2-core machine reads
    # ~1.3, which leaves it a free core (no warning); only above the machine's cores is it crowded.
    cores = runtime.available_cores()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.7, 1.0, 1.0))
    assert _eval(trained, tmp_path / "own_load") == 0
    assert ("load average" in capsys.readouterr().err) is (cores - 0.7 > max(1, cores))


def test_openmp_threads_sleep_instead_of_spinning_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.WAIT_POLICY, "unset")  # recorded, so the test's changes are undone
    monkeypatch.delenv(runtime.WAIT_POLICY)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.9, 1.9))  # not overloaded: OpenMP's default
    assert runtime.openmp_wait_policy() is None and runtime.WAIT_POLICY not in os.environ
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    note = runtime.openmp_wait_policy()
    assert note is not None and "load average 9.00 on 2 cores: OMP_WAIT_POLICY=passive" in note
    assert os.environ[runtime.WAIT_POLICY] == "passive"
    monkeypatch.setenv(runtime.WAIT_POLICY, "active")  # the user's choice is kept
    assert runtime.openmp_wait_policy() is None and os.environ[runtime.WAIT_POLICY] == "active"
