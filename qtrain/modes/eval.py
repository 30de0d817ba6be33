"""`mode=eval`: perplexity, size, decode and prefill speed of a checkpoint; `compare_to` adds KL/top-1."""

from __future__ import annotations

from typing import Any

from qtrain import checkpoint as ck
from qtrain import runtime
from qtrain.data import Corpus, val_starts
from qtrain.evaluate import compare, perplexity
from qtrain.model import GPT
from qtrain.modes import guards
from qtrain.modes.context import RunContext, announce, corpus_for, eval_fn_for
from qtrain.modes.loading import load_init, model_from_checkpoint
from qtrain.modes.results import base_report, benchmark
from qtrain.quant import autotune


def run_eval(ctx: RunContext) -> dict[str, Any]:
    """mode=eval: perplexity, size, decode and prefill speed; `compare_to` adds KL/top-1."""
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


def compared(ctx: RunContext, model: GPT, corpus: Corpus, compare_to: str) -> dict[str, Any]:
    """`compare_to`: the reference's perplexity, KL divergence and top-1 agreement on the same windows."""
    ref_path = ck.resolve_checkpoint(compare_to, "compare_to")
    guards.check_comparable(model.cfg, ref_path)  # before loading it
    ref_ckpt = ck.load_checkpoint(ref_path, with_trainer=False)
    ref = model_from_checkpoint(ref_ckpt, ctx.device, "reference")
    starts = val_starts(len(corpus.val), model.cfg.block_size, ctx.cfg.data.val_windows)
    cmp = compare(model, ref, corpus.val, starts, model.cfg.block_size)
    return {
        "reference_val_ppl": perplexity(cmp.reference_val_loss),
        "logit_kl": cmp.kl,
        "top1_agreement": cmp.top1_agreement,
    }
