"""GGUF export: read back with the ``gguf`` package (llama.cpp's reference reader and dequantizer).

Q4_0 and Q8_0 tensors must dequantize to qtrain's weights bit for bit, Q4_1 within its stated
bound, full-precision ones exactly (F32) or as the chosen rounding (F16/BF16). A numpy forward
pass written from llama.cpp's llama graph (RMSNorm, "norm" rope on adjacent pairs, GQA, SwiGLU)
over the dequantized GGUF tensors reproduces qtrain's logits, which is what pins the tensor
names, the q/k/v and gate/up splits and the rotary layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qtrain.config import ModelConfig, QuantConfig
from qtrain.errors import ConfigError
from qtrain.model import GPT
from qtrain.quant import QuantRecipe, set_kernel
from qtrain.tokenizer import Tokenizer, byte_tokenizer, train_bpe

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (pip install 'qtrain[export]')")

from qtrain.export import gguf_quant  # noqa: E402
from qtrain.export.gguf import write_gguf  # noqa: E402
from qtrain.export.gguf_vocab import DEAD_MERGE, byte_alphabet  # noqa: E402


def tiny(**overrides) -> GPT:
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, block_size=32, **overrides)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # non-trivial norms, so a swapped norm tensor would show
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
        for block in model.blocks:  # sharp attention, so positions (the rotary) matter to the logits
            block.attn.qkv.weight[: (cfg.n_head + cfg.kv_heads()) * cfg.head_size()] *= 20
    return model.eval()


def quantized(model: GPT, **quant) -> GPT:
    set_kernel(QuantRecipe.from_config(QuantConfig(**quant)).convert(model), "reference")
    return model


def export(model: GPT, tmp_path, float_type: str = "f32", tokenizer=None) -> tuple[dict, dict, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.gguf"
    report = write_gguf(model, {"name": "tiny"}, tokenizer or byte_tokenizer(), path, float_type)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return report, tensors, meta


def deq(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)


def qtrain_weights(model: GPT) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, from qtrain's own dequantization."""

    def w(mod) -> torch.Tensor:
        mod = mod.get_table() if hasattr(mod, "get_table") else mod
        return mod.dequantize() if hasattr(mod, "dequantize") else mod.weight.detach().float()

    cfg = model.cfg
    nq, nk, hd = cfg.n_head, cfg.kv_heads(), cfg.head_size()
    out = {"token_embd.weight": w(model.tok_emb), "output_norm.weight": model.norm.weight.detach()}
    if not cfg.tie_embeddings:
        out["output.weight"] = w(model.lm_head)
    for i, b in enumerate(model.blocks):
        qkv, gu = w(b.attn.qkv), w(b.mlp.gate_up)
        q, kv = nq * hd, nk * hd
        out |= {
            f"blk.{i}.attn_norm.weight": b.attn_norm.weight.detach(),
            f"blk.{i}.attn_q.weight": qkv[:q],
            f"blk.{i}.attn_k.weight": qkv[q : q + kv],
            f"blk.{i}.attn_v.weight": qkv[q + kv :],
            f"blk.{i}.attn_output.weight": w(b.attn.out),
            f"blk.{i}.ffn_norm.weight": b.mlp_norm.weight.detach(),
            f"blk.{i}.ffn_gate.weight": gu[: cfg.mlp_hidden],
            f"blk.{i}.ffn_up.weight": gu[cfg.mlp_hidden :],
            f"blk.{i}.ffn_down.weight": w(b.mlp.down),
        }
    return {k: v.float().numpy() for k, v in out.items()}


# -- llama.cpp's llama graph, in numpy (float64) ------------------------------------------------
def rope(x: np.ndarray, theta: float, factors: np.ndarray | float = 1.0, neox: bool = False) -> np.ndarray:
    """ggml rope over (T, H, D): "norm" rotates pairs (2j, 2j+1), "neox" pairs (j, j + D/2);
    frequency j is divided by ``factors[j]`` (``rope_freqs``, llama3 scaling)."""
    t, _, d = x.shape
    ang = np.arange(t)[:, None] * (theta ** (-np.arange(0, d, 2) / d) / factors)[None, :]  # (T, D/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = (x[..., : d // 2], x[..., d // 2 :]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return np.concatenate([ra, rb], -1) if neox else np.stack([ra, rb], -1).reshape(x.shape)


