"""qtrain's training loop vs a minimal plain-PyTorch loop on the same model and batch.

Both loops train their own copy of the same model, interleaved in blocks inside one process
so machine noise hits both alike; the table shows median step time, tokens/s and qtrain's
overhead. Not a test: it prints measured numbers and writes JSON.

    python scripts/bench_train_loop.py --models tiny small --steps 60 --out bench_out/loop.json
    python scripts/bench_train_loop.py --models tiny --data my_corpus.txt    # another corpus
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import add_data_arg, data_config
from rich.console import Console
from rich.table import Table

from qtrain.config import ModelConfig, TrainConfig
from qtrain.data import BatchSampler, DataConfig, load_corpus
from qtrain.model import GPT
from qtrain.train import Trainer, lr_factor

SIZES = {"tiny": ModelConfig(), "small": ModelConfig(name="small", n_layer=6, n_embd=384, n_head=6,
                                                     block_size=256, mlp_hidden=1024)}
BATCH = {"tiny": 32, "small": 16}


class PlainLoop:
    """The reference: sample windows, forward, backward, clip, AdamW step. Nothing else."""

    def __init__(self, cfg: ModelConfig, tokens: torch.Tensor, batch: int, tcfg: TrainConfig) -> None:
        self.model = GPT(cfg)
        self.model.init_weights(0)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
        self.tokens, self.batch, self.cfg, self.tcfg, self.step = tokens, batch, cfg, tcfg, 0

    def train_step(self) -> None:
        ix = torch.randint(0, len(self.tokens) - self.cfg.block_size - 1, (self.batch,))
        chunk = torch.stack([self.tokens[i : i + self.cfg.block_size + 1] for i in ix.tolist()]).long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        loss = F.cross_entropy(self.model(x).view(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        for g in self.opt.param_groups:
            g["lr"] = self.tcfg.lr * lr_factor(self.step, self.tcfg)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1


def bench(name: str, steps: int, block: int, data: DataConfig) -> dict[str, Any]:
    cfg = SIZES[name]
    corpus = load_corpus(data, cfg.block_size)
    tcfg = TrainConfig(max_steps=10**6, batch_size=BATCH[name], eval_every=0, save_every=0, log_every=10)
    plain = PlainLoop(cfg, corpus.train, BATCH[name], tcfg)
    model = GPT(cfg)
    model.init_weights(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(model, tcfg, BatchSampler(corpus.train, cfg.block_size, BATCH[name], 0), torch.device("cpu"),
                       metrics_path=Path(tmp) / "metrics.jsonl")
        times: dict[str, list[float]] = {"plain": [], "qtrain": []}
        for _ in range(2):  # warm-up
            plain.train_step()
            ours.train_step()
        ours_step = lambda: ours._after_step(*ours.train_step(), 0.1)  # noqa: E731, B023 - called right here
        for _ in range(0, steps, block):
            for label, fn in (("plain", plain.train_step), ("qtrain", ours_step)):
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
    tokens = BATCH[name] * cfg.block_size
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": BATCH[name], "context": cfg.block_size,
            "plain_ms": med["plain"] * 1e3, "qtrain_ms": med["qtrain"] * 1e3,
            "plain_tokens_per_s": tokens / med["plain"], "qtrain_tokens_per_s": tokens / med["qtrain"],
            "overhead_pct": (med["qtrain"] / med["plain"] - 1) * 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--out", default="")
    add_data_arg(ap)
    args = ap.parse_args()
    data = data_config(ap, args)
    rows = [bench(m, args.steps, args.block, data) for m in args.models]
    table = Table(title=f"training step, qtrain vs plain PyTorch (median of {args.steps} interleaved steps)")
    for col in ("model", "batch x ctx", "plain ms", "qtrain ms", "plain tok/s", "qtrain tok/s", "overhead"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], f"{r['batch']}x{r['context']}", f"{r['plain_ms']:.1f}",
                      f"{r['qtrain_ms']:.1f}", f"{r['plain_tokens_per_s']:,.0f}",
                      f"{r['qtrain_tokens_per_s']:,.0f}", f"{r['overhead_pct']:+.1f}%")
    Console().print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
