"""Run a qtrain checkpoint's GGUF export in llama.cpp itself and compare it with qtrain (issue 15, item 4).

    python scripts/llamacpp_check.py CKPT_OR_RUN_DIR [--windows N] [--kv-type f16|f32] [--out FILE.json]

Exports the checkpoint with ``qtrain mode=export export.format=gguf`` into a temporary
directory, loads the file with ``llama_cpp.Llama`` (llama-cpp-python; n_ctx = the model's
block size, all logits, 2 threads) and feeds it token ids directly, then prints:

- tokenizer: whether llama.cpp's tokenizer gives qtrain's ids for a sample text;
- prompt: on the first validation window, the largest |logit difference| between llama.cpp and
  qtrain's packed model (``quant.kernel=reference``) and the share of positions whose top-1
  tokens are equal;
- validation: perplexity through llama.cpp and qtrain's ``val_ppl`` (``qtrain.evaluate.val_loss``,
  in this process) over the same windows (``qtrain.data.val_starts`` with the checkpoint's block
  size and ``data.val_windows`` unless ``--windows``), their relative difference, and the top-1
  agreement and largest logit difference over all those windows.

llama.cpp quantizes activations to Q8_0 (blocks of 32) before its Q4_0/Q8_0 CPU matmuls and
keeps its KV cache in F16 by default (``--kv-type f32`` to remove that part), so the logits
differ from qtrain's float32 activations by a little even though the weights are bit-exact.
``--model-q8-activations --kv-type f32`` rounds qtrain's inputs to those layers the same way,
which leaves only summation-order differences: it shows where the rest comes from.

Exit status 0 when top-1 agreement >= 99% on the validation windows and the perplexities are
within 0.5%; 1 when not; 2 for a usage problem (llama-cpp-python missing, bad arguments);
3 for a checkpoint that does not load or export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from qtrain import checkpoint as ck
from qtrain.config import DataConfig
from qtrain.console import console, error, info, warn
from qtrain.data import load_corpus, val_starts, windows
from qtrain.errors import CheckpointError, ConfigError
from qtrain.evaluate import val_loss
from qtrain.model import GPT
from qtrain.modes.loading import model_from_checkpoint
from qtrain.quant.packed import PackedLinear
from qtrain.tokenizer import Tokenizer, tokenizer_from_manifest

TOP1_MIN, PPL_REL_MAX = 0.99, 0.005
"""Acceptance: top-1 agreement on the validation windows, relative perplexity difference."""
SAMPLE = "ROMEO:\nBut soft, what light through yonder window breaks?\n\tÜnïcode — “quotes”, tabs and  spaces ▁.\n"
KV_TYPES = {"f16": 1, "f32": 0}
"""``--kv-type`` -> ggml type id (GGML_TYPE_F16 = 1, GGML_TYPE_F32 = 0); llama.cpp's default is F16."""


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("llama_cpp is not installed: pip install llama-cpp-python (builds llama.cpp)") from None
    return llama_cpp


def export_gguf(ckpt: Path, out: Path) -> dict[str, Any]:
    """``qtrain mode=export export.format=gguf`` in a child process; returns its report's ``export`` section.

    Raises:
        CheckpointError: the export failed (its last output lines are in the message).
    """
    run_dir = out.parent / "export_run"
    cmd = [sys.executable, "-m", "qtrain", "mode=export", "export.format=gguf", f"init_from={ckpt}",
           f"out={out}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if res.returncode != 0:
        raise CheckpointError(f"{ckpt}: export to GGUF failed (exit {res.returncode}): {res.stderr[-1500:]}")
    return dict(json.loads((run_dir / "report.json").read_text())["export"])


def load_llama(path: Path, n_ctx: int, kv_type: str, threads: int) -> Any:
    """The GGUF file in llama.cpp: every position's logits kept, the KV cache in ``kv_type``."""
    kv = KV_TYPES[kv_type]
    return _llama_cpp().Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
        n_threads=threads, n_threads_batch=threads, type_k=kv, type_v=kv, verbose=False,
    )  # fmt: skip


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, vocab) for ``ids`` from an empty KV cache (float64)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def tokenizer_agrees(llm: Any, tok: Tokenizer, text: str) -> tuple[bool, int]:
    """Whether llama.cpp tokenizes ``text`` (no BOS, no special-token parsing) into qtrain's ids; (equal, count)."""
    mine = tok.encode(text)
    theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    return theirs == mine, len(mine)