def reference_logits(t: dict[str, np.ndarray], meta: dict, ids: list[int], neox: bool = False) -> np.ndarray:
    eps, theta = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    nq, nk = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][ids]
    n = len(ids)
    for i in range(meta["llama.block_count"]):
        p = f"blk.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        q, k, v = (h @ t[p + f"attn_{s}.weight"].T + t.get(p + f"attn_{s}.bias", 0) for s in "qkv")
        q, k, v = q.reshape(n, nq, -1), k.reshape(n, nk, -1), v.reshape(n, nk, -1)
        factors = t.get("rope_freqs.weight", 1.0)
        q, k = rope(q, theta, factors, neox), rope(k, theta, factors, neox)
        rep = nq // nk  # llama.cpp: query head j reads kv head j // (nq / nk)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(n, -1) @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    return rms(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T


def assert_matches_reference(model: GPT, tensors: dict, meta: dict) -> None:
    ids = list(b"To be, or not to be: that is the question.")[:32]
    ref = reference_logits({k: deq(v).astype(np.float64).squeeze() for k, v in tensors.items()}, meta, ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]))[0].double().numpy()
    # qtrain runs in float32 (sums over K <= 128 per dot, softmax over <= 32 positions): ~1e-6 relative
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale
    # the control: the same tensors under the half-split ("neox") rotary give other logits
    neox = reference_logits({k: deq(v).astype(np.float64).squeeze() for k, v in tensors.items()}, meta, ids, True)
    assert np.abs(got - neox).max() > 100 * 1e-4 * scale


# -- tests -----------------------------------------------------------------------------------------
def test_full_precision_f32_exact_and_forward_matches(tmp_path) -> None:
    model = tiny(tie_embeddings=False)
    report, tensors, meta = export(model, tmp_path)
    want = qtrain_weights(model)
    assert set(tensors) == set(want)
    for name, w in want.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(deq(tensors[name]).reshape(w.shape), w)
    assert report["tensors"] == {"F32": len(want)} and report["file_type"] == "ALL_F32"
    assert_matches_reference(model, tensors, meta)


@pytest.mark.parametrize("float_type", ["f16", "bf16"])
def test_half_float_types_round_once(tmp_path, float_type) -> None:
    model = tiny()
    report, tensors, _ = export(model, tmp_path, float_type)
    dtype = torch.float16 if float_type == "f16" else torch.bfloat16
    for name, w in qtrain_weights(model).items():
        got = deq(tensors[name]).reshape(w.shape)
        expect = w if w.ndim == 1 else torch.from_numpy(w).to(dtype).float().numpy()  # 1-D stays F32
        np.testing.assert_array_equal(got, expect)
    assert report["file_type"] == {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}[float_type]


def test_metadata_matches_config(tmp_path) -> None:
    model = tiny()
    _, _, meta = export(model, tmp_path)
    cfg = model.cfg
    assert meta["general.architecture"] == "llama"
    expect = {
        "llama.block_count": cfg.n_layer,
        "llama.context_length": cfg.block_size,
        "llama.embedding_length": cfg.n_embd,
        "llama.feed_forward_length": cfg.mlp_hidden,
        "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.kv_heads(),
        "llama.rope.dimension_count": cfg.head_size(),
        "llama.vocab_size": cfg.vocab_size,
    }
    assert {k: meta[k] for k in expect} == expect
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert "output.weight" not in meta  # tied: llama.cpp reads token_embd as the output


@pytest.mark.parametrize("group", [32, 64, -1])
def test_int4_symmetric_is_q4_0_bit_exact(tmp_path, group) -> None:
    model = quantized(tiny(tie_embeddings=False), scheme="int4", group_size=group, lm_head=True, embeddings=True)
    report, tensors, meta = export(model, tmp_path)
    for name, w in qtrain_weights(model).items():
        if w.ndim == 2:
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.Q4_0, name
        np.testing.assert_array_equal(deq(tensors[name]).reshape(w.shape), w, err_msg=name)
    assert report["fp16_scales"] == {} and report["file_type"] == "MOSTLY_Q4_0"
    assert report["bits_per_weight"] < 6.0  # Q4_0 is 4.5 bits per weight, plus the F32 norms and metadata
    assert_matches_reference(model, tensors, meta)


def test_int8_is_q8_0_bit_exact_and_tied_head(tmp_path) -> None:
    model = quantized(tiny(), scheme="int8", lm_head=True, embeddings=True)
    report, tensors, meta = export(model, tmp_path)
    for name, w in qtrain_weights(model).items():
        if w.ndim == 2:
            assert tensors[name].tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        np.testing.assert_array_equal(deq(tensors[name]).reshape(w.shape), w, err_msg=name)
    assert "output.weight" not in tensors and report["tensors"]["Q8_0"] == 1 + 2 * 7
    assert_matches_reference(model, tensors, meta)


