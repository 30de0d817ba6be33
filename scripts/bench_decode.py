"""End-to-end batch-1 greedy decode and 512-token prefill speed per quantization scheme (CPU).

Not a test. One random-weight full-precision GPT (default: the ``model=base`` shape, 12
layers, width 1024, context 512) is turned into every scheme with
``qtrain.quant.convert`` (bf16 is a plain ``.to(torch.bfloat16)`` copy), then:

- decode: each scheme runs its own :class:`qtrain.evaluate.GreedyDecoder` (the loop that
  ``qtrain mode=eval`` times) from the same 16-token prompt; the schemes advance **one token at
  a time in rotating order**, so machine noise hits all of them alike. tokens/s per repeat =
  new tokens / summed step times; the table shows the median over repeats and a "best" rate
  from the per-position minimum over repeats (robust on a shared machine);
- prefill: one forward over a 512-token prompt (no cache), interleaved likewise, median;
- the memory-bandwidth bound: copy bandwidth measured in the same run (read + write bytes /
  time) over the bytes of weights one decode step reads (packed int4 counted in the CPU
  kernel's layout: codes plus a bf16 scale and offset per group). KV-cache reads are left
  out of the bound.

Usage:
    python scripts/bench_decode.py --out bench_out/decode.json
    python scripts/bench_decode.py --tokens 64 --repeats 2 --schemes fp32 int4    # quick look
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import copy_bandwidth, run_and_report
from rich.console import Console
from rich.table import Table
from torch import nn

from qtrain import quant as api
from qtrain.config import ModelConfig, QuantConfig
from qtrain.evaluate import GreedyDecoder
from qtrain.model import GPT
from qtrain.quant.packed import Int4Linear, Int8Linear, PackedLinear, kernel_group

console = Console(width=180)
SCHEMES: dict[str, QuantConfig | None] = {
    "fp32": None,
    "bf16": None,
    "int8": QuantConfig(scheme="int8"),
    "int4": QuantConfig(scheme="int4", group_size=32),
    "int8da_int4w": QuantConfig(scheme="int8da_int4w", group_size=32),
    "int4_bf16": QuantConfig(scheme="int4", group_size=32),
    "int8_torch": QuantConfig(scheme="int8", kernel="torch"),
    "int4_torch": QuantConfig(scheme="int4", group_size=32, kernel="torch"),
}
"""``int4_bf16`` (opt-in): packed int4 with the rest of the model in bf16 (activations, norms,
KV cache, head), as a bf16 model quantized for inference would run. ``*_torch``: the same
packed weights through PyTorch's own CPU kernels (``quant.kernel=torch``), for comparison."""
DEFAULT_SCHEMES = ["fp32", "bf16", "int8", "int4", "int8da_int4w", "int8_torch", "int4_torch"]
ACCEPT = {"int4": 3.0, "int8": 2.3}
"""Decode speed-up over fp32 each scheme must reach (issue 6)."""
PREFILL_ACCEPT = 1.3
"""Packed int4 prefill time may be at most this multiple of fp32's."""




def module_bytes(mod: nn.Module) -> int:
    """Bytes of weights one decode step reads from a linear-like module.

    int4 is counted as the CPU kernel reads it (N padded to 16, a bf16 scale and a bf16
    offset per group); int8 as codes plus one bf16 scale per row.
    """
    if isinstance(mod, Int4Linear):
        n, k = mod.out_features + (-mod.out_features % 16), mod.in_features
        group = kernel_group(mod.spec, k) or k
        return n * k // 2 + (k // group) * n * 4
    if isinstance(mod, Int8Linear):
        return mod.out_features * mod.in_features + mod.out_features * 2
    assert isinstance(mod, nn.Linear)
    return mod.weight.numel() * mod.weight.element_size()


def weight_bytes_per_token(model: GPT) -> int:
    """Linear weights + norm weights + one embedding row, as read by one decode step."""
    total = sum(module_bytes(m) for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear)))
    total += sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.RMSNorm))
    emb = model.tok_emb
    if isinstance(emb, nn.Embedding):
        total += emb.weight.shape[1] * emb.weight.element_size()
    return total


def build_models(cfg: ModelConfig, schemes: list[str], seed: int) -> dict[str, GPT]:
    """One random fp32 model and its conversions, in the order asked."""
    fp = GPT(cfg)
    fp.init_weights(seed)
    fp.eval()
    models: dict[str, GPT] = {}
    for name in schemes:
        qcfg = SCHEMES[name]
        if name == "fp32":
            models[name] = fp
        elif name == "bf16":
            models[name] = copy.deepcopy(fp).to(torch.bfloat16)
        else:
            assert qcfg is not None
            models[name] = api.convert(copy.deepcopy(fp), qcfg).eval()  # type: ignore[assignment]
            if name.endswith("_bf16"):
                models[name] = models[name].to(torch.bfloat16)
    return models


