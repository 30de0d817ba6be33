"""Peak resident memory of importing a 1B-shaped Hugging Face Llama, against its float32 size.

Writes a Llama-3.2-1B-shaped model directory (random float32 weights, sharded, written shard
by shard with `safetensors`: no `transformers` needed), then imports it with
`qtrain.hf.load_hf` in a fresh child process and reports that process's peak RSS (ru_maxrss),
its RSS before the import (Python + torch + qtrain), and the ratios to the model's float32
size. Issue 14's target: peak <= 1.3x the float32 size.

Usage:
    python scripts/hf_import_memory.py [--dir /tmp/hf1b] [--shard-gb 1.0] [--keep]

It needs about 5 GB of disk and about 6 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "torch_dtype": "float32",
}
"""Llama 3.2 1B's configuration (1.24B parameters, tied embeddings, GQA 32/8, llama3 rope scaling)."""


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor of the model, in file order."""
    h, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    nq, nk = c["num_attention_heads"], c["num_key_value_heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nk * hd, h),
            p + "self_attn.v_proj.weight": (nk * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })  # fmt: skip
    out["model.norm.weight"] = (h,)
    return out


def write_model(out: Path, shard_bytes: int) -> int:
    """Write config.json, the shards and the index; return the float32 size in bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(SHAPE, indent=2))
    shapes = tensor_shapes(SHAPE)
    groups: list[list[str]] = [[]]
    size = total = 0
    for name, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
        total += n
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=gen) * 0.02)
            for n in names
        }
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def rss_now() -> int:
    """This process's current resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(path: Path) -> None:
    """Child process: import the model, print RSS before, peak RSS and timings as JSON."""
    import torch

    from qtrain.hf import load_hf

    torch.set_num_threads(2)
    before = rss_now()
    t0 = time.perf_counter()
    source, model = load_hf(path, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss_before": before, "rss_peak": peak, "rss_after": rss_now(), "params": params,
                      "import_s": round(seconds, 1), "model": source.manifest["model"]["name"]}))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qtrain-hf1b"))
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the model directory")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure)
        return 0
    if args.dir.exists():
        raise SystemExit(f"{args.dir} exists; remove it or pick another --dir")
    t0 = time.perf_counter()
    f32 = write_model(args.dir, int(args.shard_gb * 1e9))
    shards = len(list(args.dir.glob("model-*.safetensors")))
    written = time.perf_counter() - t0
    try:
        res = subprocess.run([sys.executable, __file__, "--measure", str(args.dir)], capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return res.returncode
        m = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    gb = 1e9
    print(f"model: Llama-3.2-1B shape, {m['params']:,} parameters, float32 {f32 / gb:.2f} GB in {shards} shards "
          f"(written in {written:.0f} s)")  # fmt: skip
    print(f"import: {m['import_s']} s; RSS before {m['rss_before'] / gb:.2f} GB, peak {m['rss_peak'] / gb:.2f} GB, "
          f"after {m['rss_after'] / gb:.2f} GB")  # fmt: skip
    print(f"peak / float32 size = {m['rss_peak'] / f32:.3f}x (target <= 1.3x); "
          f"(peak - before) / float32 size = {(m['rss_peak'] - m['rss_before']) / f32:.3f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
