"""Small facts about files and processes, for messages and stale-lock checks (standard library only).

The lowest layer: imported by corpus reading, run-directory writes, the run lock and the
checkpoint package alike, so each says "a FIFO" or "a dead process" the same way.
"""

from __future__ import annotations

import os
import stat


def file_kind(mode: int) -> str:
    """What a file is, from its `st_mode`, as a message fragment ("a FIFO", "a directory", ...)."""
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
