"""Export to Hugging Face: HF -> qtrain -> HF is bit-exact; transformers loads every export; quantized = dequantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from qtrain.config import ModelConfig, QuantConfig
from qtrain.errors import ConfigError
from qtrain.export.hf import write_hf
from qtrain.hf.load import load_hf
from qtrain.model import GPT
from qtrain.quant.recipe import QuantRecipe
from qtrain.tokenizer import byte_tokenizer, load_tokenizer_dir
from tests.hf_models import MODELS, make

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    pytest.importorskip("transformers", reason="transformers loads the exports (test-only dependency)")
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, make(name, root / name, seed=1)) for name in MODELS}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


def _export(path: Path, out: Path, float_type: str = "f32") -> tuple[dict[str, Any], GPT, dict[str, Any]]:
    source, model = load_hf(path, CPU)
    report = write_hf(model, source.manifest, load_tokenizer_dir(path), out, float_type)
    return report, model, source.manifest


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(
    hf_dirs: dict[str, tuple[Path, Any]], tmp_path: Path, name: str
) -> None:
    from transformers import AutoModelForCausalLM

    path, ref = hf_dirs[name]
    report, _, _ = _export(path, tmp_path / "out")
    before, after = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref) and report["model_type"] == ref.config.model_type
    x = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)  # the same weights through the same code


def test_bf16_model_round_trips_in_bf16(hf_dirs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    path, ref = hf_dirs["mistral_mqa"]
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # how real checkpoints are stored
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    ref.float()
    report, model, _ = _export(tmp_path / "bf16", tmp_path / "out", "bf16")
    assert next(model.parameters()).dtype == torch.float32 and report["float_type"] == "bf16"
    before, after = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], t) for k, t in before.items())


def test_quantized_model_exports_its_dequantized_weights(hf_dirs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path, _ = hf_dirs["qwen2_bias"]
    source, model = load_hf(path, CPU)
    recipe = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32, kernel="reference"))
    recipe.quantize(model, "rtn")
    manifest = {**source.manifest, "quant": recipe.manifest_section(model, "rtn")}
    report = write_hf(model, manifest, load_tokenizer_dir(path), tmp_path / "q", "f32")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert report["dequantized_from"] == config["qtrain"]["dequantized_from"] == "int4 group 32"
    assert "dequantized" in (tmp_path / "q" / "README.md").read_text()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    x = torch.randint(0, model.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), back(x).logits
    # reference kernel: dequantize + float32 matmul, as transformers does with the exported weights
    assert (ours - theirs).abs().max().item() < 1e-5


def test_byte_level_qtrain_model_exports_as_llama(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers loads the export (test-only dependency)")
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=32, mlp_hidden=64)
    model = GPT(cfg).eval()
    model.init_weights(0)
    report = write_hf(model, {"quant": None}, byte_tokenizer(), tmp_path / "b", "bf16")
    assert report["model_type"] == "llama" and report["tied"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16 and "lm_head.weight" not in f.keys()  # noqa: SIM118 - not a dict
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "b" / "tokenizer.json"))
    assert tok("hello é", add_special_tokens=False)["input_ids"] == list("hello é".encode())
    model_bf16 = GPT(cfg).eval()
    model_bf16.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # bf16-rounded weights on both sides, float32 compute: only summation order differs
        assert (model_bf16(x) - back(x).logits).abs().max().item() < 1e-4


def test_export_never_overwrites(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, mlp_hidden=32))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        write_hf(model, {}, byte_tokenizer(), tmp_path / "taken", "f32")
    assert list((tmp_path / "taken").iterdir()) == []
    with pytest.raises(ConfigError, match="export.float_type"):
        write_hf(model, {}, byte_tokenizer(), tmp_path / "new", "f8")
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_python_api_loads_quantizes_saves_and_exports(hf_dirs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    from qtrain import api
    from qtrain.checkpoint import verify_checkpoint

    path, ref = hf_dirs["llama_gqa"]
    model, tok = api.load_model(path, block_size=32)
    assert tok.kind == "hf" and model.cfg.block_size == 32 and model.cfg.kv_heads() == 2
    ids = torch.tensor([tok.encode("ROMEO: what light through yonder window")[:16]])
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < 1e-5  # as test_hf_import's bound
    recipe = api.recipe("int4", group_size=32, kernel="reference")
    api.quantize(model, recipe, "gptq", calib=[torch.randint(0, model.cfg.vocab_size, (2, 32))])
    ckpt = api.save(model, tmp_path / "run", tok, recipe, method="gptq")
    manifest = verify_checkpoint(ckpt)
    assert manifest["quant"]["method"] == "gptq" and manifest["imported_from"]["model_type"] == "llama"
    again, tok2 = api.load_model(tmp_path / "run", kernel="reference")
    assert tok2.sha256 == tok.sha256
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))  # the same packed codes, the same reference kernel
    report = api.export_hf(again, tmp_path / "hf_out", tok2)
    assert report["dequantized_from"] == "int4 group 32"
    fresh, _ = api.load_model(tmp_path / "hf_out")  # a directory with config.json: Hugging Face
    with torch.no_grad():
        assert (fresh(ids) - again(ids)).abs().max().item() < 1e-5
    trainable = api.prepare_qat(api.load_model(path, block_size=32)[0].train(), api.recipe("int4"))
    loss = trainable(ids).logsumexp(-1).mean()
    loss.backward()
    assert api.convert(trainable, api.recipe("int4")) is trainable
