"""Trainer state validated like the model: required keys, types, nesting, shapes against parameters.

What `Trainer.state_dict` writes (`trainer.json` with tensor references into
`trainer.safetensors`): ``{"trainer": {"optimizer": AdamW state, "step", "sampler", "rng_cpu"}}``.
Checked from the JSON and the safetensors header alone (no tensor data), against the
parameter shapes per optimizer group: those of the model the manifest describes (`verify`
and every load), and those of the run's own optimizer when resuming.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from qtrain.checkpoint.format import DTYPE_NAMES
from qtrain.errors import CheckpointError

TRAINER_KEYS = ("optimizer", "step", "sampler", "rng_cpu")
SAMPLER_KEYS = ("epoch", "cursor", "seed")
MOMENTS = ("exp_avg", "exp_avg_sq")
FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")
_GROUP_NUMBERS = {
    "lr": (0.0, math.inf),
    "eps": (0.0, 1.0),
    "weight_decay": (0.0, math.inf),
    "base_lr": (0.0, math.inf),
    "initial_lr": (0.0, math.inf),
}
"""Numeric AdamW group entries and their ranges (lr, eps and weight_decay are required)."""
TensorInfo = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, dtype name), from a safetensors header."""


def _bad(where: Path, field: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{where}: trainer state '{field}' {msg}")


def _int(where: Path, field: str, v: Any, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise _bad(where, field, f"must be an integer >= {lo} (got {str(v)[:60]!r})")
    return v


def _tensor(where: Path, field: str, ref: Any, tensors: TensorInfo) -> tuple[tuple[int, ...], str]:
    """Shape and dtype name of a tensor reference (as stored) or of a tensor (as loaded)."""
    if isinstance(ref, torch.Tensor):
        return tuple(ref.shape), DTYPE_NAMES.get(ref.dtype, str(ref.dtype))
    if not (isinstance(ref, dict) and set(ref) == {"__tensor__"} and isinstance(ref["__tensor__"], str)):
        raise _bad(where, field, f"must be a tensor (got {str(ref)[:60]!r})")
    if ref["__tensor__"] not in tensors:
        raise _bad(where, field, f"refers to tensor '{ref['__tensor__'][:120]}', absent from trainer.safetensors")
    return tensors[ref["__tensor__"]]


def validate_trainer_state(
    where: Path, meta: Any, tensors: TensorInfo, step: int, groups: list[list[tuple[int, ...]]] | None
) -> None:
    """Refuse trainer state qtrain could not resume from; each message names the field.

    Args:
        where: the trainer.json path (for messages).
        meta: trainer.json as parsed (tensor references), or as loaded (tensors).
        tensors: shapes and dtypes of trainer.safetensors.
        step: the manifest's step (the trainer's must equal it).
        groups: parameter shapes per optimizer group, or None to skip the shape checks.

    Raises:
        CheckpointError: a missing key, wrong type or range, or a shape that fits no parameter.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: must be a JSON object")
    if "trainer" not in meta:
        return  # no trainer state (a converted final checkpoint): nothing to resume from
    tr = meta["trainer"]
    if not isinstance(tr, dict) or sorted(tr) != sorted(TRAINER_KEYS):
        got = sorted(tr) if isinstance(tr, dict) else type(tr).__name__
        raise _bad(where, "trainer", f"must hold exactly {list(TRAINER_KEYS)} (got {str(got)[:200]})")
    if _int(where, "trainer.step", tr["step"]) != step:
        raise _bad(where, "trainer.step", f"is {tr['step']}, but the manifest's step is {step}")
    _sampler(where, tr["sampler"])
    shape, dtype = _tensor(where, "trainer.rng_cpu", tr["rng_cpu"], tensors)
    want = tuple(torch.get_rng_state().shape)
    if (shape, dtype) != (want, "U8"):
        raise _bad(where, "trainer.rng_cpu", f"is {dtype} {list(shape)}, a CPU RNG state is U8 {list(want)}")
    _optimizer(where, tr["optimizer"], tensors, groups)


def _sampler(where: Path, s: Any) -> None:
    if not isinstance(s, dict) or sorted(s) != sorted(SAMPLER_KEYS):
        raise _bad(where, "trainer.sampler", f"must hold exactly {list(SAMPLER_KEYS)} (got {str(s)[:120]})")
    epoch = _int(where, "trainer.sampler.epoch", s["epoch"])
    _int(where, "trainer.sampler.cursor", s["cursor"])
    seed = _int(where, "trainer.sampler.seed", s["seed"], lo=-(2**63))
    if not -(2**63) <= seed * 100_003 + epoch < 2**63:  # BatchSampler seeds a generator with this
        raise _bad(where, "trainer.sampler.seed", f"{seed} is out of range for a random generator seed")


def _optimizer(where: Path, opt: Any, tensors: TensorInfo, groups: list[list[tuple[int, ...]]] | None) -> None:
    if not isinstance(opt, dict) or sorted(opt) != ["param_groups", "state"]:
        raise _bad(where, "trainer.optimizer", "must hold exactly ['param_groups', 'state']")
    pgs, state = opt["param_groups"], opt["state"]
    if not isinstance(pgs, list) or not pgs:
        raise _bad(where, "trainer.optimizer.param_groups", "must be a non-empty list")
    index: dict[int, tuple[int, bool]] = {}  # parameter index -> (group, amsgrad)
    listed: list[int] = []
    for g, group in enumerate(pgs):
        listed += _group(where, f"trainer.optimizer.param_groups.{g}", group)
        index.update((i, (g, bool(group.get("amsgrad")))) for i in group["params"])
    if sorted(listed) != list(range(len(listed))):
        raise _bad(where, "trainer.optimizer.param_groups", "must number the parameters 0..n-1, each once")
    if groups is not None:
        sizes = [len(p["params"]) for p in pgs]
        if sizes != [len(g) for g in groups]:
            raise _bad(
                where,
                "trainer.optimizer.param_groups",
                f"hold {sizes} parameters per group, but the model's optimizer has {[len(g) for g in groups]}",
            )
    # PyTorch pairs saved group g's `params[j]` with the live group g's j-th parameter (not by index order)
    shapes = {i: groups[g][j] for g, pg in enumerate(pgs) for j, i in enumerate(pg["params"])} if groups else None
    if not isinstance(state, dict):
        raise _bad(where, "trainer.optimizer.state", "must be an object")
    for key, entry in state.items():
        field = f"trainer.optimizer.state.{key[:40]}"
        if not (key.isascii() and key.isdigit() and int(key) in index):
            raise _bad(where, field, "is not the index of a parameter in param_groups")
        _moments(where, field, entry, tensors, index[int(key)][1], shapes[int(key)] if shapes else None)


def _group(where: Path, field: str, group: Any) -> list[int]:
    if not isinstance(group, dict):
        raise _bad(where, field, "must be an object")
    params = group.get("params")
    if not (isinstance(params, list) and all(type(i) is int and i >= 0 for i in params)):
        raise _bad(where, f"{field}.params", "must be a list of parameter indices")
    for key, (lo, hi) in _GROUP_NUMBERS.items():
        v = group.get(key)
        if v is None and key not in ("lr", "eps", "weight_decay"):
            continue
        if not (isinstance(v, (int, float)) and type(v) is not bool and lo <= v < hi and math.isfinite(v)):
            raise _bad(where, f"{field}.{key}", f"must be a finite number in [{lo}, {hi}) (got {str(v)[:40]})")
    betas = group.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in betas)):
        raise _bad(where, f"{field}.betas", f"must be two numbers in [0, 1) (got {str(betas)[:60]})")
    for key, v in group.items():
        if key not in _GROUP_NUMBERS and key not in ("params", "betas") and not (v is None or type(v) is bool):
            raise _bad(where, f"{field}.{key[:40]}", f"must be true, false or null (got {str(v)[:40]})")
    return params


def _moments(
    where: Path, field: str, entry: Any, tensors: TensorInfo, amsgrad: bool, param: tuple[int, ...] | None
) -> None:
    need = {"step", *MOMENTS, *(("max_exp_avg_sq",) if amsgrad else ())}
    if not isinstance(entry, dict) or set(entry) != need:
        raise _bad(where, field, f"must hold exactly {sorted(need)}")
    shape, dtype = _tensor(where, f"{field}.step", entry["step"], tensors)
    if shape not in ((), (1,)) or dtype not in FLOAT_DTYPES:
        raise _bad(where, f"{field}.step", f"must be a float scalar (got {dtype} {list(shape)})")
    for name in sorted(need - {"step"}):
        shape, dtype = _tensor(where, f"{field}.{name}", entry[name], tensors)
        if dtype not in FLOAT_DTYPES:
            raise _bad(where, f"{field}.{name}", f"must be a float tensor (got {dtype})")
        if param is not None and shape != param:
            raise _bad(where, f"{field}.{name}", f"has shape {list(shape)}, but its parameter has {list(param)}")
