"""Model shapes, causality, KV-cache equivalence."""

from __future__ import annotations

import torch

from qtrain.config import ModelConfig
from qtrain.evaluate import generate_tokens
from qtrain.model import GPT, KVCache


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