def test_fake_quant_model_exports_the_codes_it_trains_with(tmp_path) -> None:
    recipe = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32, lm_head=True))
    fake = recipe.prepare(tiny())
    _, fake_tensors, _ = export(fake, tmp_path / "fake")
    _, packed_tensors, _ = export(recipe.convert(fake), tmp_path / "packed")
    assert fake_tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    for name, t in packed_tensors.items():
        np.testing.assert_array_equal(np.asarray(fake_tensors[name].data), np.asarray(t.data), err_msg=name)


def test_int4_asymmetric_is_q4_1_within_bound(tmp_path) -> None:
    model = quantized(tiny(), scheme="int4", group_size=32, symmetric=False)
    report, tensors, _ = export(model, tmp_path)
    worst = 0.0
    for name, w in qtrain_weights(model).items():
        got = deq(tensors[name]).reshape(w.shape)
        if tensors[name].tensor_type != gguf.GGMLQuantizationType.Q4_1:
            np.testing.assert_array_equal(got, w)
            continue
        step = np.abs(w).max()  # no block scale exceeds its largest weight magnitude here (>= 15 steps)
        assert np.abs(got - w).max() <= gguf_quant.Q4_1_REL_BOUND * step
        worst = max(worst, float(np.abs(got - w).max()))
    q41 = report["q4_1"]
    assert q41["max_abs_diff"] == pytest.approx(worst, rel=1e-6)  # the report measures what the reader sees
    assert q41["max_rel_diff"] <= q41["bound_rel"] == 15 / 2048


def test_scale_outside_fp16_is_reported_not_hidden(tmp_path) -> None:
    model = quantized(tiny(), scheme="int4", group_size=32)
    down = model.blocks[0].mlp.down
    with torch.no_grad():
        down.scales[0, 0] = 3.0e-6  # bfloat16 value inside fp16's subnormals: fewer bits than bf16
    report, tensors, _ = export(model, tmp_path)
    entry = report["fp16_scales"]["blk.0.ffn_down.weight"]
    assert entry["blocks"] == 1 and 0 < entry["max_weight_error"] < 1e-6
    got = deq(tensors["blk.0.ffn_down.weight"])
    assert np.abs(got - down.dequantize().numpy()).max() == pytest.approx(entry["max_weight_error"], rel=1e-3)


def test_refuses_what_gguf_cannot_hold(tmp_path) -> None:
    model = quantized(tiny(), scheme="int4", group_size=16)
    with pytest.raises(ConfigError, match="group_size=16.*quant.group_size=32"):
        export(model, tmp_path)
    with pytest.raises(ConfigError, match="float_type"):
        export(tiny(), tmp_path, "f8")


def test_int8_activation_scheme_exports_weights_as_q4_0(tmp_path) -> None:
    model = quantized(tiny(), scheme="int8da_int4w", group_size=32)
    report, tensors, _ = export(model, tmp_path)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert any("activations" in n for n in report["notes"])


def test_byte_vocabulary_tokenizes_to_byte_ids(tmp_path) -> None:
    _, _, meta = export(tiny(), tmp_path)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(tokens) == 256 and len(set(tokens)) == 256
    assert meta["tokenizer.ggml.add_bos_token"] is False
    # llama.cpp's BPE: each byte becomes its alphabet character; the one merge needs two-char symbols
    assert merges == [DEAD_MERGE] and all(len(half) == 2 for half in DEAD_MERGE.split(" "))
    index = {t: i for i, t in enumerate(tokens)}
    text = "Ünïcode, tabs\tand\n newlines ▁ too".encode()
    assert [index[byte_alphabet()[b]] for b in text] == list(text)


