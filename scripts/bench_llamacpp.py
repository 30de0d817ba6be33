"""Batch-1 greedy decode: qtrain's own kernels against llama.cpp on the same model, same machine (CPU).

Not a test. One random-weight GPT of the ``model=base`` shape (12 layers, width 1024, 16 heads,
SwiGLU 2048, byte vocabulary, context 1024) is quantized with ``QuantRecipe(...).quantize(m, "rtn")``
to int4 (symmetric, group 32) and int8 (per channel), exported losslessly with
``qtrain.export.gguf.write_gguf`` (int4 g32 -> Q4_0, int8 -> Q8_0, fp32 -> F32), and decoded:

- qtrain: :class:`qtrain.evaluate.GreedyDecoder` (the loop ``qtrain mode=eval`` times), its own
  CPU kernels (``quant.kernel=auto``);
- llama.cpp: the GGUF file through llama-cpp-python
  (:class:`qtrain.export.llamacpp.LlamaCppModel`, what ``mode=eval backend=llamacpp`` runs).

Both start from the same 16-token prompt; each repeat decodes ``--tokens`` tokens greedily,
the two backends **alternating per repeat** (and the order flipping every repeat), so machine
noise hits both alike; the first pass is warm-up; the table shows the median over repeats.
Every thread count in ``--threads`` is run in turn (``torch.set_num_threads`` and llama.cpp's
``n_threads``). The header gives the CPU (model name; avx2 / avx512 / amx flags) and the copy
bandwidth measured in the same run.

Usage:
    python scripts/bench_llamacpp.py --out bench_out/llamacpp.json
    python scripts/bench_llamacpp.py --layers 2 --tokens 16 --repeats 1     # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import copy_bandwidth
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qtrain.config import ModelConfig, QuantConfig
from qtrain.errors import ConfigError
from qtrain.evaluate import GreedyDecoder
from qtrain.export import llamacpp
from qtrain.export.gguf import write_gguf
from qtrain.model import GPT
from qtrain.quant.recipe import QuantRecipe
from qtrain.tokenizer import byte_tokenizer

console = Console(width=160)
SCHEMES: dict[str, QuantConfig | None] = {
    "int4": QuantConfig(scheme="int4", group_size=32),
    "int8": QuantConfig(scheme="int8"),
    "fp32": None,
}
"""qtrain scheme -> its recipe (``None``: the full-precision model); exported as Q4_0 / Q8_0 / F32."""


def cpu_kind() -> dict[str, Any]:
    """The CPU's model name and its vector-extension flags (from /proc/cpuinfo)."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
    return {"model": name, "flags": [f for f in wanted if f in flags]}


def build(cfg: ModelConfig, seed: int) -> dict[str, GPT]:
    """The random fp32 model and its rtn-quantized copies, per :data:`SCHEMES`."""
    fp = GPT(cfg)
    fp.init_weights(seed)
    fp.eval()
    models: dict[str, GPT] = {}
    for name, qcfg in SCHEMES.items():
        if qcfg is None:
            models[name] = fp
        else:
            models[name] = QuantRecipe.from_config(qcfg).quantize(copy.deepcopy(fp), "rtn").eval()  # type: ignore[assignment]
    return models


def time_qtrain(dec: GreedyDecoder, n_tokens: int) -> float:
    """tokens/s of one greedy pass from the prompt."""
    with torch.inference_mode():
        dec.reset()
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            dec.step()
        return n_tokens / (time.perf_counter() - t0)


def time_llama(runner: llamacpp.LlamaCppModel, prompt: list[int], n_tokens: int) -> float:
    """tokens/s of one greedy pass from the prompt (the prompt's prefill untimed, as qtrain's)."""
    logits = runner.start(prompt)[-1]
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = runner.step(int(logits.argmax()))
    return n_tokens / (time.perf_counter() - t0)


