"""Versioned, verified, atomically published checkpoints.

A checkpoint is a directory ``step_NNNNNNN/`` holding ``model.safetensors``,
``trainer.safetensors`` + ``trainer.json`` and, written last, ``manifest.json`` with the
format version, versions, step, resolved config, model shape, quantization scheme per layer
(format 2; `quant` is null for a full-precision model), and the size and SHA-256 of every
file. Nothing is pickled and nothing is ever unpickled: only safetensors and JSON files
listed in the manifest are accepted, anything else in the directory is refused.

Loading reads the manifest, refuses newer formats, runs ``migrate_vN_to_vN1`` steps in
order, verifies sizes and hashes, and checks safetensors headers (lengths, dtypes, shapes,
offsets) before any tensor is allocated. Writing goes to a temporary sibling directory,
fsyncs every file and the directory, renames it into place, then replaces ``latest``
atomically; pruning happens only after that.

Example:
    >>> path = save_checkpoint(run_dir / "checkpoints", 100, payload, keep=3)
    >>> ckpt = load_checkpoint(path)          # verified, migrated
    >>> model = build_model(ckpt)             # GPT with ckpt.model_state loaded

Modules, each depending only on those before it: ``format`` (names, limits, dtypes, payload
types), ``write`` (fsynced files, atomic directories), ``load`` (verify, migrate, load),
``find`` (step dirs, newest valid), ``save`` (publish, ``latest``, retention), ``schemes``
(quantization in manifests), ``upgrade``. Their public names are all available here.
"""

from qtrain.checkpoint.find import *  # noqa: F403
from qtrain.checkpoint.format import *  # noqa: F403
from qtrain.checkpoint.load import *  # noqa: F403
from qtrain.checkpoint.save import *  # noqa: F403
from qtrain.checkpoint.schemes import *  # noqa: F403
from qtrain.checkpoint.upgrade import *  # noqa: F403
from qtrain.checkpoint.write import *  # noqa: F403
