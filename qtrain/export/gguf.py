"""Export a qtrain model to GGUF (llama.cpp), from its packed codes: no second quantization.

``write_gguf`` writes one ``.gguf`` file through the ``gguf`` package (llama.cpp's reference
writer), architecture ``llama``:

- **Tensors** get llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output``); qtrain's
  fused ``qkv`` rows (all q heads, then k, then v) and ``gate_up`` rows (gate, then up) are
  split by rows, which keeps every row's codes and scales intact. Tied embeddings write only
  ``token_embd`` (llama.cpp uses it as the output when ``output`` is absent).
- **Rotary layout**: llama.cpp's llama architecture uses ggml's "norm" rope, rotating adjacent
  pairs (dims 2j, 2j+1 of a head); ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) moves
  Hugging Face's half-split rows into exactly that order (GGUF row 2j = HF row j, row 2j+1 =
  HF row j + hd/2). qtrain rotates adjacent pairs already (``qtrain.model.apply_rope``), so q
  and k rows are written as they are. ``tests/unit/test_gguf_export.py`` checks this with a
  reference forward pass of the GGUF tensors.
- **Weights** (:mod:`qtrain.export.gguf_quant`): int4 symmetric -> Q4_0 and int8 -> Q8_0 bit
  for bit; int4 asymmetric -> Q4_1 (difference measured and reported); full precision -> F32,
  F16 or BF16 (``float_type``); 1-D tensors (norms, biases) stay F32, as llama.cpp's converter
  writes them. ``int8da_int4w`` exports its weights as Q4_0; its int8 activations are not a
  GGUF property: llama.cpp quantizes activations its own way (Q8_0 blocks of 32 on CPU).
- **Tokenizer**: every kind becomes a byte-level BPE vocabulary (``tokenizer.ggml.model =
  gpt2``), see :mod:`qtrain.export.gguf_vocab`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from qtrain.config import ModelConfig
from qtrain.console import warn
from qtrain.errors import ConfigError
from qtrain.export import gguf_quant as Q
from qtrain.export.gguf_vocab import add_vocab
from qtrain.model import GPT
from qtrain.quant.fake import FakeQuantLinear
from qtrain.quant.packed import PackedLinear
from qtrain.quant.spec import LayerSpec, QuantizedWeight

FLOAT_TYPES = ("f32", "f16", "bf16")
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}  # fmt: skip
"""ggml tensor type -> ``general.file_type`` name (the type most weights have)."""


@dataclass(frozen=True)
class Source:
    """One tensor to write: a float tensor, or quantized codes with their spec."""

    name: str
    weight: Tensor | None = None
    qw: QuantizedWeight | None = None
    spec: LayerSpec | None = None

    def rows(self, a: int, b: int) -> Source:
        """Rows ``a:b`` (codes, scales and zero points are per row, so this is exact)."""
        if self.qw is None:
            assert self.weight is not None
            return replace(self, weight=self.weight[a:b])
        c, s, z = self.qw
        return replace(self, qw=QuantizedWeight(c[a:b], s[a:b], None if z is None else z[a:b]))


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ConfigError("export.format=gguf needs the gguf package: pip install 'qtrain[export]'") from e
    return gguf


def _source(mod: nn.Module, name: str) -> Source:
    """The weight of a linear-like module (or an embedding's table) as a :class:`Source`."""
    get_table = getattr(mod, "get_table", None)
    if get_table is not None:  # QuantEmbedding / FakeQuantEmbedding: the packed or fake table
        mod = get_table()
    if isinstance(mod, (PackedLinear, FakeQuantLinear)):
        return Source(name, qw=mod.quantized(), spec=mod.spec)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, Tensor):
        raise ConfigError(f"{name}: {type(mod).__name__} has no weight the GGUF export can write")
    return Source(name, weight=weight.detach())


def _bias(mod: nn.Module, name: str) -> Source | None:
    bias = getattr(mod, "bias", None)
    return Source(name, weight=bias.detach()) if isinstance(bias, Tensor) else None


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size)."""
    return cfg.n_head, cfg.kv_heads(), cfg.head_size()


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse model features llama.cpp's llama architecture cannot run.

    Raises:
        ConfigError: q/k norms, or a rope scaling other than none/llama3 (names the closest format).
    """
    if cfg.qk_norm:
        raise ConfigError(
            "model.qk_norm=true: llama.cpp's llama architecture has no q/k norms, so GGUF cannot hold "
            "this model as llama; the closest format that can is export.format=hf"
        )
    if cfg.rope_scaling not in ("none", "llama3"):
        raise ConfigError(f"model.rope_scaling={cfg.rope_scaling!r}: the GGUF export writes none or llama3")


