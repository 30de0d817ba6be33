"""`mode=generate`: sample text from any checkpoint."""

from __future__ import annotations

import time
from typing import Any

from qtrain.console import console, printable, rank
from qtrain.evaluate import generate
from qtrain.export import llamacpp
from qtrain.modes.context import RunContext, announce
from qtrain.modes.loading import load_init
from qtrain.tokenizer import byte_tokenizer


def run_generate(ctx: RunContext) -> dict[str, Any]:
    """mode=generate: sample text from any checkpoint."""
    if ctx.cfg.backend == "llamacpp":
        llamacpp.llama_cpp()  # installed? (exit 2 naming the extra) before anything is loaded
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    g = ctx.cfg.generate
    if ctx.cfg.backend == "llamacpp":  # llama.cpp's logits from the GGUF export, qtrain's sampler
        text = llamacpp.generate(model, ckpt.manifest, ctx.tokenizer or byte_tokenizer(), g, ctx.cfg.seed)
    else:
        text = generate(model, g.prompt, g.max_new_tokens, g.temperature, g.top_k, ctx.cfg.seed, ctx.tokenizer)
    if rank() == 0:
        console.print(printable(text), markup=False)  # model output: control bytes shown escaped
    return {
        "mode": "generate",
        "prompt": g.prompt,
        "text": text,
        "checkpoint": str(ctx.cfg.init_from),
        "elapsed_s": round(time.perf_counter() - ctx.t0, 3),
    }
