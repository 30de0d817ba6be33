"""Regime Q: quantization quality on a small, heavily trained model (README, Results).

Runs everything through the `qtrain` CLI (so the numbers are what users get), on the text
file given with --data (the README's numbers: tinyshakespeare, 1,115,394 bytes):

1. full precision: `model=tiny`, --data, 3000 steps, batch 32, lr 3e-3, warmup 50
2. PTQ of that checkpoint: int8, int4 (group 32 sym/asym, per channel) with rtn/mse/gptq,
   int8da_int4w (rtn and gptq)
3. continuation, 600 steps at lr 5e-4 from the same checkpoint: a full-precision control
   (then PTQ) and QAT arms (default settings, plus any `--qat-extra` variants)
4. recovery = (ppl_PTQ_control - ppl_QAT) / (ppl_PTQ_control - ppl_fp_control)

    python scripts/regime_q.py --data tinyshakespeare.txt --out bench_out/regime_q   # ~20 minutes on 2 cores
    python scripts/regime_q.py --data tinyshakespeare.txt --out bench_out/regime_q --only qat \\
        --qat-extra "lsq=qat.learn_scales=true qat.init=mse"

Prints a table and writes `summary.json` in --out. Re-running reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

COMMON = ["model=tiny", "data=text", "data.val_windows=-1", "train.batch_size=32"]  # + data.path from --data
FP = ["mode=train", "train.max_steps=3000", "train.lr=3e-3", "train.warmup_steps=50", "train.min_lr_ratio=0.1",
      "train.eval_every=1000", "train.save_every=1000"]
"""The full-precision model of regime Q: its cosine ends at 10% of lr, as every run of it since the first
(train.min_lr_ratio's default until it became 0.0), so the model is the same one."""
CONT = ["train.max_steps=600", "train.lr=5e-4", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0"]
PTQ_ARMS = {
    "int8": ["quant=int8"],
    "int4_g32_rtn": ["quant=int4", "ptq.method=rtn"],
    "int4_g32_mse": ["quant=int4", "ptq.method=mse"],
    "int4_g32_gptq": ["quant=int4", "ptq.method=gptq"],
    "int4_g32_asym_rtn": ["quant=int4", "quant.symmetric=false"],
    "int4_perchannel_rtn": ["quant=int4", "quant.group_size=-1", "ptq.method=rtn"],
    "int4_perchannel_mse": ["quant=int4", "quant.group_size=-1", "ptq.method=mse"],
    "int4_perchannel_gptq": ["quant=int4", "quant.group_size=-1", "ptq.method=gptq"],
    "int8da_int4w_rtn": ["quant=int8da_int4w"],
    "int8da_int4w_gptq": ["quant=int8da_int4w", "ptq.method=gptq"],
    "int4_g32_head_rtn": ["quant=int4", "quant.lm_head=true"],
}
console = Console()


def qtrain(run_dir: Path, args: list[str]) -> dict:
    """Run one qtrain job (skipped when its report exists) and return its report."""
    report = run_dir / "report.json"
    if not report.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "qtrain", *COMMON, *args, f"hydra.run.dir={run_dir}"]
        console.print(f"[dim]$ qtrain {' '.join(a for a in cmd[3:])}[/dim]")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            console.print(res.stderr[-3000:])
            raise SystemExit(f"failed: {run_dir}")
        console.print(f"  done in {time.perf_counter() - t0:.0f}s")
    return json.loads(report.read_text())


def model_bytes(report: dict) -> int | None:
    """Size of the run's deployable model file (`model.safetensors` of its checkpoint)."""
    f = Path(report.get("checkpoint") or "") / "model.safetensors"
    return f.stat().st_size if f.is_file() else None


def machine() -> dict:
    """The CPU the numbers come from: model name and whether it has AVX2 / AVX-512 (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": "unknown"}
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": name, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "cores": os.cpu_count()}


def run_ptq(out: Path, fp_dir: Path, fp: dict, rows: list[tuple[str, float, str]], summary: dict) -> None:
    """Step 2: every PTQ arm from the full-precision checkpoint, and the share of rtn's gap closed."""
    for name, extra in PTQ_ARMS.items():
        r = qtrain(out / f"ptq_{name}", ["mode=ptq", f"init_from={fp_dir}", *extra])
        summary["ptq"][name] = {"ppl": r["val_ppl"], "bpb": r.get("val_bpb"),
                                "bits_per_weight": r.get("bits_per_weight"), "model_bytes": model_bytes(r)}
        rows.append((f"PTQ {name}", r["val_ppl"], f"{(r['val_ppl'] / fp['val_ppl'] - 1) * 100:+.2f}%"))
    rtn = summary["ptq"]
    for fam in ("int4_g32", "int4_perchannel"):
        gap = rtn[f"{fam}_rtn"]["ppl"] - fp["val_ppl"]
        for m in ("mse", "gptq"):
            closed = (rtn[f"{fam}_rtn"]["ppl"] - rtn[f"{fam}_{m}"]["ppl"]) / gap if gap > 0 else float("nan")
            summary["ptq"][f"{fam}_{m}"]["gap_closed"] = closed
            rows.append((f"  {fam} {m}: share of rtn's gap closed", closed * 100, "%"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, metavar="PATH",
                    help="the corpus, a text file (README numbers: tinyshakespeare.txt, 1,115,394 bytes)")
    ap.add_argument("--out", default="bench_out/regime_q")
    ap.add_argument("--fp", default="", help="existing full-precision run dir (skips step 1)")
    ap.add_argument("--only", choices=["all", "ptq", "qat"], default="all")
    ap.add_argument("--qat-extra", action="append", default=[],
                    help="NAME=OVERRIDES: an extra QAT arm, e.g. 'lsq=qat.learn_scales=true'")
    ap.add_argument("--common", default="", metavar="OVERRIDES",
                    help="overrides added to every run, e.g. 'data.tokenizer=bpe data.vocab_size=1024'")
    args = ap.parse_args()
    COMMON.extend(args.common.split())
    data = Path(args.data).resolve()
    if not data.is_file():
        ap.error(f"--data {args.data}: no such file (give the path of a text corpus, e.g. tinyshakespeare.txt)")
    COMMON.append(f"data.path={data}")
    out = Path(args.out)
    fp_dir = Path(args.fp) if args.fp else out / "fp"
    fp = qtrain(fp_dir, FP)
    rows: list[tuple[str, float, str]] = [("full precision, 3000 steps", fp["val_ppl"], "")]
    summary: dict = {"data": {"path": str(data), "bytes": data.stat().st_size}, "machine": machine(),
                     "fp": fp["val_ppl"], "fp_val_loss": fp["val_loss"], "fp_model_bytes": model_bytes(fp),
                     "fp_elapsed_s": fp["elapsed_s"], "fp_val_bpb": fp.get("val_bpb"),
                     "common": COMMON, "ptq": {}, "qat": {}}
    if args.only in ("all", "ptq"):
        run_ptq(out, fp_dir, fp, rows, summary)
    if args.only in ("all", "qat"):
        ctl = qtrain(out / "control_fp", ["mode=train", f"init_from={fp_dir}", *CONT])
        rows.append(("control, full precision (+600)", ctl["val_ppl"], ""))
        arms = {"int4": ["quant=int4"], "int8da_int4w": ["quant=int8da_int4w"]}
        for scheme, q in arms.items():
            ptq = qtrain(out / f"control_ptq_{scheme}", ["mode=ptq", f"init_from={out / 'control_fp'}", *q])
            variants = {"default": []} | {v.split("=", 1)[0]: v.split("=", 1)[1].split() for v in args.qat_extra}
            rows.append((f"control PTQ {scheme}", ptq["val_ppl"], f"bpb {ptq.get('val_bpb')}"))
            summary[f"control_ptq_{scheme}"] = {"ppl": ptq["val_ppl"], "bpb": ptq.get("val_bpb")}
            for vname, vargs in variants.items():
                qat = qtrain(out / f"qat_{scheme}_{vname}", ["mode=qat", f"init_from={fp_dir}", *CONT, *q, *vargs])
                rec = (ptq["val_ppl"] - qat["val_ppl"]) / (ptq["val_ppl"] - ctl["val_ppl"])
                summary["qat"][f"{scheme}_{vname}"] = {"ppl": qat["val_ppl"], "bpb": qat.get("val_bpb"),
                                                       "recovery": rec,
                                                       "fake_quant_ppl": qat.get("fake_quant_val_ppl"),
                                                       "overrides": vargs}
                rows.append((f"QAT {scheme} ({vname}) {' '.join(vargs)}", qat["val_ppl"], f"recovery {rec * 100:.1f}%"))
        summary["control_fp"] = ctl["val_ppl"]
        summary["control_fp_bpb"] = ctl.get("val_bpb")
    tokens = " ".join(a for a in COMMON if a.startswith("data.tok") or a.startswith("data.vocab")) or "byte tokens"
    table = Table(title=f"Regime Q (tiny, {data.name}, {tokens}; {summary['machine']['cpu']})")
    for col in ("run", "val ppl / value", "note"):
        table.add_column(col)
    for name, val, note in rows:
        table.add_row(name, f"{val:.4f}", note)
    console.print(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
