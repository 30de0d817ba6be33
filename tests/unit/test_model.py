"""Model shapes, causality, KV-cache equivalence; grouped-query attention, biases, q/k norms, llama3 rope."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qtrain.config import ModelConfig
from qtrain.evaluate import generate_tokens
from qtrain.model import GPT, KVCache, rope_tables
from tests.numerics import assert_close_across_cpus


def _model(**kw) -> GPT:
    m = GPT(ModelConfig(**kw))
    m.init_weights(0)
    return m.eval()


def test_shapes_and_tied_weights() -> None:
    m = _model()
    x = torch.randint(0, 256, (3, 17))
    assert m(x).shape == (3, 17, 256)
    assert m.lm_head.weight is m.tok_emb.weight
    untied = _model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_causal_future_tokens_never_change_earlier_logits() -> None:
    m = _model()
    x = torch.randint(0, 256, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_kv_cache_matches_full_recompute() -> None:
    m = _model()
    x = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = m(x)
        cache = KVCache.empty(m.cfg, 2, torch.device("cpu"), torch.float32)
        parts = [m(x[:, :10], cache, 0), m(x[:, 10:13], cache, 10)]
        parts += [m(x[:, i : i + 1], cache, i) for i in range(13, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_decode_step_equals_the_cached_forward() -> None:
    from qtrain import quant as api
    from qtrain.config import QuantConfig

    base = _model()
    packed = api.convert(_model(), QuantConfig(scheme="int4", group_size=32)).eval()
    for m, dtype in ((base, torch.float32), (packed, torch.float32), (_model().to(torch.bfloat16), torch.bfloat16)):
        x = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            c1, c2 = (KVCache.empty(m.cfg, 2, torch.device("cpu"), dtype) for _ in range(2))
            m(x[:, :8], c1, 0)
            m(x[:, :8], c2, 0)
            for i in range(8, 12):
                ref = m(x[:, i : i + 1], c1, i)[:, -1]
                got = m.decode_step(x[:, i : i + 1], c2, i)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(c2.k[:, :, :, :12], c1.k[:, :, :, :12], rtol=tol, atol=tol)
    try:
        base.decode_step(torch.zeros(1, 1, dtype=torch.long), KVCache.empty(base.cfg, 1, torch.device("cpu"),
                         torch.float32), base.cfg.block_size)
    except ValueError as err:
        assert "block_size" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_greedy_generation_with_cache_equals_recompute() -> None:
    m = _model()
    prompt = torch.randint(0, 256, (1, 8))
    out = generate_tokens(m, prompt, 20, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, m(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_generation_beyond_context_slides() -> None:
    m = _model(block_size=16)
    out = generate_tokens(m, torch.randint(0, 256, (1, 4)), 40, temperature=1.0, top_k=10, seed=0)
    assert out.shape == (1, 44)


def test_too_long_input_is_a_clear_error() -> None:
    m = _model(block_size=16)
    try:
        m(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as err:
        assert "model.block_size=16" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_dtype_casts_keep_the_complex_rope_table() -> None:
    """`.to(bfloat16)` must not drop the rotations' sine half; meta-built models get a real table."""
    m = _model()
    x = torch.randint(0, 256, (1, 20))
    b = GPT(m.cfg)
    b.load_state_dict(m.state_dict())
    b = b.to(torch.bfloat16)
    assert b.rope.dtype == torch.complex64 and torch.equal(b.rope, m.rope)
    with torch.no_grad():
        torch.testing.assert_close(b(x).float(), m(x), atol=0.05, rtol=0.05)
    meta = GPT(m.cfg).to("meta")
    assert meta.rope.is_meta and torch.equal(meta.to_empty(device="cpu").rope, m.rope)


# ---------------------------------------------------------------- GQA, biases, q/k norms, llama3 rope

SHAPES = {
    "gqa": dict(n_head=4, n_kv_head=2),
    "mqa, wide heads": dict(n_embd=64, n_head=4, n_kv_head=1, head_dim=32, mlp_hidden=160),
    "qwen2 biases, untied": dict(n_head=4, n_kv_head=2, attn_bias=True, tie_embeddings=False, vocab_size=300),
    "qwen3 q/k norms": dict(n_embd=64, n_head=4, n_kv_head=2, head_dim=24, qk_norm=True, norm_eps=1e-6),
    "llama3 rope": dict(n_head=4, n_kv_head=2, rope_scaling="llama3", rope_theta=5e5, rope_original_context=32),
}
ALL = dict(n_embd=64, n_head=4, n_kv_head=2, head_dim=24, attn_bias=True, qk_norm=True, rope_scaling="llama3",
           rope_original_context=32, tie_embeddings=False)


def _wide(seed: int = 0, **kw) -> GPT:
    """A model whose logits are far from uniform: weights scaled up, biases and norm weights random."""
    m = GPT(ModelConfig(n_layer=2, block_size=48, **kw))
    m.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(4)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return m.eval()