def time_decode(
    models: dict[str, GPT], n_tokens: int, repeats: int, prompt_len: int, chain_every: int = 0
) -> dict[str, Any]:
    """Interleaved decode: per scheme, per repeat, per position step seconds.

    With ``chain_every > 0``, every that many positions each scheme's :func:`linear_chain`
    is timed too, in the same rotation, so step and chain times see the same machine load.
    """
    prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    names = list(models)
    steps: dict[str, list[list[float]]] = {n: [] for n in names}
    chain_times: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        decs = {n: GreedyDecoder(m, prompt) for n, m in models.items()}
        chains = {n: linear_chain(m) for n, m in models.items()} if chain_every > 0 else {}
        for r in range(repeats + 1):
            warm = r == 0
            count = min(16, n_tokens) if warm else n_tokens
            for d in decs.values():
                d.reset()
            run = {n: [0.0] * count for n in names}
            out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for i in range(count):
                k = i % len(names)
                order = names[k:] + names[:k]
                for n in order:
                    t = time.perf_counter()
                    out[n].append(decs[n].step())
                    run[n][i] = time.perf_counter() - t
                if chains and i % chain_every == 0:
                    for n in order:
                        t = time.perf_counter()
                        chains[n]()
                        if not warm:
                            chain_times[n].append(time.perf_counter() - t)
            if not warm:
                for n in names:
                    steps[n].append(run[n])
                    tokens[n] = torch.cat(out[n], dim=1)
    result: dict[str, Any] = {}
    for n in names:
        per_repeat = [n_tokens / sum(ts) for ts in steps[n]]
        best = [min(ts[i] for ts in steps[n]) for i in range(n_tokens)]
        agree = float((tokens[n] == tokens[names[0]]).float().mean())
        result[n] = {
            "decode_tokens_per_s": statistics.median(per_repeat),
            "decode_tokens_per_s_repeats": per_repeat,
            "decode_tokens_per_s_best": n_tokens / sum(best),
            "greedy_agreement_with_" + names[0]: agree,
        }
        if chain_times[n]:
            step_med = statistics.median(t for ts in steps[n] for t in ts)
            chain_med = statistics.median(chain_times[n])
            result[n]["step_s_median"] = step_med
            result[n]["linears_only_s_median"] = chain_med
            result[n]["linears_only_tokens_per_s"] = 1.0 / chain_med
            result[n]["harness_overhead"] = 1.0 - chain_med / step_med
    return result


def linear_chain(model: GPT) -> Callable[[], None]:
    """Every linear of one decode step back to back, fed as a lean harness would feed it.

    Full-precision linears get ``F.linear`` in their own dtype; packed ones their CPU kernel
    closure with a ``(1, K)`` input of the model's activation dtype directly (no module call).
    The time of this chain is what the step would cost if everything but the linears were free.
    """
    calls: list[Callable[[], Any]] = []
    gen = torch.Generator().manual_seed(2)
    act_dtype = model.norm.weight.dtype
    for m in model.modules():
        if isinstance(m, PackedLinear):
            xa = torch.randn(1, m.in_features, generator=gen).to(act_dtype)
            fast = m._fast(xa.device)
            calls.append(functools.partial(fast, xa) if fast is not None else functools.partial(m, xa))
        elif isinstance(m, nn.Linear):
            x = torch.randn(1, m.in_features, generator=gen).to(m.weight.dtype)
            calls.append(functools.partial(F.linear, x, m.weight))

    def run() -> None:
        for call in calls:
            call()

    return run