def test_trained_bpe_vocabulary_encodes_the_same(tmp_path) -> None:
    tk = pytest.importorskip("tokenizers", reason="qtrain's BPE is trained with the tokenizers package")
    tok = train_bpe(b"the quick brown fox jumps over the lazy dog\n" * 40, 300, seed=0)
    _, _, meta = export(tiny(vocab_size=320), tmp_path, tokenizer=tok)
    tokens, types, merges = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and len(tokens) == 320 and merges
    assert tokens[-1] == "[PAD319]" and types[-1] == gguf.TokenType.UNUSED  # padded up to model.vocab_size
    # the GGUF's vocabulary and merges, as a byte-level BPE again, split text into qtrain's ids
    vocab = {t: i for i, t in enumerate(tokens[: tok.vocab_size])}
    again = tk.Tokenizer(tk.models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    again.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    text = "the lazy fox, jumping over 3 brown dogs."
    assert again.encode(text).ids == tok.encode(text)


def test_hf_tokenizer_pre_and_specials(tmp_path) -> None:
    tk = pytest.importorskip("tokenizers", reason="builds a Llama-3-style tokenizer.json")
    from qtrain.export.gguf_vocab import LLAMA3_SPLIT

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [tk.pre_tokenizers.Split(tk.Regex(LLAMA3_SPLIT), behavior="isolated"),
         tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok.decoder = tk.decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = tk.trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials
    )
    tok.train_from_iterator(["hello world, hello llama " * 30], trainer)
    tok.post_processor = tk.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id(specials[0]))]
    )
    config = json.dumps({"eos_token": {"content": "<|end_of_text|>"}}).encode()
    hf = Tokenizer("hf", tok.to_str().encode(), {"tokenizer_config.json": config})
    _, _, meta = export(tiny(vocab_size=hf.vocab_size), tmp_path, tokenizer=hf)
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.bos_token_id"] == tok.token_to_id(specials[0])
    assert meta["tokenizer.ggml.eos_token_id"] == tok.token_to_id(specials[1])
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.token_type"][tok.token_to_id(specials[1])] == gguf.TokenType.CONTROL


def test_gqa_head_dim_bias_llama3_rope_forward_matches(tmp_path) -> None:
    model = tiny(n_kv_head=2, head_dim=32, attn_bias=True, tie_embeddings=False, rope_scaling="llama3",
                 rope_original_context=32)  # fmt: skip
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_()
    model = quantized(model, scheme="int4", group_size=32)
    _, tensors, meta = export(model, tmp_path)
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.attention.key_length"] == 32
    assert "blk.0.attn_k.bias" in tensors and "blk.1.attn_v.bias" in tensors
    factors = deq(tensors["rope_freqs.weight"]).ravel()
    assert factors.shape == (16,) and factors.min() == 1.0 and factors.max() == 8.0  # kept .. interpolated .. slowed
    assert ((factors > 1) & (factors < 8)).any()
    assert_matches_reference(model, tensors, meta)


def test_qk_norm_refused_naming_hf(tmp_path) -> None:
    with pytest.raises(ConfigError, match="export.format=hf"):
        export(tiny(qk_norm=True), tmp_path)


# -- through the CLI ---------------------------------------------------------------------------------
def _export_cli(init_from: str, tmp_path) -> tuple[dict, dict, dict]:
    from qtrain.cli import main

    out = tmp_path / "model.gguf"
    main(["mode=export", "export.format=gguf", f"init_from={init_from}", f"out={out}", f"hydra.run.dir={tmp_path}/r"])
    report = json.loads((tmp_path / "r" / "report.json").read_text())["export"]
    reader = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return report, {t.name: t for t in reader.tensors}, meta


@pytest.mark.integration
def test_cli_exports_a_checkpoint_bit_exact(tmp_path) -> None:
    from qtrain.checkpoint.load import build_model, load_checkpoint

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "v3_int4"  # format 3: migrated on load
    report, tensors, _ = _export_cli(str(fixture), tmp_path)
    model = build_model(load_checkpoint(fixture, with_trainer=False), torch.device("cpu"), "reference")
    for name, w in qtrain_weights(model).items():
        np.testing.assert_array_equal(deq(tensors[name]).reshape(w.shape), w, err_msg=name)
    assert report["tensors"]["Q4_0"] == 7 and report["fp16_scales"] == {}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "llama3_rope"])
def test_imported_hf_model_runs_the_llama_graph_like_transformers(tmp_path, name) -> None:
    """Hugging Face (half-split rotary) -> qtrain (adjacent pairs) -> GGUF: llama.cpp's graph gives HF's logits."""
    pytest.importorskip("transformers", reason="transformers builds the model to import (test-only dependency)")
    from tests.hf_models import make

    hf = make(name, tmp_path / "hf")
    report, tensors, meta = _export_cli(f"hf:{tmp_path / 'hf'}", tmp_path)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and report["tensors"]["F32"] == len(tensors)
    ids = list(range(3, 40, 2))
    ref = reference_logits({k: deq(v).astype(np.float64).squeeze() for k, v in tensors.items()}, meta, ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].double().numpy()
    # transformers runs in float32 (dots over K <= 96, 19 positions): ~1e-6 relative
    assert np.abs(want - ref).max() <= 1e-4 * np.abs(ref).max()
