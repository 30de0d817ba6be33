"""What each `qtrain mode=...` does: one module per mode, plus the pieces they share.

The modes layer sits above `checkpoint` and below `cli`: `cli` builds a `RunContext` and calls
`qtrain.modes.dispatch.run`, which runs the mode's function and writes report.json. A mode
module reads top to bottom as the steps it takes, and imports only the shared pieces below
it, never another layer above.

Modes: `train`, `ptq`, `qat`, `finetune`, `eval`, `generate`, `verify`, `upgrade`, `report`.

Shared pieces:

- `context`: `RunContext`, the corpus and validation every mode uses, the memory check, the first line
- `loading`: a fresh model, or the model of a checkpoint (`init_from`)
- `saving`: the one function that writes a checkpoint (and the trainer's `save_fn` built on it)
- `resume`: continuing from the run dir's checkpoints; recognising a finished result
- `resume_check`: which settings a resumed run may change, key by key (torch-free: `precheck` uses it)
- `training`: the trainer every training mode runs; how a quantized training run finishes
- `results`: the keys of report.json, what quantizing modes add, writing it
- `verified`: what `verify` and `upgrade` find in a checkpoint and how they print it
- `guards`, `memory`: the checks a mode runs before it allocates or computes; the peak-memory estimate
- `sweep_jobs`, `sweep_rows`, `sweep_plot`: what `mode=report` reads from run dirs (and `cli` writes
  there: `status.json`), its rows and its plot
- `dispatch`: the table of modes, `run`, and the run-dir checks before any work

This package's `__init__` imports nothing, so `cli` and `precheck` can use the torch-free
modules (`resume_check`, `sweep_jobs`) without importing every mode.
"""