def prompt_figures(model: GPT, llm: Any, ids: list[int]) -> dict[str, float]:
    """The fixed prompt's figures: max |logit difference|, top-1 agreement, qtrain's largest |logit|."""
    theirs = llama_logits(llm, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    return {"max_abs_logit_diff": float(np.abs(theirs - ours).max()),
            "top1_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
            "logit_range": float(np.abs(ours).max())}  # fmt: skip


def compare_windows(model: GPT, llm: Any, tokens: torch.Tensor, starts: torch.Tensor, block: int) -> dict[str, Any]:
    """llama.cpp vs qtrain on the windows at ``starts``: llama.cpp's mean NLL, top-1 agreement, max |dlogit|."""
    nll, agree, n, worst = 0.0, 0, 0, 0.0
    for i in range(0, len(starts), 32):
        x, y = windows(tokens, starts[i : i + 32], block)
        with torch.no_grad():
            ours = model(x).double().numpy()
        for j in range(x.shape[0]):
            theirs = llama_logits(llm, x[j].tolist())
            nll += float(F.cross_entropy(torch.from_numpy(theirs), y[j].long(), reduction="sum"))
            same = theirs.argmax(-1) == ours[j].argmax(-1)
            agree, n = agree + int(same.sum()), n + len(same)
            worst = max(worst, float(np.abs(theirs - ours[j]).max()))
    return {"llamacpp_loss": nll / n, "top1_agreement": agree / n, "max_abs_logit_diff": worst}


def q8_0_rounding(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A forward pre-hook: the input rounded as llama.cpp's ``quantize_row_q8_0`` does before a Q4_0/Q8_0 matmul.

    Blocks of 32 along the last dimension: d = amax / 127 (stored as fp16), q = round(x / d).
    """
    x = args[0]
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    return ((q * d.half().float()).reshape(x.shape), *args[1:])


def model_q8_0_activations(model: GPT) -> int:
    """Hook :func:`q8_0_rounding` on every packed linear layer (those GGUF holds as Q4_0/Q8_0); returns how many."""
    mods = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in mods:
        m.register_forward_pre_hook(q8_0_rounding)
    return len(mods)


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Export, load in llama.cpp, compare; returns every figure printed."""
    path = ck.resolve_checkpoint(args.ckpt, "CKPT")
    ckpt = ck.load_checkpoint(path, with_trainer=False)
    manifest = ckpt.manifest
    tok = tokenizer_from_manifest(manifest, path)
    model = model_from_checkpoint(ckpt, torch.device("cpu"), "reference").eval()
    block = model.cfg.block_size
    hooked = model_q8_0_activations(model) if args.model_q8_activations else 0
    data = DataConfig(**{k: v for k, v in manifest["config"]["data"].items() if k in DataConfig.__dataclass_fields__})
    n_windows = data.val_windows if args.windows is None else args.windows
    corpus = load_corpus(data, block, tok)
    starts = val_starts(len(corpus.val), block, n_windows)
    with tempfile.TemporaryDirectory(prefix="llamacpp_check_") as tmp:
        gguf_path = Path(tmp) / "model.gguf"
        export = export_gguf(path, gguf_path)
        llm = load_llama(gguf_path, block, args.kv_type, args.threads)
        tok_ok, tok_n = tokenizer_agrees(llm, tok, SAMPLE)
        prompt = prompt_figures(model, llm, corpus.val[:block].tolist())
        cmp = compare_windows(model, llm, corpus.val, starts, block)
        del llm  # frees llama.cpp's context before the file goes
    qtrain_ppl = math.exp(val_loss(model, corpus.val, starts, block))
    llama_ppl = math.exp(cmp["llamacpp_loss"])
    return {"checkpoint": str(path), "file_type": export["file_type"], "bits_per_weight": export["bits_per_weight"],
            "gguf_bytes": export["bytes"], "kv_type": args.kv_type, "q8_0_activations_modelled": hooked,
            "windows": len(starts), "block_size": block,
            "tokenizer_equal": tok_ok, "tokenizer_sample_tokens": tok_n, "prompt": prompt,
            "top1_agreement": cmp["top1_agreement"], "max_abs_logit_diff": cmp["max_abs_logit_diff"],
            "llamacpp_ppl": llama_ppl, "qtrain_ppl": qtrain_ppl, "ppl_rel_diff": llama_ppl / qtrain_ppl - 1,
            "report_val_ppl": _report_ppl(path)}  # fmt: skip


def _report_ppl(ckpt: Path) -> float | None:
    """``val_ppl`` of the run's report.json next to the checkpoints (None when there is none)."""
    report = ckpt.parent.parent / "report.json"
    try:
        return float(json.loads(report.read_text())["val_ppl"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def show(r: dict[str, Any]) -> None:
    """The figures as one table."""
    t = Table(title=f"llama.cpp vs qtrain: {r['checkpoint']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    p = r["prompt"]
    rows = [
        ("GGUF", f"{r['file_type']}, {r['gguf_bytes']} bytes, {r['bits_per_weight']:.3f} bits/weight"),
        ("llama.cpp KV cache", r["kv_type"]),
        ("qtrain: llama.cpp's Q8_0 activation rounding modelled", f"{r['q8_0_activations_modelled']} layers"),
        ("tokenizer: llama.cpp ids == qtrain ids", f"{r['tokenizer_equal']} ({r['tokenizer_sample_tokens']} tokens)"),
        ("prompt (val window 0): max |logit diff|",
         f"{p['max_abs_logit_diff']:.4f} (logits up to {p['logit_range']:.1f})"),
        ("prompt (val window 0): top-1 equal", f"{100 * p['top1_agreement']:.2f}%"),
        (f"{r['windows']} val windows x {r['block_size']}: max |logit diff|", f"{r['max_abs_logit_diff']:.4f}"),
        (f"{r['windows']} val windows: top-1 equal", f"{100 * r['top1_agreement']:.3f}%"),
        ("ppl llama.cpp", f"{r['llamacpp_ppl']:.5f}"),
        ("ppl qtrain (packed, reference kernel" + (", Q8_0 inputs)" if r["q8_0_activations_modelled"] else ")"),
         f"{r['qtrain_ppl']:.5f}"),
        ("relative difference", f"{100 * r['ppl_rel_diff']:+.4f}%"),
        ("report.json val_ppl", "-" if r["report_val_ppl"] is None else f"{r['report_val_ppl']:.5f}"),
    ]  # fmt: skip
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint directory or run directory")
    ap.add_argument("--windows", type=int, default=None,
                    help="validation windows (default: the checkpoint's data.val_windows; -1 all)")  # fmt: skip
    ap.add_argument("--kv-type", choices=sorted(KV_TYPES), default="f16", help="llama.cpp KV cache type")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-q8-activations", action="store_true",
                    help="round qtrain's inputs to its Q4_0/Q8_0 layers as llama.cpp does (Q8_0 blocks): "
                    "shows what is left of the difference; use with --kv-type f32")  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    if args.windows is not None and (args.windows == 0 or args.windows < -1):
        error(f"--windows={args.windows}: must be > 0 or -1 (all)")
        sys.exit(2)
    torch.set_num_threads(args.threads)
    try:
        _llama_cpp()
        r = check(args)
    except ConfigError as err:
        error(str(err))
        sys.exit(2)
    except CheckpointError as err:
        error(str(err))
        sys.exit(3)
    show(r)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
        info(f"wrote {args.out}")
    failed = []
    if r["top1_agreement"] < TOP1_MIN:
        failed.append(f"top-1 agreement {100 * r['top1_agreement']:.3f}% < {100 * TOP1_MIN:.0f}% (llama.cpp rounds "
                      "activations to Q8_0 before Q4_0/Q8_0 matmuls: --model-q8-activations --kv-type f32 shows "
                      "how much of the difference that is)")  # fmt: skip
    if abs(r["ppl_rel_diff"]) > PPL_REL_MAX:
        failed.append(f"perplexities {100 * r['ppl_rel_diff']:+.3f}% apart (bound {100 * PPL_REL_MAX:.1f}%)")
    for msg in failed:
        warn(msg)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
