"""RELIABILITY.md case 6: under DDP (2 processes, gloo) only rank 0 publishes, after a barrier;
a rank that fails to write makes all ranks stop and nothing is published."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.reliability.conftest import CHILD, REPO, SHRINK, published_hashes, step_names, temps

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("fail_rank", [1])  # rank 1 failing is the harder case: rank 0 must not publish
def test_case_06_ddp_rank0_publishes_after_barrier_and_a_failed_write_stops_all(tmp_path: Path, fail_rank: int) -> None:
    run, events = tmp_path / "run", tmp_path / "events.jsonl"
    args = [o for o in SHRINK if not o.startswith("train.batch_size")]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(CHILD),
        "mode=train",
        *args,
        "train.batch_size=2",
        "train.max_steps=6",
        "train.save_every=2",
        "train.log_every=1",
        f"hydra.run.dir={run}",
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "QTRAIN_TEST_EVENTS": str(events),
        "QTRAIN_TEST_FAIL_SAVE_STEP": "4",
        "QTRAIN_TEST_FAIL_SAVE_RANK": str(fail_rank),
    }
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]  # the job failed as a whole (no rank went on, none hung)
    log = [json.loads(line) for line in events.read_text().splitlines()]

    # Every rank stopped at the failed save of step 4: nobody trained on past it.
    assert "injected" in out
    metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(metrics) == 4

    # Only rank 0 ever wrote, and each write began after both ranks had reached the barrier before it.
    writes = [e for e in log if e["event"] == "save_start"]
    assert {e["rank"] for e in writes} == {0}
    for w in writes:
        entered = {e["rank"] for e in log if e["event"] == "barrier_enter" and e["t"] <= w["t"]}
        assert entered == {0, 1}, f"rank 0 wrote step {w['step']} before every rank reached the barrier"
    # Step 2 was published; for the failed step 4 nothing was: no directory, no temporary, `latest` unchanged.
    assert [e["step"] for e in log if e["event"] == "published"] == [2]
    root = run / "checkpoints"
    assert step_names(root) == ["step_0000002"] and temps(root) == []
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert published_hashes(root)  # and what is there verifies
    from qtrain.checkpoint import verify_checkpoint

    verify_checkpoint(root / "step_0000002")
