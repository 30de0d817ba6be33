"""`mode=export`: write a checkpoint (or an imported model) in another tool's format, into a new `out`.

Example:
    $ qtrain mode=export export.format=hf init_from=outputs/DATE/TIME out=exported/llama-int4
    $ qtrain mode=export export.format=gguf init_from=outputs/DATE/TIME out=model.gguf

Formats: `hf` (`qtrain.export.hf.write_hf`), `gguf` (`qtrain.export.gguf.write_gguf`),
`compressed-tensors` (`qtrain.export.compressed.write_compressed`); each writer is imported
only when asked for. The output is written to a temporary sibling and renamed into place;
an existing `out` is refused (exit 2) before anything is loaded.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtrain import rundir
from qtrain.config import EXPORT_FLOAT_TYPES, EXPORT_FORMATS
from qtrain.console import info, warn
from qtrain.errors import ConfigError
from qtrain.modes.context import RunContext, announce
from qtrain.modes.loading import HF_PREFIX, load_init
from qtrain.tokenizer import byte_tokenizer

WRITERS = {
    "hf": ("qtrain.export.hf", "write_hf"),
    "gguf": ("qtrain.export.gguf", "write_gguf"),
    "compressed-tensors": ("qtrain.export.compressed", "write_compressed"),
}
"""export.format -> (module, function): `fn(model, manifest, tokenizer, path, float_type) -> report`."""


def writer_for(fmt: str) -> Callable[..., dict[str, Any]]:
    """The writer of `export.format` (imported now).

    Raises:
        ConfigError: an unknown format, or one whose writer this installation lacks.
    """
    if fmt not in WRITERS:
        raise ConfigError(f"export.format: '{fmt}' is not one of {list(EXPORT_FORMATS)}")
    module, name = WRITERS[fmt]
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ConfigError(f"export.format={fmt} is not available yet in this qtrain") from None
    return fn  # type: ignore[no-any-return]


def check_out(ctx: RunContext) -> Path:
    """`out`: set, new, not under a file, not inside the source.

    Raises:
        ConfigError: naming `out` and why.
    """
    if not ctx.cfg.out:
        raise ConfigError("out: mode=export needs out=PATH (a new directory or file)")
    out = Path(str(ctx.cfg.out)).expanduser()
    if out.exists() or out.is_symlink():
        raise ConfigError(f"out: {out} already exists; export writes a new one and never overwrites")
    rundir.check_ancestors(out.parent, "out: ")
    src = Path(str(ctx.cfg.init_from).removeprefix(HF_PREFIX)).expanduser().resolve()
    if src.is_dir() and (src == out.resolve() or src in out.resolve().parents):
        raise ConfigError(f"out: {out} is inside the source {src}; choose a place outside it")
    return out


def run_export(ctx: RunContext) -> dict[str, Any]:
    """mode=export: load `init_from` (checkpoint, run dir or hf:DIR) and write it as `export.format` to `out`.

    Raises:
        ConfigError: bad format, float type or `out` (all before loading).
        CheckpointError: the source is refused.
    """
    cfg = ctx.cfg
    if cfg.export.float_type not in EXPORT_FLOAT_TYPES:
        raise ConfigError(f"export.float_type: '{cfg.export.float_type}' is not one of {list(EXPORT_FLOAT_TYPES)}")
    write = writer_for(cfg.export.format)
    out = check_out(ctx)
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    model.eval()
    tokenizer = ctx.tokenizer or byte_tokenizer()
    result = write(model, ckpt.manifest, tokenizer, out, cfg.export.float_type)
    if result.get("dequantized_from"):
        warn(
            f"export: {ckpt.path} is quantized ({result['dequantized_from']}); {out} holds its dequantized "
            f"weights in {cfg.export.float_type} (the values the codes and scales compute)"
        )
    info(f"exported {ckpt.path} as {cfg.export.format} -> {out}")
    return {
        "mode": "export",
        "checkpoint": str(ckpt.path),
        "export": result,
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }
