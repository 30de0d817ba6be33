"""compressed-tensors export: transformers loads it as a quantized model and computes qtrain's logits.

The proof runs the real loader: ``AutoModelForCausalLM.from_pretrained`` on CPU in float32 must
hold compressed modules (int32 ``weight_packed``, no float ``weight``) before its first forward,
then decompress them to exactly qtrain's dequantized weights and produce qtrain's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain.config import ModelConfig, QuantConfig
from qtrain.errors import ConfigError
from qtrain.export.compressed import pack_int32, write_compressed
from qtrain.export.hf import float_state
from qtrain.hf.weights import to_hf
from qtrain.model import GPT
from qtrain.quant import QuantRecipe, set_kernel
from qtrain.tokenizer import Tokenizer, byte_tokenizer

ct = pytest.importorskip("compressed_tensors", reason="the proof loads the export through compressed-tensors")
transformers = pytest.importorskip("transformers", reason="the proof loads the export with transformers")

CPU = torch.device("cpu")
LOGIT_TOL = 1e-4
"""Bit-identical weights on both sides; the float32 forward passes differ only in operation order
(rotary form, attention kernel, norm), which moves logits of magnitude ~1-10 by ~1e-6."""


def tiny(**overrides: Any) -> GPT:
    """A byte-level qtrain model with sharp attention (so the rotary layout shows in the logits)."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, block_size=32, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for block in model.blocks:
            block.attn.qkv.weight[: (cfg.n_head + cfg.kv_heads()) * cfg.head_size()] *= 20
    return model.eval()


def quantize(model: GPT, manifest: dict[str, Any] | None = None, **quant: Any) -> tuple[GPT, dict[str, Any]]:
    recipe = QuantRecipe.from_config(QuantConfig(kernel="reference", **quant))
    set_kernel(recipe.quantize(model, "rtn"), "reference")
    return model, {**(manifest or {}), "quant": recipe.manifest_section(model, "rtn")}


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (GQA: 4 query heads, 2 key/value heads; q/k/v biases; tied) saved by transformers."""
    from tests.hf_models import make

    path = tmp_path_factory.mktemp("hf") / "qwen2_bias"
    make("qwen2_bias", path, seed=1)
    return path


def imported(path: Path) -> tuple[GPT, dict[str, Any], Tokenizer]:
    from qtrain.hf.load import load_hf
    from qtrain.tokenizer import load_tokenizer_dir

    source, model = load_hf(path, CPU)
    return model.eval(), source.manifest, load_tokenizer_dir(path)


def load_quantized(out: Path, quantized: dict[str, int], head_quantized: bool) -> Any:
    """transformers' model of ``out``, checked to hold compressed modules (before any forward)."""
    from compressed_tensors.quantization import QuantizationStatus

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    modules = dict(hf.named_modules())
    for name, bits in quantized.items():
        mod, params = modules[name], dict(modules[name].named_parameters())
        assert "weight" not in params and params["weight_packed"].dtype == torch.int32, name
        assert params["weight_packed"].shape[1] * 32 // bits == params["weight_shape"].tolist()[1], name
        assert mod.quantization_status == QuantizationStatus.COMPRESSED, name
        assert mod.quantization_scheme.weights.num_bits == bits, name
    head = dict(hf.lm_head.named_parameters())
    assert ("weight_packed" in head) is head_quantized and ("weight" in head) is not head_quantized
    return hf


def check_export(
    model: GPT, manifest: dict[str, Any], tok: Tokenizer, out: Path, case: str, bits: int
) -> dict[str, Any]:
    """Export, load in transformers, check it is compressed, compare weights (exact) and logits (``LOGIT_TOL``)."""
    report = write_compressed(model, manifest, tok, out, "f32")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    ct.quantization.QuantizationConfig.model_validate(config)  # the package's own schema accepts it
    with torch.no_grad():
        expected, cfg = float_state(model)
    modules = {k.removesuffix(".weight") for k in to_hf(expected, cfg) if k.endswith("_proj.weight")}
    hf = load_quantized(out, dict.fromkeys(modules, bits), "lm_head" not in config["ignore"])
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    state = hf.state_dict()  # decompressed by the first forward
    for name, w in to_hf(expected, replace_tied(cfg, report)).items():
        assert torch.equal(state[name], w), name  # every dequantized weight bit for bit
    diff = (ours - theirs).abs().max().item()
    print(f"\n{case}: max |logit difference| {diff:.3g} (logits up to {ours.abs().max().item():.3g})")
    assert diff < LOGIT_TOL
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    return report


def replace_tied(cfg: ModelConfig, report: dict[str, Any]) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, tie_embeddings=report["tied"])


def test_int4_group32_tied_byte_model(tmp_path: Path) -> None:
    model, manifest = quantize(tiny(), scheme="int4", group_size=32)
    report = check_export(model, manifest, byte_tokenizer(), tmp_path / "out", "byte int4 g32", 4)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and config["quantization_config"]["ignore"] == ["lm_head"]
    assert group["weights"] == {**group["weights"], "num_bits": 4, "strategy": "group", "group_size": 32,
                                "symmetric": True, "type": "int"}  # fmt: skip
    assert report["tied"] and config["tie_word_embeddings"] and report["quantized_layers"] == 2 * 7
    assert config["qtrain"]["quantized"] == "int4 group 32"
    assert (tmp_path / "out" / "tokenizer.json").is_file() and not list(tmp_path.glob(".tmp*"))


