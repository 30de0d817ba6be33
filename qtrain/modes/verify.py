"""`mode=verify`: check a checkpoint, or every checkpoint of a run dir, as loading would; exit 3 if any is bad.

Example:
    $ qtrain mode=verify init_from=outputs/2025-01-01/12-00-00            # every checkpoint of a run
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtrain import checkpoint as ck
from qtrain.errors import CheckpointError
from qtrain.modes.context import RunContext
from qtrain.modes.verified import (
    Verified,
    checkpoint_dirs,
    checkpoint_report,
    files_table,
    layers_table,
    show,
    status_table,
    verify_full,
)


def run_verify(ctx: RunContext) -> dict[str, Any]:
    """mode=verify: check `init_from` (a checkpoint, or every checkpoint of a run dir); exit 3 if any is bad.

    Raises:
        ConfigError: `init_from` does not exist or holds no checkpoint.
        CheckpointError: a checkpoint fails a check (all failures listed).
    """
    target = Path(str(ctx.cfg.init_from)).expanduser()
    dirs = checkpoint_dirs(target)
    good: list[Verified] = []
    bad: list[tuple[Path, str]] = []
    statuses: list[tuple[Path, str]] = []
    for d in dirs:
        try:
            good.append(verify_full(d))
            statuses.append((d, "ok"))
        except CheckpointError as err:
            bad.append((d, str(err)))
            statuses.append((d, str(err)))
    temps = ck.temp_entries(dirs[0].parent) if len(dirs) > 1 or dirs[0] != target else []
    statuses += [
        (t, "temporary leftover of an interrupted save (ignored by resume, removed by the next save)") for t in temps
    ]
    if good:
        newest = good[-1]
        show(layers_table(newest.manifest.get("quant")), files_table(newest))
    if len(statuses) > 1:
        show(status_table(statuses))
    if bad:
        listed = "\n  - ".join(f"{why}" for _, why in bad)
        raise CheckpointError(f"verify: {len(bad)} of {len(dirs)} checkpoint(s) refused:\n  - {listed}")
    return checkpoint_report(ctx, good[-1], verified=len(good), ok=True)