def run_threads(models: dict[str, GPT], files: dict[str, Path], threads: int, args: argparse.Namespace) -> list[dict]:
    """Interleaved qtrain / llama.cpp decode of every scheme at ``threads`` threads."""
    torch.set_num_threads(threads)
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, model in models.items():
        runner = llamacpp.LlamaCppModel(files[name], model.cfg.block_size, model.cfg.vocab_size, threads)
        with torch.inference_mode():
            dec = GreedyDecoder(model, prompt)
        rates: dict[str, list[float]] = {"qtrain": [], "llamacpp": []}
        for r in range(args.repeats + 1):
            order = ["qtrain", "llamacpp"] if r % 2 == 0 else ["llamacpp", "qtrain"]
            for backend in order:
                if backend == "qtrain":
                    rate = time_qtrain(dec, args.tokens)
                else:
                    rate = time_llama(runner, prompt[0].tolist(), args.tokens)
                if r > 0:  # the first pass is warm-up
                    rates[backend].append(rate)
        runner.close()
        q, lc = statistics.median(rates["qtrain"]), statistics.median(rates["llamacpp"])
        rows.append(
            {
                "scheme": name,
                "gguf": GGUF_TYPE[name],
                "threads": threads,
                "qtrain_tokens_per_s": q,
                "llamacpp_tokens_per_s": lc,
                "llamacpp_over_qtrain": lc / q,
                "repeats": rates,
            }
        )
        console.print(f"  threads={threads} {name}: qtrain {q:.1f} tok/s, llama.cpp {lc:.1f} tok/s")
    return rows


GGUF_TYPE = {"int4": "Q4_0", "int8": "Q8_0", "fp32": "F32"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, quantize, export, then time every thread count."""
    llamacpp.llama_cpp()  # installed? (a clear message otherwise)
    cfg = ModelConfig(
        name="base",
        n_layer=args.layers,
        n_embd=args.width,
        n_head=16,
        block_size=1024,
        mlp_hidden=2 * args.width,
        vocab_size=256,
    )
    info: dict[str, Any] = {"cpu": cpu_kind(), "copy_bandwidth_gb_s": copy_bandwidth(),
                            "llama_cpp_python": llamacpp.version(), "torch": torch.__version__,
                            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                                      "mlp_hidden": cfg.mlp_hidden, "vocab_size": cfg.vocab_size},
                            "tokens": args.tokens, "repeats": args.repeats}  # fmt: skip
    models = build(cfg, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        files = {}
        for name, model in models.items():
            files[name] = Path(tmp) / f"{name}.gguf"
            rep = write_gguf(model, {"name": f"base-{name}"}, byte_tokenizer(), files[name], "f32")
            info.setdefault("bits_per_weight", {})[GGUF_TYPE[name]] = rep["bits_per_weight"]
        before = os.getloadavg()[0]
        rows = [row for t in args.threads for row in run_threads(models, files, t, args)]
    load = {"before": before, "after": os.getloadavg()[0], "cores": os.cpu_count()}
    return {**info, "load_average": load, "rows": rows}


def show(result: dict[str, Any]) -> None:
    """The side-by-side table."""
    cpu = result["cpu"]
    load = result["load_average"]
    title = escape(
        f"batch-1 greedy decode, {result['model']['n_layer']} layers x {result['model']['n_embd']}, "
        f"{cpu['model']} [{' '.join(cpu['flags'])}], copy {result['copy_bandwidth_gb_s']:.1f} GB/s, "
        f"load average {load['before']:.1f} -> {load['after']:.1f}"
    )
    table = Table(title=title)
    for col in ("qtrain scheme", "GGUF", "threads", "qtrain tok/s", "llama.cpp tok/s", "llama.cpp / qtrain"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["scheme"],
            r["gguf"],
            str(r["threads"]),
            f"{r['qtrain_tokens_per_s']:.1f}",
            f"{r['llamacpp_tokens_per_s']:.1f}",
            f"{r['llamacpp_over_qtrain']:.2f}x",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to run (default 1 2)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per repeat (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    ap.add_argument("--layers", type=int, default=12, help="layers (default 12, the base shape)")
    ap.add_argument("--width", type=int, default=1024, help="model width (default 1024, the base shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except ConfigError as err:
        console.print(f"error: {err}", markup=False)
        return 2
    show(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