def _inv_freq(cfg: ModelConfig) -> list[float]:
    """Rotary frequencies in float64, llama3 scaling written out per frequency (Meta's reference)."""
    d = cfg.head_size()
    inv = [1.0 / cfg.rope_theta ** (i / d) for i in range(0, d, 2)]
    if cfg.rope_scaling != "llama3":
        return inv
    old, low, high, factor = (cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                              cfg.rope_factor)  # fmt: skip
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _reference(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same model written independently in float64: separate q/k/v heads, k/v head h // group
    for query head h, adjacent-pair rotation with cos/sin, explicit causal softmax attention."""
    cfg = model.cfg
    nq, nk, d, c = cfg.n_head, cfg.kv_heads(), cfg.head_size(), cfg.n_embd
    w = {k: v.double() for k, v in model.state_dict().items()}
    w.setdefault("lm_head.weight", w["tok_emb.weight"])
    t = idx.shape[1]

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    ang = torch.arange(t, dtype=torch.float64)[:, None] * torch.tensor(_inv_freq(cfg), dtype=torch.float64)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, D/2)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)

    x = w["tok_emb.weight"][idx]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        qkv = h @ w[p + "attn.qkv.weight"].T + (w[p + "attn.qkv.bias"] if cfg.attn_bias else 0)
        q = qkv[..., : nq * d].unflatten(-1, (nq, d))
        k = qkv[..., nq * d : (nq + nk) * d].unflatten(-1, (nk, d))
        v = qkv[..., (nq + nk) * d :].unflatten(-1, (nk, d))
        if cfg.qk_norm:
            q, k = rms(q, w[p + "attn.q_norm.weight"]), rms(k, w[p + "attn.k_norm.weight"])
        q, k = rotate(q), rotate(k)
        heads = []
        for hq in range(nq):
            hk = hq // (nq // nk)
            scores = (q[:, :, hq] @ k[:, :, hk].transpose(1, 2)) / math.sqrt(d)
            heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, hk])
        x = x + torch.cat(heads, -1) @ w[p + "attn.out.weight"].T
        gate, up = (rms(x, w[p + "mlp_norm.weight"]) @ w[p + "mlp.gate_up.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down.weight"].T
    assert x.shape[-1] == c
    return rms(x, w["norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("name", [*SHAPES, "all"])
def test_parameters_follow_the_shared_layout(name: str) -> None:
    cfg = ModelConfig(**(ALL if name == "all" else SHAPES[name]))
    nq, nk, d, c = cfg.n_head, cfg.kv_heads(), cfg.head_size(), cfg.n_embd
    shapes = {n: tuple(p.shape) for n, p in GPT(cfg).named_parameters()}
    assert shapes["blocks.0.attn.qkv.weight"] == ((nq + 2 * nk) * d, c)
    assert shapes["blocks.0.attn.out.weight"] == (c, nq * d)
    assert shapes["blocks.0.mlp.gate_up.weight"] == (2 * cfg.mlp_hidden, c)
    assert shapes.get("blocks.0.attn.qkv.bias") == (((nq + 2 * nk) * d,) if cfg.attn_bias else None)
    assert shapes.get("blocks.0.attn.q_norm.weight") == ((d,) if cfg.qk_norm else None)
    assert shapes.get("blocks.0.attn.k_norm.weight") == ((d,) if cfg.qk_norm else None)
    assert ("lm_head.weight" in shapes) == (not cfg.tie_embeddings)  # tied: one parameter
    from qtrain.modes import memory

    m = GPT(cfg)
    assert memory.n_params(cfg) == m.n_params()
    linears = [mod for n, mod in m.named_modules() if n.endswith(("qkv", "out", "gate_up", "down"))]
    assert memory.block_linear_params(cfg) == sum(mod.weight.numel() for mod in linears)


def test_default_shape_keeps_the_legacy_names_shapes_and_init() -> None:
    """Defaults build today's model: the same parameters in the same order, the same seeded init
    (the checkpoint fixtures check the logits of models trained before format 4)."""
    m = _model()
    legacy = [("tok_emb.weight", (256, 96))]
    for i in range(2):
        names = ("attn_norm", "attn.qkv", "attn.out", "mlp_norm", "mlp.gate_up", "mlp.down")
        shapes = ((96,), (288, 96), (96, 96), (96,), (512, 96), (96, 256))
        legacy += [(f"blocks.{i}.{n}.weight", s) for n, s in zip(names, shapes, strict=True)]
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters()] == legacy + [("norm.weight", (96,))]
    gen = torch.Generator().manual_seed(0)
    first = torch.randn((256, 96), generator=gen) * 0.02  # the first parameter drawn, as before format 4
    assert torch.equal(m.tok_emb.weight, first)
    assert KVCache.empty(m.cfg, 3, torch.device("cpu"), torch.float32).k.shape == (2, 3, 4, 128, 24)


@pytest.mark.parametrize("name", [*SHAPES, "all"])
def test_forward_equals_an_independent_float64_reference(name: str) -> None:
    m = _wide(**(ALL if name == "all" else SHAPES[name]))
    idx = torch.randint(0, m.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, ref = m(idx), _reference(m, idx)
    # float32 against float64: the summation-order bound of tests/numerics.py, plus the q/k norms' stage.
    cfg = m.cfg
    longest = max(cfg.n_embd, cfg.mlp_hidden, cfg.block_size, cfg.n_head * cfg.head_size())
    assert_close_across_cpus(got, ref.float(), longest, 7 * cfg.n_layer + 1)


@pytest.mark.parametrize("name", [*SHAPES, "all"])
def test_cached_chunks_and_decode_step_equal_the_full_forward(name: str) -> None:
    m = _wide(**(ALL if name == "all" else SHAPES[name]))
    cfg = m.cfg
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    caches = [KVCache.empty(cfg, 2, torch.device("cpu"), torch.float32) for _ in range(2)]
    assert caches[0].k.shape == caches[0].v.shape == (cfg.n_layer, 2, cfg.kv_heads(), cfg.block_size, cfg.head_size())
    with torch.no_grad():
        full = m(x)
        chunks = [m(x[:, :10], caches[0], 0), m(x[:, 10:13], caches[0], 10)]
        chunks += [m(x[:, i : i + 1], caches[0], i) for i in range(13, 24)]
        m(x[:, :10], caches[1], 0)
        steps = [m.decode_step(x[:, i : i + 1], caches[1], i) for i in range(10, 24)]
    scale = float(full.abs().max())
    # float32, the same math in another grouping of ops: a few ulps of the largest logit per reduction stage
    tol = 1e-6 * max(1.0, scale) * (6 * cfg.n_layer + 1)
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=tol)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 10:], rtol=0, atol=tol)
    torch.testing.assert_close(caches[1].k[:, :, :, :24], caches[0].k[:, :, :, :24], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("packed", [False, True], ids=["float", "int4"])
def test_static_decoder_handles_gqa_biases_and_qk_norms(packed: bool) -> None:
    from qtrain import quant
    from qtrain.config import QuantConfig
    from qtrain.fastdecode import FastDecoder

    m = _wide(**ALL)
    if packed:  # the bias stays float beside the int4 codes; the static step must add it once
        m = quant.convert(m, QuantConfig(scheme="int4", group_size=32, kernel="reference")).eval()
    prompt = torch.randint(0, m.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = KVCache.empty(m.cfg, 1, torch.device("cpu"), torch.float32)
        logits, ref, ref_logits = m(prompt, cache, 0)[:, -1], [], []
        for pos in range(6, 18):
            ref.append(int(logits.argmax()))
            logits = m.decode_step(torch.tensor([[ref[-1]]]), cache, pos)
            ref_logits.append(logits)
        dec = FastDecoder(m, prompt, max_len=40)
        got, got_logits = [], []
        for _ in range(12):
            got.append(int(dec.step()))
            got_logits.append(dec.logits.clone())
    assert dec.cache.k.shape == (2, 1, 2, 64 if m.cfg.block_size >= 64 else m.cfg.block_size, 24)
    torch.testing.assert_close(torch.cat(got_logits), torch.cat(ref_logits), rtol=1e-5, atol=1e-4)
    assert got == ref


def test_llama3_rope_matches_transformers() -> None:
    pytest.importorskip("transformers", reason="transformers is an optional (hf extra) dependency")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qtrain.model import model_rope

    cfg = ModelConfig(n_embd=64, n_head=2, head_dim=48, block_size=64, rope_theta=5e5, rope_scaling="llama3",
                      rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_context=64)
    params = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
              "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
              "original_max_position_embeddings": cfg.rope_original_context}  # fmt: skip
    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=48, max_position_embeddings=64,
                     rope_parameters=params)  # fmt: skip
    inv, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert scaling == 1.0
    ours = model_rope(cfg)  # (T, D/2) complex
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv)
    # The same float32 operations in the same order (transformers' _compute_llama3_parameters): one ulp
    # of the angle's cos/sin at most.
    torch.testing.assert_close(ours, torch.polar(torch.ones_like(angles), angles), rtol=0, atol=1e-6)
    # and the scaling did something: high frequencies kept, low ones divided by the factor
    plain = rope_tables(48, 64, 5e5)
    assert torch.equal(ours[:, 0], plain[:, 0]) and not torch.allclose(ours[:, -1], plain[:, -1])
    torch.testing.assert_close(torch.tensor(_inv_freq(cfg), dtype=torch.float32), inv, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        (dict(n_head=4, n_kv_head=3), "model.n_kv_head"),
        (dict(n_head=4, n_kv_head=0), "model.n_kv_head"),
        (dict(head_dim=25), "model.head_dim"),
        (dict(rope_scaling="yarn"), "model.rope_scaling"),
        (dict(rope_scaling="llama3", rope_high_freq_factor=1.0), "model.rope_high_freq_factor"),
        (dict(rope_scaling="llama3", rope_factor=0.5), "model.rope_factor"),
    ],
)
def test_config_rules_name_the_attention_key(changes: dict, key: str) -> None:
    from qtrain.config import RunConfig
    from qtrain.config_rules import validate

    problems = validate(RunConfig(model=ModelConfig(**changes)))
    assert [p for p in problems if p.startswith(key + ":")], problems
    assert validate(RunConfig(model=ModelConfig(**SHAPES["qwen3 q/k norms"]))) == []
