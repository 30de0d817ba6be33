"""llama.cpp itself (through llama-cpp-python) runs qtrain's Q4_0 GGUF export like qtrain's packed model.

A seeded int4 g32 model (``QuantRecipe``, reference kernel) is written with ``write_gguf`` and
loaded by ``llama_cpp.Llama``; token ids go in directly. The weights are bit-exact (the
``gguf`` read-back tests prove it), so what differs is how llama.cpp computes: its CPU matmul
rounds every activation row to Q8_0 (8 bits per block of 32, step amax/127) before a Q4_0
product, and its KV cache is F16. Measured here (AVX2, 2 threads) that moves the logits by at
most ~2% of the largest logit (0.07 of 3.97) and the perplexity by ~0.03%; the bound is 5%.
For the tinyshakespeare QAT checkpoint (``scripts/llamacpp_check.py``) the same comparison
gives at most 4% (0.84 of 20.6) over 111k positions. A control writes the classic mistake,
q/k rows in Hugging Face's half-split order, and must fail the same bounds (~40% of the
largest logit, perplexity ~2% off): the test can tell a right file from a wrong one.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain.config import ModelConfig, QuantConfig
from qtrain.data import pydocs_text
from qtrain.model import GPT
from qtrain.quant import QuantRecipe, set_kernel
from qtrain.tokenizer import byte_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install llama-cpp-python)")
pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (pip install 'qtrain[export]')")

from qtrain.export.gguf import write_gguf  # noqa: E402

pytestmark = pytest.mark.integration

BLOCK, N_WINDOWS = 64, 8
LOGIT_BOUND = 0.05
"""Largest |llama.cpp - qtrain| logit as a share of qtrain's largest |logit| (measured ~0.017, see above)."""
PPL_BOUND = 0.005
"""The issue's acceptance: perplexities within 0.5%."""


def seeded_model() -> GPT:
    """A 2-layer byte model with sharp attention (so positions, the rotary, matter) and decisive logits."""
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, block_size=BLOCK)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    qk = (cfg.n_head + cfg.kv_heads()) * cfg.head_size()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:qk] *= 20  # sharp attention: a wrong rotary moves the logits a lot
            block.attn.out.weight *= 2
            block.mlp.down.weight *= 2
        model.tok_emb.weight *= 3  # logits a few units apart: top-1 is not decided by rounding noise
    return model.eval()


def half_split_qk(model: GPT) -> GPT:
    """The classic export mistake: each q/k head's rows in Hugging Face's half-split (neox) order."""
    bad = copy.deepcopy(model)
    cfg = model.cfg
    hd = cfg.head_size()
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    rows = torch.cat([h * hd + perm for h in range(cfg.n_head + cfg.kv_heads())])
    with torch.no_grad():
        for block in bad.blocks:
            w = block.attn.qkv.weight
            w[: len(rows)] = w[rows].clone()
    return bad


def int4_g32(model: GPT) -> GPT:
    packed = QuantRecipe.from_config(QuantConfig(scheme="int4", group_size=32)).convert(model)
    set_kernel(packed, "reference")
    return packed.eval()


def llama_logits(path, windows: torch.Tensor) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=BLOCK, n_batch=BLOCK, n_ubatch=BLOCK, logits_all=True,
                          n_threads=2, verbose=False)  # fmt: skip
    out = []
    for ids in windows.tolist():
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:BLOCK], dtype=np.float64))
    sample = "Ünïcode,\ttabs  x".encode()
    assert llm.tokenize(sample, add_bos=False, special=False) == list(sample)  # the byte vocabulary: byte ids
    return np.stack(out)


def ppl(logits: np.ndarray, targets: torch.Tensor) -> float:
    return math.exp(float(F.cross_entropy(torch.from_numpy(logits).flatten(0, 1), targets.flatten().long())))


def test_llamacpp_runs_the_q4_0_export_like_qtrain(tmp_path) -> None:
    text = torch.tensor(list(pydocs_text().encode("utf-8")[: 40 * BLOCK * N_WINDOWS]))
    starts = torch.arange(N_WINDOWS) * 37 * BLOCK
    x = torch.stack([text[s : s + BLOCK] for s in starts])
    y = torch.stack([text[s + 1 : s + BLOCK + 1] for s in starts])
    model = seeded_model()
    bad = int4_g32(half_split_qk(model))
    model = int4_g32(model)
    for name, m in (("good", model), ("bad", bad)):
        write_gguf(m, {"name": name}, byte_tokenizer(), tmp_path / f"{name}.gguf", "f32")
    with torch.no_grad():
        ours = model(x).double().numpy()
    scale = np.abs(ours).max()

    got = llama_logits(tmp_path / "good.gguf", x)
    assert (got.argmax(-1) == ours.argmax(-1)).mean() >= 0.99
    assert np.abs(got - ours).max() <= LOGIT_BOUND * scale
    assert abs(ppl(got, y) / ppl(ours, y) - 1) < PPL_BOUND

    wrong = llama_logits(tmp_path / "bad.gguf", x)  # the control: the same bounds catch a wrong rotary layout
    assert np.abs(wrong - ours).max() > 4 * LOGIT_BOUND * scale
    assert abs(ppl(wrong, y) / ppl(ours, y) - 1) > PPL_BOUND
