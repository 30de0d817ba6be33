"""The one rich console all qtrain output goes through, rank-aware printing, and plain logging.

Off a terminal (pipes, CI, log files) the consoles are :data:`PIPE_WIDTH` columns wide, so
rich never wraps a line or a table cell at its default 80 columns: paths stay on one line
and a log can be searched and parsed. qtrain's own messages are plain text: markup in a
message (``[plot]``, a sweep directory such as ``0_hooks=[...]``) is printed as written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import IO

from rich.console import Console, ConsoleDimensions
from rich.segment import Segment
from rich.text import Text

PIPE_WIDTH = 4096
"""Columns of a console that does not write to a terminal: wide enough that nothing wraps."""
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 control characters but newline and tab (``\\x9b`` is a CSI on some terminals), and the
Unicode direction marks and overrides that make a terminal show text in another order."""


def printable(text: str) -> str:
    """`text` with control characters other than newline and tab shown escaped (``\\x1b``, ``\\u202e``).

    Paths, checkpoint text, config values and generated text go through this before reaching
    the terminal, so none of them can move the cursor, recolour, retitle or clear the screen.
    """
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object, style: str = "") -> Text:
    """`value` as rich text that is never read as markup, control characters escaped.

    Use it for table cells and titles and anything else a Table or print would parse
    (``[/x]`` in a path is text, not a closing tag).
    """
    return Text(printable(str(value)), style=style)


def labelled(label: str, style: str, msg: str) -> Text:
    """``label: msg`` with the label styled and `msg` plain text (escaped, never markup)."""
    return Text.assemble((f"{label}:", style), " ", printable(msg))


def is_tty(file: IO[str]) -> bool:
    """Whether `file` is an interactive terminal (FORCE_COLOR and the like do not count)."""
    isatty = getattr(getattr(file, "rich_proxied_file", file), "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed file (end of a pytest run)
        return False


class QConsole(Console):
    """A rich Console that does not wrap at 80 columns off a terminal, and never writes a control
    character it was given as text (see :meth:`_render_buffer`)."""

    @property
    def size(self) -> ConsoleDimensions:
        """rich's size, but :data:`PIPE_WIDTH` columns when not writing to a terminal."""
        size = super().size
        if self._width is None and not is_tty(self.file):
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        """rich's rendering, with control characters in text escaped (a net under every print site).

        rich's own cursor movement (``Live``) comes as control segments and is left alone.
        """
        return super()._render_buffer(s if s.control else Segment(printable(s.text), s.style) for s in buffer)


console = QConsole(highlight=False, soft_wrap=True)
err_console = QConsole(stderr=True, highlight=False, soft_wrap=True)


def rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def info(msg: str) -> None:
    """Print a line on rank 0 only (plain text: brackets are printed as written)."""
    if rank() == 0:
        console.print(printable(msg), markup=False)


def warn(msg: str) -> None:
    """Print a warning on rank 0 only (stderr)."""
    if rank() == 0:
        err_console.print(labelled("warning", "yellow", msg))


def error(msg: str, label: str = "error") -> None:
    """Print ``error: msg`` (or ``stopped: msg``) on stderr, on every rank: `msg` is plain text.

    Every message that can hold a path, a config value or checkpoint text goes through here,
    so none of it is read as markup (``[/x]`` cannot crash the printer) or reaches the
    terminal as a control sequence.
    """
    err_console.print(labelled(label, "bold red", msg))


class _PlainHandler(logging.Handler):
    """Prints qtrain's `logging` records as plain lines on stderr (rank 0): no Hydra prefix."""

    def emit(self, record: logging.LogRecord) -> None:
        if rank() != 0:
            return
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not stop a run
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            err_console.print(labelled("warning", "yellow", msg))
        else:
            err_console.print(Text(f"note: {printable(msg)}", style="dim"))


@contextlib.contextmanager
def plain_logging(level: int = logging.INFO) -> Iterator[None]:
    """While active, the `qtrain` loggers print plain lines instead of going to the root logger.

    Hydra's default `hydra_logging` config puts a ``[date][HYDRA]`` handler on the root
    logger; qtrain's own records (``qtrain.*``) would come out with that tag. Inside this
    context they stop at their own handler; outside it they propagate as usual (pytest's
    ``caplog`` and library users see them).
    """
    logger = logging.getLogger("qtrain")
    handler = _PlainHandler()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
