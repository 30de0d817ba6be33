"""SIGKILL a training run at random moments, re-run the same command, check it ends where an uninterrupted run does.

What a new user would do after a crash: run the same command again. This script runs

    qtrain mode=qat quant=int4 model=small train.max_steps=60 train.save_every=10 train.batch_size=8 \
        hydra.run.dir=DIR resume=auto

once uninterrupted (in REF_DIR), then in DIR starts it, SIGKILLs it at a random moment, and
starts it again, `--kills` times, before letting it finish. After every kill it checks that
the next run resumed from the newest valid checkpoint (as `find_latest_valid` sees it after
the kill) and named every incomplete directory it ignored. At the end the final checkpoint's
logits must equal (torch.equal) the uninterrupted run's.

    python scripts/kill_resume_check.py --dir /tmp/killtest --ref-dir /tmp/killtest_ref
    python scripts/kill_resume_check.py --mode train      # full precision instead of QAT

Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from qtrain import checkpoint as ck
from qtrain.modes.loading import model_from_checkpoint


def command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The user's command line (the console script if installed, else `python -m qtrain`)."""
    exe = [shutil.which("qtrain")] if shutil.which("qtrain") else [sys.executable, "-m", "qtrain"]
    quant = ["quant=int4"] if args.mode == "qat" else []
    return [
        *exe,
        f"mode={args.mode}",
        *quant,
        "model=small",
        f"train.max_steps={args.steps}",  # type: ignore[list-item]
        "train.save_every=10",
        "train.batch_size=8",
        f"hydra.run.dir={run_dir}",
        "resume=auto",
    ]


def run(cmd: list[str], kill_after: float | None) -> tuple[int, str, float, float | None]:
    """Run `cmd`; SIGKILL it after `kill_after` seconds if still running.

    Returns (exit code, output, seconds, startup seconds): startup is estimated from the first
    progress line (`step k/N ... elapsed Ts ...`: T seconds since the loop began).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    lines: list[str] = []
    startup: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"step \d+/\d+ .* elapsed ([\d.]+)s ", line.strip())
            if m and not startup:
                startup.append(time.monotonic() - t0 - float(m.group(1)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reader.join(timeout=10)
    return proc.returncode, "".join(lines), time.monotonic() - t0, startup[0] if startup else None


def final_logits(run_dir: Path) -> tuple[Path, torch.Tensor]:
    """The newest valid checkpoint of a run dir and its logits on a fixed batch."""
    found, _ = ck.find_latest_valid(run_dir / "checkpoints")
    assert found is not None, f"no valid checkpoint in {run_dir}"
    model = model_from_checkpoint(ck.load_checkpoint(found, with_trainer=False), torch.device("cpu"))
    tokens = torch.arange(256).view(1, 256) % 256
    with torch.no_grad():
        return found, model(tokens[:, : model.cfg.block_size])


def state_of(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """Newest valid checkpoint and the leftovers a resume must skip."""
    found, skipped = ck.find_latest_valid(run_dir / "checkpoints")
    return found, [d for d, _ in skipped]


def check_resume(out: str, expected: Path | None, leftovers: list[Path]) -> list[str]:
    """Problems with how a re-run resumed (empty when it did the right thing)."""
    problems = []
    if expected is None:
        if "starting fresh" not in out:
            problems.append("no checkpoint yet, but the run did not say it starts fresh")
    else:
        m = re.search(r"continuing from (\S+) \(step (\d+)\)", out)
        if not m or Path(m.group(1)) != expected:
            problems.append(f"expected to continue from {expected}, got {m.group(1) if m else 'no resume line'}")
    for d in leftovers:
        if f"ignoring {d}" not in out:
            problems.append(f"did not say it ignored {d}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/killtest"))
    p.add_argument("--ref-dir", type=Path, default=Path("/tmp/killtest_ref"))
    p.add_argument("--mode", choices=("qat", "train"), default="qat")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    for d in (args.dir, args.ref_dir):
        if d.exists():
            sys.exit(f"{d} exists; remove it first (this script starts from empty run dirs)")

    code, out, t_ref, startup = run(command(args, args.ref_dir), None)
    if code != 0:
        print(out)
        return 1
    startup = startup or 0.1 * t_ref
    print(f"uninterrupted run: {t_ref:.1f}s ({startup:.1f}s start-up) in {args.ref_dir}")
    problems: list[str] = []
    kills = 0
    expected, leftovers = state_of(args.dir)
    while kills < args.kills:
        done = ck.step_of(expected) if expected is not None else 0
        remaining = startup + (t_ref - startup) * (args.steps - done) / args.steps
        delay = rng.uniform(0.05, 0.85) * remaining  # a random moment of this run (start-up included)
        code, out, took, _ = run(command(args, args.dir), delay)
        problems += [f"run {kills + 1}: {x}" for x in check_resume(out, expected, leftovers)]
        if code != -signal.SIGKILL:
            problems.append(f"run {kills + 1}: exit {code} before the kill at {delay:.1f}s:\n{out[-2000:]}")
            break
        kills += 1
        resumed = re.search(r"continuing from \S+ \(step (\d+)\)", out)
        expected, leftovers = state_of(args.dir)
        steps = [d.name for d in ck.list_step_dirs(args.dir / "checkpoints")]
        print(
            f"kill {kills}: at {delay:5.1f}s (resumed from step {resumed.group(1) if resumed else '0, fresh'}); "
            f"newest valid now {expected.name if expected else None}; published {steps}; "
            f"leftovers {[d.name for d in leftovers]}"
        )
    code, out, took, _ = run(command(args, args.dir), None)
    problems += [f"final run: {x}" for x in check_resume(out, expected, leftovers)]
    if code != 0:
        problems.append(f"final run exited {code}:\n{out[-2000:]}")
    else:
        ref_ckpt, ref = final_logits(args.ref_dir)
        got_ckpt, got = final_logits(args.dir)
        same = torch.equal(ref, got) and ref_ckpt.name == got_ckpt.name
        print(f"final: {got_ckpt.name} vs uninterrupted {ref_ckpt.name}: logits torch.equal = {same}")
        if not same:
            problems.append(f"final logits differ (max abs diff {float((ref - got).abs().max()):.3g})")
        left = list((args.dir / "checkpoints").glob(".tmp-*"))
        if left:
            problems.append(f"temporary leftovers after the final run: {left}")
    print(f"{kills} kills, {'OK' if not problems else 'FAILED'}")
    for x in problems:
        print("  -", x)
    return 0 if not problems and kills == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
