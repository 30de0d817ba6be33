"""Short, filesystem-safe names for multirun job directories (`hydra.sweep.subdir`).

A job directory is named ``<job number>_<summary>``: the job's overrides in the order they
were typed, ``key=value`` written ``key-value`` and joined with ``+``
(``3_mode-qat+quant-int4+quant.group_size-32``). Only ``[A-Za-z0-9._+-]`` is used, so a
job directory pasted into ``qtrain mode=report 'runs=[DIR]'`` parses as the same path, and
no name reaches the filesystem's 255-byte limit. Where the summary had to lose something
(cut past :data:`MAX_SUMMARY` characters, a hook list shown by its class names, a value
with other characters), its last item is ``sha-`` and 8 hex digits of the SHA-256 of the
job's full overrides (``3_mode-qat+quant-int4+hooks-SQNRLogger+sha-1a2b3c4d``). The full
overrides stay in the job's ``status.json`` and ``.hydra/overrides.yaml``.

The function is registered as the OmegaConf resolver ``qtrain_jobdir`` when this module is
imported (``qtrain.config`` imports it) and used by ``conf/config.yaml``::

    subdir: ${qtrain_jobdir:${hydra.job.num},${hydra.overrides.task},${hydra.job.config.override_dirname.exclude_keys}}

Example:
    >>> job_dir_name(3, ["mode=qat", "quant=int4", "quant.group_size=32"])
    '3_mode-qat+quant-int4+quant.group_size-32'
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

RESOLVER = "qtrain_jobdir"
MAX_SUMMARY = 64
"""Characters of the override summary (after ``N_``), hash included."""
HASH_CHARS = 8
HASH_ITEM = "sha-"
"""The summary's last item when it is not the whole story: ``sha-`` + 8 hex digits."""
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
TARGET = re.compile(r"_target_\s*[:=]\s*['\"]?([\w.]+)")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(value: str) -> tuple[str, bool]:
    """(safe text, lossy) of one override's value; hook lists become their class names."""
    targets = TARGET.findall(value)
    if targets:
        return ".".join(t.rsplit(".", 1)[-1] for t in targets), True
    safe = UNSAFE.sub("_", value).strip("_")
    return safe, safe != value


def _item(override: str) -> tuple[str, bool]:
    raw_key, sep, value = override.partition("=")
    key = raw_key.lstrip("+~")
    safe_key = UNSAFE.sub("_", key)
    if not sep:  # `~key` deletes a key
        return f"no-{safe_key}", safe_key != key
    text, lossy = _value(value)
    return f"{safe_key}-{text}", lossy or safe_key != key


def override_hash(overrides: Iterable[str]) -> str:
    """8 hex digits identifying a job's full override list."""
    return hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:HASH_CHARS]


def job_dir_name(num: Any, overrides: Iterable[Any], exclude: Iterable[Any] = ()) -> str:
    """The directory name of multirun job ``num`` with these overrides.

    Args:
        num: the Hydra job number.
        overrides: the job's overrides (``hydra.overrides.task``), as typed.
        exclude: keys left out of the summary (paths: ``init_from``, ``hydra.sweep.dir``...);
            they still count in the hash.

    Returns:
        ``N`` or ``N_summary`` (``N_summary-hash8`` when the summary is not the whole story),
        made of ``[A-Za-z0-9._+-]`` only.
    """
    every = [str(o) for o in overrides]
    skip = {str(k) for k in exclude}
    parts, lossy = [], False
    for override in every:
        key = _key(override)
        if key in skip or key.startswith("hydra."):
            continue
        text, lost = _item(override)
        parts.append(text)
        lossy = lossy or lost
    summary = "+".join(parts)
    if lossy or len(summary) > MAX_SUMMARY:
        summary = _cut(parts, MAX_SUMMARY - len(HASH_ITEM) - HASH_CHARS - 1)
        summary = "+".join(filter(None, [summary, HASH_ITEM + override_hash(every)]))
    return f"{num}_{summary}" if summary else str(num)


def _cut(parts: list[str], budget: int) -> str:
    """The leading whole items that fit in ``budget`` characters (the first one cut if it alone does not)."""
    kept: list[str] = []
    for part in parts:
        if len("+".join([*kept, part])) > budget:
            break
        kept.append(part)
    if not kept and parts:
        return parts[0][:budget].rstrip("+-_.")
    return "+".join(kept)


def register_resolver() -> None:
    """Make ``${qtrain_jobdir:...}`` resolvable (idempotent).

    Called when this module is imported (by ``qtrain.config``), so any process that loads
    qtrain's task function, such as a launcher plugin's worker, can name its job dir.
    """
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(RESOLVER, job_dir_name, replace=True)


register_resolver()