def model_tensors(model: GPT) -> list[tuple[str, Source]]:
    """GGUF tensor names and sources, in llama.cpp's order."""
    cfg = model.cfg
    nq, nk, hd = _dims(cfg)
    q, kv, hidden = nq * hd, nk * hd, cfg.mlp_hidden
    out: list[tuple[str, Source]] = [("token_embd.weight", _source(model.tok_emb, "tok_emb"))]
    blocks: list[Any] = list(model.blocks)
    for i, block in enumerate(blocks):
        p, b = f"blocks.{i}", f"blk.{i}"
        qkv = _source(block.attn.qkv, f"{p}.attn.qkv")
        gate_up = _source(block.mlp.gate_up, f"{p}.mlp.gate_up")
        split = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}  # qkv rows: q heads, k heads, v heads
        out.append((f"{b}.attn_norm.weight", Source(f"{p}.attn_norm", weight=block.attn_norm.weight.detach())))
        out += [(f"{b}.attn_{t}.weight", qkv.rows(*rows)) for t, rows in split.items()]
        bias = _bias(block.attn.qkv, f"{p}.attn.qkv.bias")
        if bias is not None:
            out += [(f"{b}.attn_{t}.bias", bias.rows(*rows)) for t, rows in split.items()]
        out += [
            (f"{b}.attn_output.weight", _source(block.attn.out, f"{p}.attn.out")),
            (f"{b}.ffn_norm.weight", Source(f"{p}.mlp_norm", weight=block.mlp_norm.weight.detach())),
            (f"{b}.ffn_gate.weight", gate_up.rows(0, hidden)),
            (f"{b}.ffn_up.weight", gate_up.rows(hidden, 2 * hidden)),
            (f"{b}.ffn_down.weight", _source(block.mlp.down, f"{p}.mlp.down")),
        ]
    out.append(("output_norm.weight", Source("norm", weight=model.norm.weight.detach())))
    if not cfg.tie_embeddings:  # tied: llama.cpp reads token_embd as the output
        out.append(("output.weight", _source(model.lm_head, "lm_head")))
    return out


def rope_factors(cfg: ModelConfig) -> list[float] | None:
    """llama3 rope scaling as ``rope_freqs`` divisors (as llama.cpp's converter computes them), or None."""
    if cfg.rope_scaling != "llama3":
        return None
    _, _, hd = _dims(cfg)
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_context
    out: list[float] = []
    for j in range(0, hd, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (j / hd)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def _check_blocks(gname: str, src: Source) -> None:
    assert src.qw is not None and src.spec is not None
    k, g = src.qw.codes.shape[1], src.spec.group_size
    if k % Q.QK != 0:
        raise ConfigError(
            f"{src.name}: input size K={k} is not a multiple of 32, ggml's block size, so GGUF cannot hold "
            f"{gname} quantized; the closest format that can is export.format=hf (full precision)"
        )
    if g != -1 and g % Q.QK != 0:
        raise ConfigError(
            f"{src.name}: int{src.spec.bits} group_size={g} is not a multiple of 32: GGUF's Q4_0/Q4_1 blocks "
            "share one scale per 32 weights; the closest scheme that exports losslessly is quant.group_size=32 (Q4_0)"
        )


def encode(gname: str, src: Source, float_type: str, report: dict[str, Any]) -> tuple[Any, str]:
    """One tensor as (numpy array, ggml type name); updates ``report``."""
    if src.qw is None:
        assert src.weight is not None
        arr, kind = Q.float_rows(src.weight, float_type if src.weight.dim() == 2 else "f32")
        if kind == "F16" and not np.isfinite(arr).all():
            raise ConfigError(f"{src.name}: a weight exceeds fp16's range (65504); use export.float_type=bf16 or f32")
        return arr, kind
    _check_blocks(gname, src)
    assert src.spec is not None
    c, s, z = src.qw
    fp16 = Q.Fp16Report()
    if src.spec.bits == 8:
        arr, kind = Q.encode_q8_0(c, s, fp16), "Q8_0"
    elif src.spec.symmetric:
        arr, kind = Q.encode_q4_0(c, s, src.spec.group_size, fp16), "Q4_0"
    else:
        assert z is not None
        arr, diff, rel = Q.encode_q4_1(c, s, z, src.spec.group_size, fp16)
        kind = "Q4_1"
        q41 = report.setdefault("q4_1", {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "bound_rel": Q.Q4_1_REL_BOUND})
        q41["max_abs_diff"], q41["max_rel_diff"] = max(q41["max_abs_diff"], diff), max(q41["max_rel_diff"], rel)
    if fp16.blocks:
        if math.isinf(fp16.max_weight_error):
            raise ConfigError(f"{src.name}: a scale exceeds fp16's range (65504); GGUF blocks store fp16 scales")
        report["fp16_scales"][gname] = vars(fp16)
    if src.spec.activations != "none" and not report["notes"]:
        report["notes"].append(
            f"{src.spec.scheme}: weights exported as {kind}; qtrain's int8 per-token activations are not stored "
            "in GGUF, llama.cpp quantizes activations itself (Q8_0 blocks of 32 on CPU)"
        )
    return arr, kind


def _add_metadata(w: Any, cfg: ModelConfig, name: str) -> None:
    nq, nk, hd = _dims(cfg)
    w.add_name(name)
    w.add_quantized_by("qtrain")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(nq)
    w.add_head_count_kv(nk)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the gguf writer's INFO lines (endianness, file listing) out of the run's log."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _write(w: Any) -> None:
    """Header, metadata, tensors."""
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _file_type(gguf: Any, counts: Counter[str]) -> int:
    """``general.file_type``: the type that holds most weight elements."""
    kind = counts.most_common(1)[0][0] if counts else "F32"
    return int(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))