def time_prefill(models: dict[str, GPT], n_tokens: int, repeats: int) -> dict[str, Any]:
    """Interleaved one-forward prefill of an ``n_tokens`` prompt: median seconds per scheme."""
    x = torch.randint(0, 256, (1, n_tokens), generator=torch.Generator().manual_seed(1))
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for r in range(repeats + 1):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t = time.perf_counter()
                models[n](x)
                if r > 0:
                    times[n].append(time.perf_counter() - t)
    return {
        n: {
            "prefill_s": statistics.median(ts),
            "prefill_s_best": min(ts),
            "prefill_tokens_per_s": n_tokens / statistics.median(ts),
        }
        for n, ts in times.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, measure, and return the JSON-able result."""
    cfg = ModelConfig(
        name="bench",
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.heads,
        block_size=args.context,
        mlp_hidden=args.mlp_hidden,
    )
    n_tokens = min(args.tokens, cfg.block_size - args.prompt)
    prefill = min(args.prefill, cfg.block_size)
    t0 = time.perf_counter()
    models = build_models(cfg, args.schemes, args.seed)
    load_before = os.getloadavg()[0]
    bandwidth = copy_bandwidth()
    decode = time_decode(models, n_tokens, args.repeats, args.prompt, args.chain_every)
    pre = time_prefill(models, prefill, args.prefill_repeats) if prefill > 0 else {}
    bandwidth_after = copy_bandwidth()
    bw = max(bandwidth, bandwidth_after)  # the less disturbed of the two measurements
    base = args.schemes[0]
    rows = []
    for n, model in models.items():
        nbytes = weight_bytes_per_token(model)
        d = decode[n]
        bound = bw * 1e9 / nbytes
        row = {"scheme": n, "weight_bytes_per_token": nbytes, **d, "bound_tokens_per_s": bound}
        row["fraction_of_bound"] = d["decode_tokens_per_s"] / bound
        row["speedup_vs_" + base] = d["decode_tokens_per_s"] / decode[base]["decode_tokens_per_s"]
        row["speedup_vs_" + base + "_best"] = d["decode_tokens_per_s_best"] / decode[base]["decode_tokens_per_s_best"]
        if "linears_only_s_median" in d:
            row["linears_only_speedup_vs_" + base] = (
                decode[base]["linears_only_s_median"] / d["linears_only_s_median"]
            )
        if pre:
            row.update(pre[n])
            row["prefill_time_vs_" + base] = pre[n]["prefill_s"] / pre[base]["prefill_s"]
        rows.append(row)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "mlp_hidden", "block_size")},
        "decode_tokens": n_tokens,
        "prompt_tokens": args.prompt,
        "repeats": args.repeats,
        "prefill_tokens": prefill,
        "copy_bandwidth_gbs": bw,
        "copy_bandwidth_gbs_runs": [bandwidth, bandwidth_after],
        "load_average": [load_before, os.getloadavg()[0]],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "elapsed_s": time.perf_counter() - t0,
        "baseline": base,
        "rows": rows,
    }


def verdicts(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """The issue's acceptance checks that this result can decide."""
    base = result["baseline"]
    by = {r["scheme"]: r for r in result["rows"]}
    out = []
    if base == "fp32":
        for name, need in ACCEPT.items():
            if name in by:
                got = by[name]["speedup_vs_fp32"]
                out.append((f"{name} decode {got:.2f}x fp32 >= {need}x", got >= need))
        if "int4" in by and "prefill_time_vs_fp32" in by["int4"]:
            got = by["int4"]["prefill_time_vs_fp32"]
            out.append((f"int4 prefill time {got:.2f}x fp32 <= {PREFILL_ACCEPT}x", got <= PREFILL_ACCEPT))
    return out


def show(result: dict[str, Any]) -> None:
    """Print the result as a rich table plus the acceptance checks."""
    base = result["baseline"]
    m = result["model"]
    table = Table(
        title=(
            f"batch-1 greedy decode, {m['n_layer']} layers x {m['n_embd']} (mlp {m['mlp_hidden']}, ctx "
            f"{m['block_size']}), {result['decode_tokens']} new tokens x {result['repeats']} repeats, prefill "
            f"{result['prefill_tokens']} tokens; torch {result['torch']}, {result['threads']} threads, "
            f"{result['cpu_capability']}, copy bandwidth {result['copy_bandwidth_gbs']:.1f} GB/s, "
            f"load {result['load_average'][0]:.1f}/{result['load_average'][1]:.1f}"
            f"{', OMP_WAIT_POLICY=' + result['omp_wait_policy'] if result.get('omp_wait_policy') else ''}"
        )
    )
    cols = ["scheme", "weights MB/token", "decode tok/s", f"x {base}", "best tok/s", f"x {base} (best)",
            "linears only tok/s", f"x {base} (linears)", "harness overhead", "bound tok/s", "% of bound",
            "prefill tok/s", f"prefill time x {base}"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["scheme"],
            f"{r['weight_bytes_per_token'] / 1e6:.1f}",
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['speedup_vs_' + base]:.2f}",
            f"{r['decode_tokens_per_s_best']:.1f}",
            f"{r['speedup_vs_' + base + '_best']:.2f}",
            f"{r['linears_only_tokens_per_s']:.1f}" if "linears_only_tokens_per_s" in r else "",
            f"{r['linears_only_speedup_vs_' + base]:.2f}" if "linears_only_tokens_per_s" in r else "",
            f"{100 * r['harness_overhead']:.0f}%" if "harness_overhead" in r else "",
            f"{r['bound_tokens_per_s']:.0f}",
            f"{100 * r['fraction_of_bound']:.0f}%",
            f"{r['prefill_tokens_per_s']:.0f}" if "prefill_tokens_per_s" in r else "",
            f"{r['prefill_time_vs_' + base]:.2f}" if "prefill_time_vs_" + base in r else "",
        )
    console.print(table)
    for text, ok in verdicts(result):
        console.print(f"{'[green]PASS[/green]' if ok else '[red]FAIL[/red]'} {text}")


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=DEFAULT_SCHEMES, choices=list(SCHEMES),
                    help="first one is the baseline of the ratios")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--mlp-hidden", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per repeat")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (prefilled, untimed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed decode repeats (after a 16-token warm-up)")
    ap.add_argument("--chain-every", type=int, default=8,
                    help="time each scheme's linears-only chain every N positions (0: skip)")
    ap.add_argument("--prefill", type=int, default=512, help="prefill prompt length (0: skip)")
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    run_and_report(ap.parse_args(), run, show, console)


if __name__ == "__main__":
    main()
