"""Experiment hooks: user callables that run at fixed points of quantized training.

List them in the config; each entry is instantiated with Hydra (`_target_` plus arguments)
and may define any of these methods, called in this order:

- ``after_prepare(model)``: once, after `prepare` swapped in fake-quant modules
  (or after a quantized checkpoint became trainable in `mode=finetune`)
- ``on_weight(name, fake_weight) -> Tensor | None``: on every fake-quantized weight in every
  forward; a returned tensor replaces the weight for that forward
- ``after_step(step, model) -> dict | None``: after every optimizer step; a returned dict is
  logged to `metrics.jsonl` at that step
- ``before_convert(model)``: once, just before conversion to packed integers

A `_target_` that resolves to a plain function (no such methods) is called as
``after_step(step, model)``.

Example (a worked hook: clip every fake-quant weight to +-3 standard deviations)::

    # mypkg/hooks.py
    class ClipOutliers:
        def __init__(self, sigmas: float = 3.0):
            self.sigmas = sigmas
        def on_weight(self, name, w):
            bound = self.sigmas * w.std()
            return w.clamp(-bound, bound)

    # command line
    qtrain mode=qat quant=int4 'hooks=[{_target_: mypkg.hooks.ClipOutliers, sigmas: 2.5}]'
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.primitives import dequantize
from qtrain.quant.qat import fake_quant_modules, register_weight_hook
from qtrain.quant.targets import keep_full_precision, set_module

POINTS = ("after_prepare", "on_weight", "after_step", "before_convert")


class _FunctionHook:
    """Adapts a plain callable to the `after_step` point."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        out = self.fn(step, model)
        return out if isinstance(out, dict) else None


class HookSet:
    """The configured hooks, called together at each point in list order."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks
        self._removers: list[Any] = []

    def after_prepare(self, model: nn.Module) -> None:
        """Run `after_prepare` hooks, then attach `on_weight` hooks to every fake-quant module."""
        for h in self.hooks:
            if hasattr(h, "after_prepare"):
                h.after_prepare(model)
        for h in self.hooks:
            if hasattr(h, "on_weight"):
                self._removers.append(register_weight_hook(model, h.on_weight))

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        """Run `after_step` hooks; merge the metrics they return."""
        merged: dict[str, float] = {}
        for h in self.hooks:
            if hasattr(h, "after_step"):
                merged.update(h.after_step(step, model) or {})
        return merged or None

    def before_convert(self, model: nn.Module) -> None:
        """Run `before_convert` hooks and detach weight hooks (conversion stores the real codes)."""
        for h in self.hooks:
            if hasattr(h, "before_convert"):
                h.before_convert(model)
        for remove in self._removers:
            remove()
        self._removers.clear()


class HookError(ConfigError, ValueError):
    """A `hooks` entry that cannot be used: exit 2 (a config mistake), naming the entry."""


def build_hooks(specs: list[Any], run_dir: Path | None = None) -> HookSet:
    """Instantiate hook configs (`{_target_: pkg.Class, ...}`) into a HookSet.

    Raises:
        HookError: an entry without `_target_`, or one that cannot be imported or
            instantiated (names the entry and says why).
    """
    from hydra.utils import instantiate

    problems = check_specs(specs)
    if problems:
        raise HookError("; ".join(problems))
    hooks = []
    for i, spec in enumerate(specs):
        try:
            hook = instantiate(spec)
        except Exception as err:  # noqa: BLE001 - report which hook failed and why
            raise HookError(f"hooks[{i}]: cannot instantiate {spec['_target_']}: {_reason(err)}") from None
        if not any(hasattr(hook, p) for p in POINTS):
            if not callable(hook):
                raise HookError(f"hooks[{i}]: {spec['_target_']} is neither callable nor defines {POINTS}")
            hook = _FunctionHook(hook)
        hooks.append(hook)
    return HookSet(hooks)


def check_specs(specs: list[Any]) -> list[str]:
    """Every problem with the `hooks` entries that shows without running them: the shape of
    each entry, whether its `_target_` imports, and whether its arguments fit the signature.

    Example:
        >>> check_specs([{"_target_": "qtrain.quant.hooks.SQNRLogger", "evry": 10}])
        ["hooks[0]: qtrain.quant.hooks.SQNRLogger: got an unexpected keyword argument 'evry' (it takes: every)"]
    """
    problems: list[str] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
            problems.append(
                f"hooks[{i}]: each hook is a mapping with a _target_, e.g. "
                f"{{_target_: qtrain.quant.hooks.SQNRLogger, every: 100}} (got {spec!r})"
            )
            continue
        target = spec["_target_"]
        try:
            obj = _locate(target)
        except Exception as err:  # noqa: BLE001 - any import failure is the entry's problem
            problems.append(f"hooks[{i}]: {_import_problem(target, err)}")
            continue
        problems.extend(f"hooks[{i}]: {msg}" for msg in _signature_problems(target, obj, spec))
    return problems


def _locate(target: str) -> Any:
    """The object a dotted `_target_` names, resolved as Hydra's `instantiate` resolves it."""
    from hydra._internal.utils import _locate as locate

    return locate(target)