def test_int8_per_channel_gqa_with_quantized_head(tmp_path: Path) -> None:
    model, manifest = quantize(tiny(n_kv_head=2, tie_embeddings=False), scheme="int8", lm_head=True)
    report = check_export(model, manifest, byte_tokenizer(), tmp_path / "out", "byte GQA int8 + head", 8)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == [] and report["schemes"] == ["int8 per channel"]
    assert config["config_groups"]["group_0"]["weights"]["strategy"] == "channel"


def test_imported_qwen2_gqa_bias_int4(qwen2_dir: Path, tmp_path: Path) -> None:
    model, manifest, tok = imported(qwen2_dir)
    model, manifest = quantize(model, manifest, scheme="int4", group_size=32)
    report = check_export(model, manifest, tok, tmp_path / "out", "qwen2 GQA+bias int4 g32", 4)
    assert report["model_type"] == "qwen2" and report["tied"]


def test_imported_qwen2_tied_quantized_head_and_embedding_untie(qwen2_dir: Path, tmp_path: Path) -> None:
    model, manifest, tok = imported(qwen2_dir)
    model, manifest = quantize(model, manifest, scheme="int4", group_size=-1, lm_head=True, embeddings=True)
    report = check_export(model, manifest, tok, tmp_path / "out", "qwen2 int4 per channel + head + embedding", 4)
    assert not report["tied"] and any("embedding" in n for n in report["notes"])


def test_mixed_schemes_get_one_config_group_each(tmp_path: Path) -> None:
    from qtrain.quant.packed import Int8Linear
    from qtrain.quant.spec import LayerSpec

    model, manifest = quantize(tiny(tie_embeddings=False), scheme="int4", group_size=32)
    head = Int8Linear.from_float(model.lm_head.weight.detach(), LayerSpec("int8", bits=8), kernel="reference")
    model.lm_head = head  # an 8-bit head next to 4-bit blocks (checkpoints may mix per layer)
    out = tmp_path / "out"
    report = write_compressed(model, manifest, byte_tokenizer(), out, "f32")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(report["schemes"]) == ["int4 group 32", "int8 per channel"] and len(groups) == 2
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert by_bits[8] == ["lm_head"] and len(by_bits[4]) == 2 * 7 and "Linear" not in by_bits[4]
    hf = load_quantized(out, {"lm_head": 8, "model.layers.1.mlp.up_proj": 4}, True)
    x = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    print(f"\nint4 g32 blocks + int8 head: max |logit difference| {diff:.3g}")
    assert diff < LOGIT_TOL


def test_pack_int32_is_compressed_tensors_packing() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(0)
    for bits, cols in ((4, 36), (4, 64), (8, 6), (8, 32)):
        values = torch.randint(0, 1 << bits, (5, cols), generator=gen)
        signed = (values - (1 << (bits - 1))).to(torch.int8)
        ours = pack_int32(values, bits)
        assert ours.dtype == torch.int32 and torch.equal(ours, pack_to_int32(signed, bits))
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size([5, cols])), signed)


@pytest.mark.parametrize(
    ("quant", "match"),
    [
        ({"scheme": "int4", "group_size": 32, "symmetric": False}, "quant.symmetric=true"),
        ({"scheme": "int8da_int4w", "group_size": 32}, "export.format=gguf"),
        ({}, "export.format=hf"),
    ],
)
def test_schemes_it_cannot_hold_are_refused(tmp_path: Path, quant: dict[str, Any], match: str) -> None:
    model, manifest = quantize(tiny(), **quant) if quant else (tiny(), {"quant": None})
    with pytest.raises(ConfigError, match=match):
        write_compressed(model, manifest, byte_tokenizer(), tmp_path / "out", "f32")
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites(tmp_path: Path) -> None:
    model, manifest = quantize(tiny(), scheme="int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        write_compressed(model, manifest, byte_tokenizer(), tmp_path / "taken", "f32")
    with pytest.raises(ConfigError, match="export.float_type"):
        write_compressed(model, manifest, byte_tokenizer(), tmp_path / "new", "f8")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and list((tmp_path / "taken").iterdir()) == []


@pytest.mark.integration
def test_cli_exports_a_checkpoint_and_refuses_asymmetric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qtrain import api
    from qtrain.checkpoint.load import build_model, load_checkpoint
    from qtrain.cli import main

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "v3_int4"
    out = tmp_path / "ct"
    main(["mode=export", "export.format=compressed-tensors", f"init_from={fixture}", f"out={out}",
          f"hydra.run.dir={tmp_path}/r"])  # fmt: skip
    report = json.loads((tmp_path / "r" / "report.json").read_text())["export"]
    assert report["format"] == "compressed-tensors" and report["schemes"] == ["int4 group 32"]
    model = build_model(load_checkpoint(fixture, with_trainer=False), CPU, "reference").eval()
    hf = load_quantized(out, {"model.layers.0.mlp.down_proj": 4}, False)
    x = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    print(f"\ncli v3_int4: max |logit difference| {diff:.3g}")
    assert diff < LOGIT_TOL
    asym, _ = quantize(tiny(), scheme="int4", group_size=32, symmetric=False)
    ckpt = api.save(asym, tmp_path / "asym", quant=QuantRecipe.from_config(QuantConfig(scheme="int4", symmetric=False)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["mode=export", "export.format=compressed-tensors", f"init_from={ckpt}", f"out={tmp_path / 'x'}",
              f"hydra.run.dir={tmp_path}/r2"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "quant.symmetric=true" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
