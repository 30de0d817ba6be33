"""Write a golden checkpoint fixture of the *current* format version plus its expected logits.

Run once per format version, at the commit that introduces it, and commit the output:

    python scripts/make_fixture.py tests/fixtures/v1_fp          # format 1 (full precision)
    python scripts/make_fixture.py tests/fixtures/v2_int4 quant=int4 mode=qat   # format 2
    python scripts/make_fixture.py tests/fixtures/v3_int4 quant=int4 mode=qat   # format 3 (sealed manifest)

A fixture is the *previous* version once the format moves on: the v3 one was made (with this
script, at a commit that wrote format 3) before the commit that introduced format 4 (the
model's attention and rotary fields, the `tokenizer` section). The v4 one is to be made the
same way, at a commit that writes format 4, before the commit that introduces format 5, and
committed with it (``tests/fixtures/v4_int4``; a model with the new fields in use, e.g.
``model.n_kv_head=1``, exercises them).

The expected logits (`<dir>.expected.safetensors`) come from the model as trained, for the
token ids 0..31, so a later qtrain must reproduce them after loading and migrating.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.mlp_hidden=64", "model.block_size=32",
         "train.max_steps=3", "train.batch_size=2", "train.save_every=0", "train.eval_every=0", "data.val_windows=2"]


def main() -> None:
    out = Path(sys.argv[1])
    extra = sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "qtrain", *SHAPE, *extra, f"hydra.run.dir={tmp}"], check=True)
        src = Path(tmp) / "checkpoints" / (Path(tmp) / "checkpoints" / "latest").read_text().strip()
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out)
    from qtrain.checkpoint import load_checkpoint
    from qtrain.modes.loading import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(out, with_trainer=False), torch.device("cpu"))
    with torch.no_grad():
        logits = model(torch.arange(32).view(1, 32))
    save_file({"logits": logits.contiguous()}, str(out) + ".expected.safetensors")
    print(f"wrote {out} and {out}.expected.safetensors")


if __name__ == "__main__":
    main()