def write_gguf(model: GPT, manifest: dict[str, Any], tokenizer: Any, path: Path, float_type: str) -> dict[str, Any]:
    """Write ``model`` as a llama-architecture GGUF file at ``path``.

    Args:
        model: a qtrain GPT, full precision, fake-quant or packed (codes are taken as stored).
        manifest: the checkpoint manifest (for the name; the model's own config is authoritative).
        tokenizer: a :class:`qtrain.tokenizer.Tokenizer` (``kind``, ``vocab_size``, ``hf_json()``, ``files()``).
        path: the ``.gguf`` file to create.
        float_type: ``f32``, ``f16`` or ``bf16`` for full-precision 2-D tensors.

    Returns:
        A report: ``path``, ``tensors`` (count per ggml type), ``file_type``, ``bytes``,
        ``bits_per_weight`` (file bits per 2-D weight), ``q4_1`` (``max_abs_diff``,
        ``max_rel_diff`` relative to the block scale, ``bound_rel``) when any, ``fp16_scales``
        (tensor -> blocks whose scale is not an fp16 value, see :class:`~qtrain.export.gguf_quant.Fp16Report`),
        ``notes``.

    Raises:
        ConfigError: gguf missing, unknown float_type, or a model/scheme GGUF cannot hold (names the closest).
    """
    gguf = _gguf()
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"export.float_type={float_type!r} is not one of {list(FLOAT_TYPES)}")
    cfg = model.cfg
    check_exportable(cfg)
    report: dict[str, Any] = {"path": str(path), "tensors": {}, "fp16_scales": {}, "notes": []}
    with _quiet():
        w = gguf.GGUFWriter(str(path), arch="llama")
    _add_metadata(w, cfg, str(manifest.get("name") or Path(path).stem))
    report["notes"] += add_vocab(w, tokenizer, cfg.vocab_size)
    kinds: Counter[str] = Counter()
    elements: Counter[str] = Counter()
    for gname, src in model_tensors(model):
        arr, kind = encode(gname, src, float_type, report)
        raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        w.add_tensor(gname, arr, raw_dtype=raw)
        kinds[kind] += 1
        shape = (src.weight if src.qw is None else src.qw.codes).shape  # type: ignore[union-attr]
        if len(shape) == 2:
            elements[kind] += shape[0] * shape[1]
    factors = rope_factors(cfg)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
        kinds["F32"] += 1
    w.add_file_type(_file_type(gguf, elements))
    if any(k.startswith("Q") for k in kinds):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with _quiet():
        _write(w)
    size = Path(path).stat().st_size
    n_weights = sum(elements.values())
    report.update(tensors=dict(kinds), file_type=FILE_TYPES[elements.most_common(1)[0][0]] if elements else "ALL_F32")
    report.update(bytes=size, bits_per_weight=8 * size / n_weights if n_weights else 0.0)
    _warn(report)
    return report


def _warn(report: dict[str, Any]) -> None:
    """Say what the file does not hold exactly: scales fp16 cannot hold, the Q4_1 difference, notes."""
    for name, f in report["fp16_scales"].items():
        warn(
            f"gguf: {name}: {f['blocks']} block scale(s) are not fp16 values (smallest {f['smallest_scale']:.3g}); "
            f"rounded to fp16, they move weights by up to {f['max_weight_error']:.3g}"
        )
    if "q4_1" in report:
        q = report["q4_1"]
        warn(
            f"gguf: asymmetric int4 -> Q4_1 stores -zero*scale in fp16: weights differ from qtrain's by up to "
            f"{q['max_abs_diff']:.3g} ({100 * q['max_rel_diff']:.2f}% of a quantization step)"
        )
    for note in report["notes"]:
        warn(f"gguf: {note}")
