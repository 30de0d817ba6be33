"""User-facing errors, each carrying its exit code (DESIGN.md section 6)."""

from __future__ import annotations

EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_RESOURCES = 0, 1, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
"""128 + the signal number, what a shell reports for a process ended by that signal."""


class QtrainError(Exception):
    """Base of the errors a user can cause; the CLI prints the message, no traceback."""

    exit_code = EXIT_BUG


class ConfigError(QtrainError):
    """Bad config or usage (exit 2)."""

    exit_code = EXIT_CONFIG


class CheckpointError(QtrainError):
    """A checkpoint refused: corrupt, truncated, hash mismatch, unknown format, unsafe (exit 3)."""

    exit_code = EXIT_CHECKPOINT


class NonFiniteError(QtrainError):
    """Non-finite loss or gradient; training stopped before the optimizer step (exit 4)."""

    exit_code = EXIT_NONFINITE

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"non-finite training at step {step}: loss={loss}, grad_norm={grad_norm}")


class ResourceError(QtrainError):
    """Out of memory or disk (exit 5)."""

    exit_code = EXIT_RESOURCES


class Preempted(QtrainError):
    """SIGTERM (or SIGINT) received while training; a checkpoint was saved (exit 143; the CLI
    reports 130 when the signal was SIGINT)."""

    exit_code = EXIT_SIGTERM


class Interrupted(BaseException):
    """A signal that ends the run at once: a first SIGINT/SIGTERM outside training, or a second one.

    A ``BaseException`` (like ``KeyboardInterrupt``), so no ``except Exception`` between the
    signal handler and the CLI swallows it. Nothing is saved; the CLI prints one line and
    exits with :attr:`exit_code` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signame: str, exit_code: int, why: str) -> None:
        self.signame, self.exit_code = signame, exit_code
        super().__init__(f"{signame} {why}")
