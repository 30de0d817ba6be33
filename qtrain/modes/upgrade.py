"""`mode=upgrade`: a copy of a checkpoint migrated to the current format, in a new directory.

The copy is written atomically and verified; the original is never touched.

Example:
    $ qtrain mode=upgrade init_from=old/step_0000500 out=upgraded/step_0000500
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtrain import checkpoint as ck
from qtrain.console import console, plain, rank
from qtrain.modes.context import RunContext
from qtrain.modes.verified import checkpoint_report, files_table, layers_table, show, verify_full


def run_upgrade(ctx: RunContext) -> dict[str, Any]:
    """mode=upgrade: write a copy of `init_from` migrated to the current format into the new directory `out`.

    Raises:
        ConfigError: `out` exists and is not empty, or lies inside the source; bad `init_from`.
        CheckpointError: the source fails verification.
    """
    out = Path(str(ctx.cfg.out)).expanduser()
    src = Path(str(ctx.cfg.init_from)).expanduser()
    if src.exists():
        ck.check_upgrade_target(src, out)  # before reading anything
    src = ck.resolve_checkpoint(src)
    ck.check_upgrade_target(src, out)
    before = ck.read_manifest(src).get("migrated_from", ck.FORMAT_VERSION)
    ck.upgrade_checkpoint(src, out)
    v = verify_full(out)
    show(layers_table(v.manifest.get("quant")), files_table(v))
    if rank() == 0:
        console.print(
            plain(
                f"upgraded {src} (format_version {before}) -> {out} (format_version {ck.FORMAT_VERSION}); "
                f"the original is unchanged"
            )
        )
    return checkpoint_report(ctx, v, source=str(src), source_format_version=before, ok=True)
