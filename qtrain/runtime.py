"""Process-wide settings of one qtrain job: how it reacts to signals, and how many CPU threads it uses.

Signals (DESIGN.md section 6): SIGINT (Ctrl-C) and SIGTERM are handled alike; the exit code
says which one came (130 for SIGINT, 143 for SIGTERM, as a shell reports them).

- While training (the main thread is inside ``Trainer.fit`` or ``Trainer.save``), the first
  signal asks the loop to stop: the running step finishes, a checkpoint is saved, the run
  exits 130/143 (and resuming continues bit for bit).
- Anywhere else (loading, evaluation, the decode benchmark, PTQ calibration, Hydra's own
  start-up), nothing is in progress that a checkpoint could keep, so the first signal ends
  the run at once (:class:`~qtrain.errors.Interrupted`: one line, no traceback).
- A second signal always ends the run at once.
- Between the jobs of a multirun sweep, the first signal stops the sweep: the jobs not yet
  started are skipped and recorded (``status.json``, ``sweep_status.json``).

Threads: ``threads=auto`` is ``OMP_NUM_THREADS`` when set (``torchrun`` sets it to 1), else the
cores this process may run on (``os.sched_getaffinity``) divided among the processes of this
node. One number drives PyTorch's intra-op threads and qtrain's native OpenMP kernels (they
are passed ``torch.get_num_threads()`` on every call). On an overloaded machine idle OpenMP
threads are made to sleep instead of spin (:func:`openmp_wait_policy`); ``mode=eval`` says
when the load average exceeds its threads (:func:`speed_conditions`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from types import FrameType
from typing import Any

from qtrain.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted

SIGNALS: dict[int, tuple[str, int]] = {
    signal.SIGINT: ("SIGINT", EXIT_SIGINT),
    signal.SIGTERM: ("SIGTERM", EXIT_SIGTERM),
}
"""The handled signals: name and exit code."""
TRAINING_CODE = ("fit", "save")
"""``qtrain.train.Trainer`` methods during which a first signal stops gracefully."""


def signal_name(code: int) -> str:
    """``"SIGINT"`` for 130, ``"SIGTERM"`` for 143 (the exit codes of :data:`SIGNALS`)."""
    return next((name for name, c in SIGNALS.values() if c == code), f"exit {code}")


def _training(frame: FrameType | None) -> bool:
    """Whether the interrupted main thread is inside ``Trainer.fit`` / ``Trainer.save``."""
    train = sys.modules.get("qtrain.train")
    path = getattr(train, "__file__", None)
    while frame is not None and path:
        code = frame.f_code
        if code.co_name in TRAINING_CODE and code.co_filename == path:
            return True
        frame = frame.f_back
    return False


def _say(message: str) -> None:
    from qtrain.console import err_console

    with suppress(RuntimeError):  # the signal arrived inside a write to stderr (reentrant call): stay quiet
        err_console.print(message, markup=False, highlight=False)


class SignalStop:
    """A SIGINT/SIGTERM handler: the first signal asks for a stop, later ones end the run at once.

    Args:
        request_stop: called with the exit code (130/143) by the first signal, or ``None``
            when there is nothing to stop gracefully (the first signal ends the run).
        only_in_training: call ``request_stop`` only while the main thread trains (see the
            module docstring); otherwise the first signal ends the run at once.
        note: what the first signal's message says will happen.
    """

    def __init__(
        self,
        request_stop: Callable[[int], None] | None,
        only_in_training: bool = True,
        note: str = "finishing the current step and saving a checkpoint",
    ) -> None:
        self.request_stop, self.only_in_training, self.note = request_stop, only_in_training, note
        self.codes: list[int] = []

    @property
    def exit_code(self) -> int | None:
        """130/143 for the first signal received, None when none came."""
        return self.codes[0] if self.codes else None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        name, code = SIGNALS[signum]
        first = not self.codes
        self.codes.append(code)
        if first and self.request_stop is not None and (not self.only_in_training or _training(frame)):
            self.request_stop(code)
            again = "Ctrl-C" if signum == signal.SIGINT else "send it"
            _say(f"{name} received: {self.note}; {again} again to stop at once")
            return
        if first:
            raise Interrupted(name, code, "received: stopped at once (nothing in progress a checkpoint would keep)")
        raise Interrupted(name, code, "received again: stopped at once, nothing more saved")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install(handler: SignalStop) -> dict[int, Any]:
    """Make ``handler`` the SIGINT and SIGTERM handler; returns the previous ones (for :func:`restore`).

    A signal this process was started with ignored stays ignored (as Python leaves SIGINT
    alone then: a background job of a shell script must survive the script's Ctrl-C). Does
    nothing outside the main thread (Python delivers signals to the main thread only).
    """
    if not _main_thread():
        return {}
    return {
        signum: signal.signal(signum, handler) for signum in SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN
    }


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced."""
    for signum, old in previous.items():
        signal.signal(signum, old if old is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- threads


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads() -> int:
    """What ``threads=auto`` means here (see the module docstring)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    per_node = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, available_cores() // per_node)


def resolve_threads(value: object) -> int:
    """The thread count of a validated ``threads`` value (``"auto"`` or a positive integer)."""
    return auto_threads() if str(value).strip().lower() == "auto" else int(str(value))


def load_average() -> float:
    """The machine's 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def speed_conditions(load_before: float) -> dict[str, Any]:
    """``report.json`` fields saying whether speed figures just measured can be trusted.

    They cannot when the load average (before or after the measurement) exceeds the cores
    this run may use (its threads, or the machine's cores when it uses fewer): the run's own
    threads count in the load, so a one-thread run on an idle 2-core machine reads ~1.2 and is
    fine, while at 2.5 another process competes for its core. A multi-threaded step then waits
    for the scheduler. Prints a warning in that case.

    Args:
        load_before: :func:`load_average` taken before the measurement.

    Returns:
        ``{"load_average": [before, after], "speed_reliable": bool}``.
    """
    import torch

    threads, after = torch.get_num_threads(), load_average()
    load = max(load_before, after)
    limit = max(threads, available_cores())
    reliable = load <= limit
    if not reliable:
        from qtrain.console import warn

        warn(
            f"load average {load:.2f} exceeds the {limit} core{'s' if limit > 1 else ''} this run can use "
            f"(threads={threads}): other processes compete for the CPU, so the speed figures below are "
            f"unreliable. For stable numbers run on an otherwise idle machine, or pin a single-threaded "
            f"run to a free core (taskset -c N qtrain ... threads=1)"
        )
    return {"load_average": [round(load_before, 2), round(after, 2)], "speed_reliable": reliable}


WAIT_POLICY = "OMP_WAIT_POLICY"


def openmp_wait_policy() -> str | None:
    """On an overloaded machine, make idle OpenMP threads sleep rather than spin; call before importing torch.

    By default an OpenMP thread that finishes its share of a parallel region spins for a
    while waiting for the next one. With every core busy, the spinning threads take the CPU
    from the threads that still have work, and each parallel region waits for the scheduler:
    measured on a 2-core machine at load average 4-9, two threads trained a tiny model 4-7x
    slower and decoded an int4 one 5-15x slower (median) than with ``OMP_WAIT_POLICY=passive``.
    On a nearly idle machine (load 1.2-1.7) spinning was 2-3x faster. So when the 1-minute
    load average exceeds the cores this process may use and the user has not set
    ``OMP_WAIT_POLICY``, it is set to ``passive`` for this process (libgomp reads it when it
    is loaded: PyTorch's at ``import torch``, qtrain's kernels' at their first use); otherwise
    OpenMP's default stays. Results do not depend on it, only speed.

    Returns:
        A note saying what was set and why, or None when nothing was changed.
    """
    if WAIT_POLICY in os.environ:
        return None
    load, cores = load_average(), available_cores()
    if load <= cores:
        return None
    os.environ[WAIT_POLICY] = "passive"
    return (
        f"load average {load:.2f} on {cores} core{'s' if cores > 1 else ''}: {WAIT_POLICY}=passive "
        f"(idle OpenMP threads sleep instead of spinning; set {WAIT_POLICY} yourself to choose)"
    )
