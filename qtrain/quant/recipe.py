"""`QuantRecipe`: everything one quantization setting means, behind one object.

A recipe is built from a run's :class:`~qtrain.config.QuantConfig` (what a run asks for) or
from a checkpoint manifest's ``quant`` section (what a checkpoint holds), and is the one way
the modes, the checkpoint package and the report touch quantization: its validation
problems, the model transforms (prepare / to-fake / convert / PTQ), the manifest section it
writes and the model it rebuilds from one, whether two recipes are the same (and how they
differ, in words), its labels and the bits a model stores per weight.

Example:
    >>> recipe = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32))
    >>> recipe.label
    'int4 group 32'
    >>> model = recipe.convert(recipe.prepare(model))           # QAT, then packed int4
    >>> section = recipe.manifest_section(model)                # the manifest's `quant`
    >>> QuantRecipe.from_manifest(section).same_as(recipe)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from qtrain.config import QuantConfig
from qtrain.quant import ptq, targets
from qtrain.quant import schemes as labels
from qtrain.quant import transforms as conv
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.kernels import check_kernel
from qtrain.quant.layout import build_packed_skeleton, layer_specs
from qtrain.quant.packed import PackedLinear
from qtrain.quant.schemes import spec_from_config
from qtrain.quant.spec import LayerSpec, QuantizedWeight, code_range

CONFIG_KEYS = tuple(f.name for f in fields(QuantConfig))
"""The keys of a `quant` config (a manifest's `quant.config`, a report's `quant`)."""


@dataclass(frozen=True)
class QuantRecipe:
    """One quantization setting (immutable). Build it with :meth:`from_config` or :meth:`from_manifest`.

    Attributes:
        config: the quant config (``scheme="none"``: full precision).
        learn_scales: :meth:`prepare` / :meth:`to_fake` make LSQ-style learnable scales.
        layers: per-layer specs as a manifest stores them (``quant.layers``), when the recipe
            comes from a manifest; None for a recipe built from a config.
        state: ``"fake"`` or ``"packed"`` for a recipe from a manifest, else None.
        method: the PTQ/QAT method a manifest records (``quant.method``), else None.
    """

    config: QuantConfig
    learn_scales: bool = False
    layers: Mapping[str, Mapping[str, Any]] | None = field(default=None, compare=False)
    state: str | None = None
    method: str | None = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, qcfg: QuantConfig | Mapping[str, Any] | None, learn_scales: bool = False) -> QuantRecipe:
        """The recipe of a run's quant config.

        Args:
            qcfg: a QuantConfig, or a mapping of its fields (unknown keys such as a report's
                ``method`` are ignored, missing ones take the defaults); None: full precision.
            learn_scales: LSQ-style learnable scales in :meth:`prepare` / :meth:`to_fake`.

        Returns:
            The recipe (holding a copy of the config).
        """
        if qcfg is None:
            return cls(QuantConfig())
        if isinstance(qcfg, QuantConfig):
            return cls(dataclasses.replace(qcfg), learn_scales)
        return cls(QuantConfig(**{k: v for k, v in qcfg.items() if k in CONFIG_KEYS}), learn_scales)

    @classmethod
    def from_manifest(cls, quant: Mapping[str, Any] | None) -> QuantRecipe:
        """The recipe a checkpoint manifest's ``quant`` section describes (None/{}: full precision).

        The section is taken as validated (``qtrain.checkpoint`` validates manifests on reading).
        """
        if not quant:
            return cls(QuantConfig(), layers={})
        config = quant.get("config")
        qcfg = QuantConfig(**config) if isinstance(config, Mapping) else QuantConfig()
        layers = quant.get("layers")
        return cls(
            qcfg,
            bool(quant.get("learn_scales")),
            dict(layers) if isinstance(layers, Mapping) else {},
            quant.get("state"),
            quant.get("method"),
        )

    def with_(self, *, kernel: str | None = None, learn_scales: bool | None = None) -> QuantRecipe:
        """A copy with another kernel (``quant.kernel``) and/or ``learn_scales``."""
        qcfg = self.config if kernel is None else dataclasses.replace(self.config, kernel=kernel)
        return dataclasses.replace(
            self,
            config=dataclasses.replace(qcfg),
            learn_scales=self.learn_scales if learn_scales is None else learn_scales,
        )

    # -- facts ----------------------------------------------------------------------------------
    @property
    def full_precision(self) -> bool:
        """Whether this recipe quantizes nothing (``scheme=none``)."""
        return self.config.scheme == "none"

    @property
    def scheme(self) -> str:
        """The scheme name (``none`` for full precision)."""
        return self.config.scheme

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight code: the scheme's width, 32 for full precision."""
        return 32 if self.full_precision else labels.get_scheme(self.scheme).bits

    @property
    def quantizes_activations(self) -> bool:
        """Whether the linears' inputs are quantized (int8 dynamic): asked for, or forced by the scheme."""
        return not self.full_precision and self.key[3] == "int8"

    @property
    def label(self) -> str:
        """What the weights are, for people: ``int4 group 32``, ``int8 + lm_head``, ``full precision``.

        A recipe from a manifest describes its stored layers (the distinct per-layer schemes,
        e.g. ``int4 group 32 + int4 per channel`` for an untied per-row embedding).
        """
        if self.layers is not None:
            return labels.layers_text(self.layers)
        return labels.config_text(asdict(self.config))

    @property
    def short_label(self) -> str:
        """Compact label for tables: ``fp32``, ``int8``, ``int4 g32``, ``int4 g128 asym +head``."""
        return labels.short_text(None if self.full_precision else asdict(self.config))

    @property
    def banner_label(self) -> str:
        """Label for a run's first line: ``int4 (group 32, symmetric)``, ``int8``, ``full precision``."""
        return labels.banner_text(asdict(self.config))

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two recipes the same: the effective weight format and the extra layers.

        Values a scheme fixes are normalised (int8 is per channel and symmetric whatever
        ``group_size`` says; ``int8da_int4w`` always has int8 activations), ``kernel`` is not part.
        """
        return labels.config_key(None if self.full_precision else asdict(self.config))

    def same_as(self, other: QuantRecipe) -> bool:
        """Whether ``other`` stores the same weights (see :meth:`difference`)."""
        return self.difference(other) is None

    def difference(self, other: QuantRecipe, weights_only: bool = False) -> str | None:
        """How this recipe (e.g. a checkpoint's) differs from ``other`` (e.g. a run's), in words.

        When both come from manifests, their per-layer specs are compared; otherwise their
        configs (:attr:`key`).

        Args:
            other: the recipe compared with.
            weights_only: compare only the weight format (scheme, grouping, symmetry), not the
                activations nor which extra layers (``lm_head``, ``embeddings``) are quantized.

        Returns:
            None when the same, else e.g. ``"holds int4 group 32 weights, but this run asks
            for int8"``.
        """
        if self.layers is not None and other.layers is not None and not weights_only:
            if labels.layers_key(self.layers) == labels.layers_key(other.layers):
                return None
            return f"holds {labels.layers_text(self.layers)} weights, but this run asks for {other.label}"
        mine, theirs = self.key, other.key
        if weights_only:
            mine, theirs = mine[:3], theirs[:3]
        if mine == theirs:
            return None
        return (
            f"holds {labels.config_text(asdict(self.config))} weights, "
            f"but this run asks for {labels.config_text(asdict(other.config))}"
        )

    def layer_difference(self, model: nn.Module) -> str | None:
        """How this (manifest) recipe's stored layers differ from a model's quantized layers.

        Returns:
            None when every layer has the same spec, else ``"holds <stored> weights, but this
            run asks for <model's>"``.
        """
        return self.difference(QuantRecipe(self.config, layers=layer_specs(model)))

    def problems(self, model: nn.Module) -> list[str]:
        """What keeps this recipe from quantizing ``model`` (empty: it fits; always empty when full precision).

        Checks the scheme's rules (int8 symmetric per channel, the activation mode, the kernel)
        and every target layer (group size divides its input size, tied embedding and head kept
        together; a bias is fine: it stays full precision); each problem names the key or layer and the value.
        """
        if self.full_precision:
            return []
        try:
            spec_from_config(self.config)
            check_kernel(self.config.kernel)
            targets.check_layers(model, self.config)
        except ValueError as err:
            return [str(err)]
        return []

    def target_layers(self, model: nn.Module) -> list[str]:
        """Names of the modules this recipe quantizes in ``model`` (see :func:`qtrain.quant.targets.target_layers`)."""
        return [] if self.full_precision else targets.target_layers(model, self.config)

    @staticmethod
    def layers_of(model: nn.Module) -> dict[str, dict[str, Any]]:
        """Per-layer specs of a prepared or converted model, as a manifest stores them (``quant.layers``)."""
        return layer_specs(model)

    @staticmethod
    def qparam_ranges(model: nn.Module) -> dict[str, tuple[str, int, int] | None]:
        """State-dict names of every quantized layer's qparams, for range checks of stored tensors.

        Returns:
            ``{"<layer>.scales": None, "<layer>.zeros": ("int4", lo, hi)}``: scales must be
            finite (and positive unless learned); zero points inside the layer's code range
            (named by its width). Names a layer does not store (symmetric: no zeros) are
            listed too; check those present.
        """
        out: dict[str, tuple[str, int, int] | None] = {}
        for name, m in model.named_modules():
            if isinstance(m, (PackedLinear, FakeQuantLinear)):
                out[f"{name}.scales"] = None
                out[f"{name}.zeros"] = (f"int{m.spec.bits}", *code_range(m.spec.bits))
        return out

    @staticmethod
    def scheme_bits() -> dict[str, int]:
        """Every scheme name (``quant.scheme``) and its weight bits (manifest validation)."""
        return {name: row.bits for name, row in labels.SCHEMES.items()}

    @staticmethod
    def check_layer(field: str, spec: Mapping[str, Any]) -> None:
        """Validate one stored layer spec (``quant.layers.<name>``) against its ``in_features``.

        Raises:
            ValueError: the spec does not fit (names ``field`` and the value).
        """
        LayerSpec.from_dict(dict(spec)).check(field, spec["in_features"])

    @staticmethod
    def bits_report(model: nn.Module) -> dict[str, float]:
        """Stored bits per quantized weight (codes, scales and zero points included) of a packed model.

        A full-precision bias is not counted (like the norms, it is not a quantized weight).

        Returns:
            ``{"bits_per_weight": float, "quantized_weights": count}`` (0.0 / 0 when nothing is packed).
        """
        weights = stored = 0
        for _, m in model.named_modules():
            if isinstance(m, PackedLinear):
                weights += m.in_features * m.out_features
                stored += sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if k != "bias")
        return {"bits_per_weight": 8 * stored / weights if weights else 0.0, "quantized_weights": weights}

    # -- model transforms (in place; each also returns the model) ------------------------------
    def prepare(self, model: nn.Module, init: Mapping[str, QuantizedWeight] | None = None) -> nn.Module:
        """Full precision -> fake-quant (QAT): swap the target linears for ``FakeQuantLinear``.

        Args:
            model: a full-precision model.
            init: optional per-layer initial qparams (only scales/zeros are used).

        Raises:
            ValueError: full precision, or the recipe does not fit the model (see :meth:`problems`).
        """
        return conv.prepare(model, self.config, self.learn_scales, init)

    def to_fake(self, model: nn.Module) -> nn.Module:
        """Packed -> fake-quant modules reproducing the packed codes exactly (fine-tuning, QAT from PTQ)."""
        return conv.to_fake(model, self.learn_scales)

    def convert(self, model: nn.Module) -> nn.Module:
        """Full precision or fake-quant -> packed integer modules (fake-quant layers keep their codes).

        Raises:
            ValueError: full precision, the recipe does not fit, or a layer was trained with another spec.
        """
        return conv.convert(model, self.config)

    def quantize(self, model: nn.Module, method: str, calib: Sequence[Tensor] | None = None, **opts: Any) -> nn.Module:
        """Post-training quantize a full-precision model into packed modules (in place).

        Args:
            model: full-precision model.
            method: a name in :data:`qtrain.quant.ptq.METHODS` (``rtn``, ``mse``, ``gptq``).
            calib: token-id batches, for methods whose entry ``needs_calibration``.
            **opts: ``damp`` (GPTQ dampening), ``grid`` (MSE candidates).

        Raises:
            ValueError: unknown method, missing calibration data, or the recipe does not fit.
        """
        return ptq.quantize_ptq(model, self.config, method, calib, **opts)

    def rebuild(self, model: nn.Module, kernel: str = "auto") -> nn.Module:
        """Turn a freshly built full-precision model into the one this manifest recipe describes.

        Packed state: empty packed modules from :attr:`layers` (then ``load_state_dict``);
        fake state (QAT in progress): ``prepare`` with the recorded ``learn_scales``, leaving in
        full precision the targets the manifest does not list. No state (a full-precision
        manifest, or a recipe built from a config): unchanged.

        Args:
            model: a fresh model of the checkpoint's shape (the meta device works).
            kernel: kernel of the packed modules (``quant.kernel`` values).

        Raises:
            ValueError: a layer, shape or spec that does not fit the model.
        """
        if self.state == "fake":
            self._keep_unlisted(model)
            return conv.prepare(model, self.config, self.learn_scales)
        if self.state is not None:
            return build_packed_skeleton(model, self.layers or {}, kernel)
        return model

    def expected_layers(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """The per-layer specs this recipe's config implies for a fresh full-precision ``model``.

        Targets the manifest does not list stay full precision (kept by a hook). The model is
        prepared in place (build it on the meta device).
        """
        self._keep_unlisted(model)
        conv.prepare(model, self.config)
        return layer_specs(model)

    def _keep_unlisted(self, model: nn.Module) -> None:
        listed = self.layers or {}
        for name in targets.target_layers(model, self.config):
            if name not in listed:
                targets.keep_full_precision(model.get_submodule(name))

    def manifest_section(self, model: nn.Module, method: str | None = None) -> dict[str, Any] | None:
        """The ``quant`` section a checkpoint of ``model`` stores (None for a full-precision model).

        Args:
            model: a prepared (fake-quant) or converted (packed) model.
            method: the method recorded as ``quant.method`` of a finished (packed) result
                (``rtn``, ``qat``, ``finetune``, ...); None while training.

        Returns:
            ``{"config", "state", "method", "learn_scales", "layers"}``. ``state`` is ``fake``
            when the model has fake-quant layers, or is still training (no method) with none
            packed (every target kept in full precision by a hook); else ``packed``, whose
            ``learn_scales`` is always false.
        """
        layers = layer_specs(model)
        if self.full_precision and not layers:
            return None
        mods = list(model.modules())
        fake = any(isinstance(m, FakeQuantLinear) for m in mods) or (
            method is None and not any(isinstance(m, PackedLinear) for m in mods)
        )
        return {
            "config": asdict(self.config),
            "state": "fake" if fake else "packed",
            "method": method,
            "learn_scales": self.learn_scales if fake else False,
            "layers": layers,
        }