def _reason(err: BaseException) -> str:
    """The underlying reason of a Hydra error (its chained cause), on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _import_problem(target: str, err: BaseException) -> str:
    """Why `target` does not import; a missing name in a module that imports gets close matches."""
    module, _, name = target.rpartition(".")
    try:
        found = importlib.import_module(module) if module else None
    except Exception:  # noqa: BLE001 - the module itself does not import: say why below
        found = None
    if found is None or hasattr(found, name):
        return f"_target_ {target} cannot be imported: {_reason(err)}"
    close = difflib.get_close_matches(name, [n for n in dir(found) if not n.startswith("_")], n=2)
    hint = f". Did you mean {' or '.join(f'{module}.{c}' for c in close)}?" if close else ""
    return f"_target_ {target}: module {module} has no {name}{hint}"


def _signature_problems(target: str, obj: Any, spec: dict[str, Any]) -> list[str]:
    """Arguments of `spec` that `obj`'s signature does not take (or required ones missing)."""
    kwargs = {k: v for k, v in spec.items() if not (k.startswith("_") and k.endswith("_"))}
    args = list(spec.get("_args_", []))
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return []
    bind = sig.bind_partial if spec.get("_partial_") else sig.bind
    try:
        bind(*args, **kwargs)
    except TypeError as err:
        takes = ", ".join(p for p in sig.parameters if p not in ("self", "args", "kwargs")) or "no arguments"
        return [f"{target}: {err} (it takes: {takes})"]
    return []


def sqnr_db(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|w|^2 / |w - q(w)|^2)."""
    noise = float((weight.float() - quantized.float()).pow(2).sum())
    signal = float(weight.float().pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


class SQNRLogger:
    """Built-in: per-layer quantization SQNR (dB) logged to metrics.jsonl every `every` steps.

    Config: ``'hooks=[{_target_: qtrain.quant.hooks.SQNRLogger, every: 100}]'``
    """

    def __init__(self, every: int = 100) -> None:
        self.every = max(1, int(every))

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        if step % self.every:
            return None
        out: dict[str, float] = {}
        with torch.no_grad():
            for name, m in fake_quant_modules(model):
                qw = m.quantized()
                deq = dequantize(qw.codes, qw.scales, qw.zeros, m.spec.bits, m.spec.group_size)
                out[f"sqnr_db/{name}"] = round(sqnr_db(m.weight, deq), 3)
        if out:
            out["sqnr_db_min"] = min(out.values())
        return out


class CodeFlips:
    """Built-in: how many weight codes still change, logged to metrics.jsonl every `every` steps.

    ``code_flips`` is the share of all fake-quant weight codes that differ from the codes
    `every` steps before (``code_flips/<layer>`` per layer with ``per_layer``); QAT has settled
    when it nears zero. Codes only are compared (scales learnt with LSQ move them too).

    Config: ``'hooks=[{_target_: qtrain.quant.hooks.CodeFlips, every: 50}]'``
    """

    def __init__(self, every: int = 50, per_layer: bool = False) -> None:
        self.every = max(1, int(every))
        self.per_layer = bool(per_layer)
        self.last: dict[str, torch.Tensor] = {}

    def after_step(self, step: int, model: nn.Module) -> dict[str, float] | None:
        if (step + 1) % self.every:
            return None
        out: dict[str, float] = {}
        changed = total = 0
        with torch.no_grad():
            for name, m in fake_quant_modules(model):
                codes = m.quantized().codes
                if name in self.last:
                    n = int((codes != self.last[name]).sum())
                    changed, total = changed + n, total + codes.numel()
                    if self.per_layer:
                        out[f"code_flips/{name}"] = round(n / codes.numel(), 6)
                self.last[name] = codes.clone()
        if total:
            out["code_flips"] = round(changed / total, 6)
        return out or None


class KeepFullPrecision:
    """Built-in: keep the layers whose names match any glob pattern in full precision.

    Config: ``'hooks=[{_target_: qtrain.quant.hooks.KeepFullPrecision, patterns: ["blocks.0.*"]}]'``
    The matching fake-quant layers go back to ``nn.Linear`` right after prepare and are
    skipped by convert (their names are listed in the checkpoint as full precision).
    """

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)
        self.kept: list[str] = []

    def after_prepare(self, model: nn.Module) -> None:
        for name, m in list(model.named_modules()):
            if isinstance(m, FakeQuantLinear) and any(fnmatch.fnmatch(name, p) for p in self.patterns):
                linear = m.to_linear()
                keep_full_precision(linear)
                set_module(model, name, linear)
                self.kept.append(name)
        if not self.kept:
            raise HookError(f"KeepFullPrecision: no quantized layer matches {self.patterns}")
