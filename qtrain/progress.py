"""Progress output: a live display on a terminal, plain lines everywhere else.

On an interactive terminal (rank 0) one rich ``Live`` display shows the training line
(step / max steps, loss, learning rate, tokens/s, last validation loss, elapsed and ETA)
and a transient bar for each long phase running inside it (evaluation windows, GPTQ
layers, the decode benchmark). It refreshes 4 times a second from its own thread, so the
training loop only stores numbers; when training ends it leaves one clean final line.

Off a terminal (CI, pipes, log files) training prints one plain line every
``train.log_every`` steps and at the last step, built by the pure
:func:`format_train_line`; a phase prints nothing unless it runs longer than
:data:`PLAIN_FIRST_AFTER_S`, then a line every :data:`PLAIN_EVERY_S` and one when done.

Example:
    >>> trainer.fit(TrainProgress())
    >>> with phase("GPTQ", total=len(layers), unit="layers") as bar:
    ...     for name in layers:
    ...         quantize(name)
    ...         bar.advance()
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from qtrain.console import console, is_tty, printable, rank

REFRESH_HZ = 4
"""Live display refreshes per second (rendering runs in rich's thread, not the loop)."""
PLAIN_FIRST_AFTER_S = 5.0
"""Off a terminal, a phase's first plain line comes only once it has run this long."""
PLAIN_EVERY_S = 30.0
"""Off a terminal, a long phase prints at most one line per this many seconds."""


# ---------------------------------------------------------------- pure formatting


def format_duration(seconds: float | None) -> str:
    """``8.3s``, ``4m05s``, ``2h03m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class TrainStats:
    """One moment of a training run, as the progress line shows it."""

    step: int
    max_steps: int
    loss: float | None
    lr: float | None
    tokens_per_s: float | None
    val_loss: float | None
    elapsed_s: float
    eta_s: float | None


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_train_line(s: TrainStats) -> str:
    """The one plain progress line: every field, space-separated, never longer than one line.

    Example:
        >>> format_train_line(TrainStats(20, 200, 3.9543, 3e-3, 9874.0, None, 8.3, 72.0))
        'step 20/200  loss 3.9543  lr 3.00e-03  9,874 tok/s  val_loss -  elapsed 8.3s  eta 1m12s'
    """
    return (
        f"step {s.step}/{s.max_steps}  loss {_num(s.loss, '.4f')}  lr {_num(s.lr, '.2e')}  "
        f"{_num(s.tokens_per_s, ',.0f')} tok/s  val_loss {_num(s.val_loss, '.4f')}  "
        f"elapsed {format_duration(s.elapsed_s)}  eta {format_duration(s.eta_s)}"
    )


def format_banner(fields: dict[str, Any]) -> str:
    """What is about to run, on one line: ``qtrain MODE | key value | ...`` (None values dropped).

    Example:
        >>> format_banner({"mode": "train", "model": "tiny (246,240 params)", "run dir": "/tmp/r"})
        'qtrain train | model tiny (246,240 params) | run dir /tmp/r'
    """
    parts = [f"qtrain {fields.get('mode', '')}".rstrip()]
    parts += [f"{k} {v}" for k, v in fields.items() if k != "mode" and v is not None and v != ""]
    return " | ".join(parts)


def banner(fields: dict[str, Any]) -> None:
    """Print the run's first line (rank 0): see :func:`format_banner`."""
    if rank() == 0:  # wrapped at words on a terminal; off one the console is too wide to wrap
        console.print(Text(printable(format_banner(fields)), style="bold"), soft_wrap=False)


# ---------------------------------------------------------------- the live display


class Hub:
    """The one live display of a console: a training line plus the phases running inside it.

    Entering starts rich's ``Live`` (only on an interactive terminal, rank 0); leaving the
    last user stops it. Off a terminal the hub only tells phases whether training owns the
    output (then they stay quiet: the training line carries the validation loss).
    """

    def __init__(self, out: Console, interactive: bool | None = None) -> None:
        self.console = out
        self._interactive = interactive
        self.live: Live | None = None
        self.users = 0
        self.training: TrainProgress | None = None
        self.bars = Progress(
            TextColumn("  {task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            console=out,
        )

    @property
    def interactive(self) -> bool:
        """Live display (terminal, rank 0) rather than plain lines."""
        if self._interactive is not None:
            return self._interactive
        out = self.console
        return rank() == 0 and is_tty(out.file) and out.is_terminal and not out.is_dumb_terminal

    def render(self) -> RenderableType:
        """The current display: phase bars above the training line."""
        parts: list[RenderableType] = []
        if self.bars.tasks:
            parts.append(self.bars)
        if self.training is not None:
            parts.append(self.training.renderable())
        return Group(*parts)

    def enter(self) -> None:
        """One more user; starts the live display when the first arrives (terminal only)."""
        self.users += 1
        if self.users == 1 and self.interactive:
            self.live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=REFRESH_HZ,
                transient=True,
            )
            self.live.start()

    def exit(self) -> None:
        """One user fewer; the last one stops (and clears) the live display."""
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.live is not None:
            live, self.live = self.live, None
            live.stop()


hub = Hub(console)
"""The display of qtrain's stdout console."""


# ---------------------------------------------------------------- phases


class Phase:
    """A long non-training phase: a transient bar on a terminal, rare plain lines elsewhere."""

    def __init__(self, owner: Hub, description: str, total: int, unit: str) -> None:
        self.hub, self.description, self.total, self.unit = owner, description, total, unit
        self.done = 0
        self.note = ""
        self.t0 = self.last_line = time.perf_counter()
        self.lines = 0
        self.task: TaskID | None = None
        self.quiet = rank() != 0 or (owner.training is not None and not owner.interactive)

    def __enter__(self) -> Phase:
        self.hub.enter()
        if self.hub.live is not None:
            self.task = self.hub.bars.add_task(self.description, total=self.total, unit=self.unit)
        return self

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count `n` more units done; `note` says where the phase is (``block 3/12``)."""
        self.done += n
        if note is not None:
            self.note = note
        if self.task is not None:
            label = f"{self.description} ({self.note})" if self.note else self.description
            self.hub.bars.update(self.task, completed=self.done, description=label)
        elif not self.quiet:
            now = time.perf_counter()
            wait = PLAIN_EVERY_S if self.lines else PLAIN_FIRST_AFTER_S
            if now - self.last_line >= wait and self.done < self.total:
                where = f" ({self.note})" if self.note else ""
                self._line(f"{self.done}/{self.total} {self.unit}{where}, {format_duration(now - self.t0)}")
                self.last_line = now

    def _line(self, text: str) -> None:
        self.lines += 1
        self.hub.console.print(f"{self.description}: {text}", markup=False)

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.hub.bars.remove_task(self.task)
        self.hub.exit()
        if self.lines and exc[0] is None:  # it said it was running: say it finished
            elapsed = format_duration(time.perf_counter() - self.t0)
            self._line(f"done, {self.done}/{self.total} {self.unit} in {elapsed}")


def phase(description: str, total: int, unit: str = "", owner: Hub | None = None) -> Phase:
    """A context manager showing the progress of a long non-training phase (see :class:`Phase`)."""
    return Phase(owner or hub, description, total, unit)


# ---------------------------------------------------------------- training


class TrainProgress:
    """Progress of one training loop: `Trainer.fit` calls :meth:`start`, :meth:`update`, :meth:`close`.

    Args:
        compiling: the model is compiled on its first steps (``torch.compile``): say so while
            they run.
        owner: the display to use (default: qtrain's console).
    """

    def __init__(self, compiling: bool = False, owner: Hub | None = None) -> None:
        self.hub = owner or hub
        self.compiling = compiling
        self.max_steps = self.log_every = self.tokens_per_step = 0
        self.start_step = self.step = self.printed_step = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.val_loss: float | None = None
        self.t0 = self.t_first = 0.0
        self.recent: deque[float] = deque(maxlen=1)
        self.active = False
        self.live = False

    def start(self, step: int, max_steps: int, tokens_per_step: int, log_every: int) -> None:
        """The loop begins at `step` (more than 0 when resumed)."""
        self.max_steps, self.tokens_per_step, self.log_every = max_steps, tokens_per_step, max(1, log_every)
        self.start_step = self.step = self.printed_step = step
        self.recent = deque(maxlen=self.log_every)
        self.t0 = self.t_first = time.perf_counter()
        self.active = rank() == 0
        if not self.active:
            return
        self.hub.training = self
        self.hub.enter()
        self.live = self.hub.live is not None
        if self.compiling and not self.live:
            self.hub.console.print("compiling the model (torch.compile): the first steps are slow", markup=False)

    def update(self, step: int, loss: float, lr: float, val_loss: float | None, step_s: float) -> None:
        """Step `step` finished in `step_s` seconds of training (evaluation excluded)."""
        if step == self.start_step + 1:
            self.t_first = time.perf_counter()  # the ETA leaves out the first (warm-up, compile) step
        self.step, self.loss, self.lr, self.val_loss = step, loss, lr, val_loss
        self.recent.append(step_s)
        if self.active and not self.live and (step % self.log_every == 0 or step == self.max_steps):
            self._print()

    def stats(self) -> TrainStats:
        """The numbers shown now."""
        now = time.perf_counter()
        recent = tuple(self.recent)  # one snapshot: the display thread reads while the loop appends
        rate = self.tokens_per_step * len(recent) / sum(recent) if sum(recent) > 0 else None
        done_after_first = self.step - self.start_step - 1
        eta: float | None = None
        if self.step >= self.max_steps:
            eta = 0.0
        elif done_after_first > 0:
            eta = (now - self.t_first) / done_after_first * (self.max_steps - self.step)
        return TrainStats(self.step, self.max_steps, self.loss, self.lr, rate, self.val_loss, now - self.t0, eta)

    def renderable(self) -> RenderableType:
        """The live training line: a bar, then the same fields as the plain line."""
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        text = format_train_line(self.stats())
        if self.compiling and self.step == self.start_step:
            text += "  (compiling the model: the first steps are slow)"
        grid.add_row(ProgressBar(total=max(1, self.max_steps), completed=self.step, width=30), Text(text))
        return grid

    def _print(self) -> None:
        self.printed_step = self.step
        self.hub.console.print(format_train_line(self.stats()), markup=False)

    def close(self) -> None:
        """The loop ended (finished, stopped or failed): stop the display, leave a final line."""
        if not self.active:
            return
        self.active = False
        self.hub.training = None
        self.hub.exit()
        if self.step > self.start_step and (self.live or self.printed_step != self.step):
            self._print()
