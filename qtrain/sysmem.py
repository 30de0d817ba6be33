"""How much memory this process may use: cgroup limits, /proc/meminfo, RLIMIT_AS (standard library only).

The answer is the process's resident size now plus the smallest headroom among:

- the cgroup it runs in (v2 ``memory.max`` minus ``memory.current``, v1 ``memory.limit_in_bytes``
  minus ``memory.usage_in_bytes``, for its own cgroup and every parent up to the mount), with
  the reclaimable page cache (``inactive_file``) not counted as used;
- the machine: ``MemAvailable`` from /proc/meminfo (physical memory where that is missing);
- the address-space limit (``ulimit -v``): the limit minus the process's virtual size.

Example:
    >>> avail = available_memory()
    >>> avail.bytes, avail.source
    (23700623360, 'MemAvailable in /proc/meminfo')
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 2**60
"""cgroup v1 reports "no limit" as a number near 2^63; anything from here up means none."""


@dataclass(frozen=True)
class Available:
    """Memory the process may use in all (resident now included) and what bounds it."""

    bytes: int
    source: str


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def current_rss(proc: Path = Path("/proc")) -> int:
    """Resident bytes of this process now (peak resident size where /proc is missing)."""
    fields = (_read(proc / "self" / "statm") or "").split()
    if len(fields) > 1 and fields[1].isdigit():
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _meminfo(proc: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(proc / "meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    return out


def machine_headroom(proc: Path = Path("/proc")) -> tuple[int, str]:
    """``MemAvailable`` (else physical memory) and where it came from."""
    info = _meminfo(proc)
    if "MemAvailable" in info:
        return info["MemAvailable"], f"MemAvailable in {proc / 'meminfo'}"
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return pages * os.sysconf("SC_PAGE_SIZE"), "physical memory"


def _mounts(proc: Path) -> list[tuple[str, Path, str, str]]:
    """(root, mount point, filesystem type, super options) of each cgroup mount."""
    out = []
    for line in (_read(proc / "self" / "mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((fields[3], Path(fields[4]), tail[0], tail[2]))
    return out


def _cgroup_dirs(proc: Path) -> list[tuple[str, Path, Path]]:
    """(version, the process's cgroup directory, mount point) for the memory controller."""
    found = []
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        v2 = hid == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        for root, mount, fstype, opts in _mounts(proc):
            if (fstype == "cgroup2") != v2 or (not v2 and "memory" not in opts.split(",")):
                continue
            rel = os.path.relpath(path, root) if path.startswith(root) else "."
            here = (mount / rel).resolve() if rel != "." else mount
            found.append(("v2" if v2 else "v1", here if here.is_dir() else mount, mount))
    return found


def _cgroup_level(version: str, d: Path) -> tuple[int, str] | None:
    names = ("memory.max", "memory.current", "inactive_file")
    if version == "v1":
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    limit = _int(_read(d / names[0]))
    if limit is None or limit >= UNLIMITED:  # "max", unreadable or no limit
        return None
    used = _int(_read(d / names[1])) or 0
    stat = dict(line.split(" ", 1) for line in (_read(d / "memory.stat") or "").splitlines() if " " in line)
    used -= min(used, _int(stat.get(names[2])) or 0)
    return max(0, limit - used), f"cgroup {version} {d / names[0]} = {limit:,} bytes"


def cgroup_headroom(proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """The smallest (limit - usage) of the process's memory cgroup and its parents, or None."""
    best: tuple[int, str] | None = None
    for version, d, mount in _cgroup_dirs(proc):
        while True:
            level = _cgroup_level(version, d)
            if level is not None and (best is None or level[0] < best[0]):
                best = level
            if d == mount or mount not in d.parents:
                break
            d = d.parent
    return best


def rlimit_headroom(proc: Path = Path("/proc")) -> tuple[int, str] | None:
    """Address space left under ``ulimit -v`` (RLIMIT_AS), or None without one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    fields = (_read(proc / "self" / "statm") or "").split()
    size = int(fields[0]) * os.sysconf("SC_PAGE_SIZE") if fields and fields[0].isdigit() else 0
    return max(0, soft - size), f"ulimit -v (RLIMIT_AS) = {soft:,} bytes"


def available_memory(proc: Path = Path("/proc")) -> Available:
    """What this process may use in all: resident now plus the smallest headroom (see module doc)."""
    options = [machine_headroom(proc), cgroup_headroom(proc), rlimit_headroom(proc)]
    headroom, source = min((o for o in options if o is not None), key=lambda o: o[0])
    return Available(current_rss(proc) + headroom, source)
