"""`mode=eval`: perplexity, size, decode and prefill speed of a checkpoint; `compare_to` adds KL/top-1."""

from __future__ import annotations

from typing import Any

import torch

from qtrain import runtime
from qtrain.data import Corpus, val_starts
from qtrain.errors import ConfigError
from qtrain.evaluate import compare, perplexity
from qtrain.export import llamacpp
from qtrain.model import GPT
from qtrain.modes.context import RunContext, announce, corpus_for, eval_fn_for, val_bpb
from qtrain.modes.loading import load_init, load_reference
from qtrain.modes.results import base_report, benchmark
from qtrain.quant import autotune
from qtrain.tokenizer import byte_tokenizer, tokenizer_from_manifest


def run_eval(ctx: RunContext) -> dict[str, Any]:
    """mode=eval: perplexity, size, decode and prefill speed; `compare_to` adds KL/top-1."""
    if ctx.cfg.backend == "llamacpp":
        return run_eval_llamacpp(ctx)
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    corpus = corpus_for(ctx, model.cfg.block_size)
    vloss = eval_fn_for(ctx, corpus, model.cfg.block_size)(model)
    report = base_report(ctx, model, ckpt.manifest["step"], vloss, ckpt.path, ckpt.manifest.get("quant"))
    load_before = runtime.load_average()
    report.update(benchmark(model, ctx.cfg.eval))
    if "bench_s" in report:  # speeds were measured: say whether they can be trusted, and which kernels ran
        report.update(runtime.speed_conditions(load_before))  # `threads` itself: every report (dispatch.run)
        report.update({"kernels": autotune.decisions()} if autotune.decisions() else {})
    if ctx.cfg.compare_to:
        report.update(compared(ctx, model, corpus, ctx.cfg.compare_to))
    return report


def run_eval_llamacpp(ctx: RunContext) -> dict[str, Any]:
    """mode=eval backend=llamacpp: the same figures, computed by llama.cpp from the checkpoint's GGUF export."""
    llamacpp.llama_cpp()  # installed? (exit 2 naming the extra) before anything is loaded
    if ctx.cfg.compare_to:
        raise ConfigError("compare_to: backend=llamacpp does not compare with a reference; use backend=qtrain")
    ckpt, model = load_init(ctx)
    announce(ctx, ckpt)
    block = model.cfg.block_size
    corpus = corpus_for(ctx, block)
    eval_fn_for(ctx, corpus, block)  # the same windows; sets the tokens per byte of val_bpb
    starts = val_starts(len(corpus.val), block, ctx.cfg.data.val_windows)
    with llamacpp.gguf_file(model, ckpt.manifest, ctx.tokenizer or byte_tokenizer()) as (path, exported):
        runner = llamacpp.LlamaCppModel(path, block, model.cfg.vocab_size, torch.get_num_threads())
        try:
            vloss = llamacpp.val_loss(runner, corpus.val, starts, block)
            report = base_report(ctx, model, ckpt.manifest["step"], vloss, ckpt.path, ckpt.manifest.get("quant"))
            report.update(llamacpp.export_summary(exported))
            load_before = runtime.load_average()
            report.update(llamacpp.benchmark(runner, model.cfg.vocab_size, ctx.cfg.eval))
        finally:
            runner.close()
    if "bench_s" in report:
        report.update(runtime.speed_conditions(load_before))
    return report


def compared(ctx: RunContext, model: GPT, corpus: Corpus, compare_to: str) -> dict[str, Any]:
    """`compare_to`: the reference's perplexity, KL divergence and top-1 agreement on the same windows."""
    ref_ckpt, ref = load_reference(ctx, model.cfg, compare_to)  # a checkpoint, a run dir or hf:DIR
    ref_path = ref_ckpt.path
    ref_tok = tokenizer_from_manifest(ref_ckpt.manifest, ref_path)
    if ctx.tokenizer is not None and ref_tok.sha256 != ctx.tokenizer.sha256:
        raise ConfigError(
            f"compare_to: {ref_path} uses the tokenizer {ref_tok.describe()}, the evaluated model "
            f"{ctx.tokenizer.describe()}: the reference must score the same token windows"
        )
    starts = val_starts(len(corpus.val), model.cfg.block_size, ctx.cfg.data.val_windows)
    cmp = compare(model, ref, corpus.val, starts, model.cfg.block_size)
    return {
        "reference_val_ppl": perplexity(cmp.reference_val_loss),
        "reference_val_bpb": val_bpb(ctx, cmp.reference_val_loss),
        "logit_kl": cmp.kl,
        "top1_agreement": cmp.top1_agreement,
    }
