"""QAT schedule helpers: switch fake quantization on and off, freeze scales, find them, hook weights.

They act on every :class:`~qtrain.quant.fake.FakeQuantLinear` of a prepared model (an
embedding table that reads the head's module counted once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from qtrain.quant.fake import FakeQuantLinear, WeightHook


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    """``(name, module)`` of every :class:`FakeQuantLinear` (embedding tables included once)."""
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and id(m) not in seen:
            seen.add(id(m))
            yield name, m


def set_fake_quant(model: nn.Module, weight: bool | None = None, activations: bool | None = None) -> None:
    """Turn weight and/or activation fake quantization on or off in every fake-quant module."""
    for _, m in fake_quant_modules(model):
        m.enable(weight, activations if m.spec.activations == "int8" else None)


def freeze_scales(model: nn.Module) -> None:
    """:meth:`FakeQuantLinear.freeze` on every fake-quant module."""
    for _, m in fake_quant_modules(model):
        m.freeze()


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable scale parameters (give them their own optimizer group, no weight decay).

    They are 2-D ``[N, G]`` tensors, so a "decay every matrix" rule would catch them:
    exclude them from the weight-decay group.
    """
    return [m.scales for _, m in fake_quant_modules(model) if isinstance(m.scales, nn.Parameter)]


def register_weight_hook(model: nn.Module, fn: WeightHook) -> Callable[[], None]:
    """Append ``fn(module_name, fake_weight) -> Tensor | None`` to every fake-quant module.

    Args:
        model: a prepared model.
        fn: the hook; a returned tensor replaces the fake weight in that forward (it does not
            change what ``convert`` stores).

    Returns:
        A function that removes the hook again.
    """
    mods = [m for _, m in fake_quant_modules(model)]
    for m in mods:
        m.weight_hooks.append(fn)

    def remove() -> None:
        for m in mods:
            if fn in m.weight_hooks:
                m.weight_hooks.remove(fn)

    return remove
