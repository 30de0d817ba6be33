"""Versioned, verified, atomically published checkpoints.

A checkpoint is a directory ``step_NNNNNNN/`` holding ``model.safetensors``,
``trainer.safetensors`` + ``trainer.json`` and, written last, ``manifest.json`` with the
format version, versions, step, resolved config, model shape, quantization scheme per layer
(format 2; `quant` is null for a full-precision model), and the size and SHA-256 of every
file, sealed (format 3) by ``manifest_sha256``, the SHA-256 of the canonical manifest without
that entry. Nothing is pickled and nothing is ever unpickled: only safetensors and JSON
files listed in the manifest are accepted; operating-system strays (``.DS_Store``,
``Thumbs.db``, ``._*``, ``desktop.ini``) are ignored with a warning, anything else in the
directory is refused.

Loading (and ``verify``, through the same `verify_checkpoint`) reads the manifest, refuses
newer formats, checks the seal before trusting any entry, runs ``migrate_vN_to_vN1`` steps
in order, validates every manifest value, checks the directory name against the step,
verifies sizes and hashes, checks safetensors headers (lengths, dtypes, shapes, offsets),
compares the stored shapes and dtypes with the model the manifest describes built on the
meta device, range-checks quantization parameters and validates the trainer state, all
before any tensor is read. Writing goes to a temporary sibling directory,
fsyncs every file and the directory, renames it into place, then replaces ``latest``
atomically; pruning happens only after that.

Example:
    >>> path = save_checkpoint(run_dir / "checkpoints", 100, payload, keep=3)
    >>> ckpt = load_checkpoint(path)          # verified, migrated
    >>> model = build_model(ckpt, torch.device("cpu"))  # GPT with ckpt.model_state loaded

Modules, each depending only on those before it: ``format`` (names, limits, dtypes, payload
types, the seal), ``write`` (fsynced files, atomic directories), ``schema`` (manifest
values), ``manifest`` (read, unseal, migrate), ``consistency`` (tensors vs the described
model, meta device), ``trainer_state``, ``load`` (verify, load, build the model), ``find``
(step dirs, newest valid), ``save`` (publish, ``latest``, retention), ``upgrade``. Their
public names are all available here. The manifest's ``quant`` section is stored as the run
wrote it; what it means (rebuilding the model it describes, comparing schemes, labels) is
asked of :class:`qtrain.quant.recipe.QuantRecipe`.
"""

from qtrain.checkpoint.consistency import build_skeleton, param_group_shapes  # noqa: F401
from qtrain.checkpoint.find import *  # noqa: F403
from qtrain.checkpoint.format import *  # noqa: F403
from qtrain.checkpoint.load import *  # noqa: F403
from qtrain.checkpoint.manifest import *  # noqa: F403
from qtrain.checkpoint.save import *  # noqa: F403
from qtrain.checkpoint.trainer_state import validate_trainer_state  # noqa: F401
from qtrain.checkpoint.upgrade import *  # noqa: F403
from qtrain.checkpoint.write import *  # noqa: F403
