"""An imported Hugging Face model at scale: sweeps, DDP, `mode=export`'s run dir, and the memory a 1b needs.

A tiny Llama with grouped-query attention (tests/hf_models.py, made with `transformers`) runs a
multirun sweep over two schemes and a 2-process DDP QAT (gloo on CPU, `torchrun -m qtrain`);
`mode=export` keeps no run directory unless one is named. The memory estimate of a
Llama-3.2-1B-shaped import (pure arithmetic, nothing allocated) stays bounded where the
code never holds logits: GPTQ's calibration and a 128k-vocabulary validation batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qtrain.config import ModelConfig
from qtrain.modes import memory, memory_fixes
from qtrain.modes.context import RunContext
from qtrain.modes.dispatch import run
from tests.conftest import REPO, SHARED_DATA, compose_cfg, qtrain_in_process
from tests.hf_models import make

pytestmark = pytest.mark.integration

DATA = [
    "data=text", f"data.path={SHARED_DATA}", "data.val_windows=2", "train.batch_size=2", "eval.decode_tokens=0",
    "eval.prefill_tokens=0", "model.block_size=32",
]  # fmt: skip
LLAMA_1B = ModelConfig(
    name="hf-llama", n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, block_size=2048, mlp_hidden=8192,
    vocab_size=128256, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5,
)  # fmt: skip
"""Llama-3.2-1B's shape (its config.json), at a 2048-token context."""


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="transformers builds the model to import (test-only dependency)")
    out = tmp_path_factory.mktemp("hf") / "llama_gqa"
    make("llama_gqa", out)  # 8 query heads, 2 key/value heads, untied, saved sharded
    return out


@pytest.fixture
def token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("QTRAIN_CACHE", str(cache))  # token ids of this test's corpus, not the user's cache
    return cache


def _manifest(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    return json.loads((root / (root / "latest").read_text().strip() / "manifest.json").read_text())  # type: ignore[no-any-return]


def test_a_sweep_over_schemes_on_an_imported_model(
    llama: Path, tmp_path: Path, token_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "quant=int8,int4", "mode=ptq", f"init_from=hf:{llama}", "ptq.calib_batches=1", *DATA]
    assert qtrain_in_process([*args, f"hydra.sweep.dir={sweep}"]) == 0, capsys.readouterr().err
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name.split("+")[0] for j in jobs] == ["0_quant-int8", "1_quant-int4"]
    reports = [json.loads((j / "report.json").read_text()) for j in jobs]
    assert [r["quant"]["scheme"] for r in reports] == ["int8", "int4"]
    for job, rep in zip(jobs, reports, strict=True):
        manifest = _manifest(job)
        assert manifest["model"]["name"] == "hf-llama" and manifest["model"]["n_kv_head"] == 2
        assert manifest["imported_from"]["model_type"] == "llama" and manifest["tokenizer"]["kind"] == "hf"
        assert rep["tokenizer"]["kind"] == "hf" and rep["val_bpb"] > 0
    # the same imported model scored on the same windows in both jobs: one reference (float32, same ops)
    assert reports[0]["reference_val_loss"] == pytest.approx(reports[1]["reference_val_loss"], rel=1e-6)
    out = run(RunContext(cfg=compose_cfg(["mode=report", f"runs=[{sweep}]"]), run_dir=tmp_path / "report",
                         device=torch.device("cpu")))  # fmt: skip
    assert (out["jobs"], out["failed"]) == (2, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_qat_on_an_imported_model(llama: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "qtrain", "mode=qat", "quant=int4", f"init_from=hf:{llama}", "ptq.calib_batches=1", *DATA,
           "train.max_steps=1", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "QTRAIN_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "x2 processes" in out and "Traceback" not in out  # two ranks, each estimated (DDP buckets included)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["step"] == 1 and report["quant"]["scheme"] == "int4" and report["tokenizer"]["kind"] == "hf"
    assert report["model"] == "hf-llama"  # the imported model's name, not the config default's
    manifest = _manifest(run_dir)  # written by rank 0 alone, with the import's provenance
    assert manifest["model"]["name"] == "hf-llama" and manifest["model"]["n_kv_head"] == 2
    assert manifest["imported_from"]["model_type"] == "llama" and manifest["imported_from"]["files"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()] == ["step_0000001"]
    from qtrain.checkpoint import verify_checkpoint

    verify_checkpoint(run_dir / "checkpoints" / "step_0000001")


def test_export_keeps_no_run_dir_unless_asked(
    llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    monkeypatch.chdir(tmp_path)
    assert qtrain_in_process(["mode=export", f"init_from=hf:{llama}", "out=exported"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "exported" / "config.json").is_file()  # a relative `out` is the user's, not the scratch's
    assert "mode=export kept no run directory" in captured.err
    assert not (tmp_path / "outputs").exists() and list(scratch_root.glob("qtrain-*")) == []
    banner = next(line for line in captured.out.splitlines() if line.startswith("qtrain export"))
    assert "| data " not in banner and "hf-llama" in banner  # export reads no corpus: no data in its banner
    assert qtrain_in_process(["mode=export", f"init_from=hf:{llama}", "out=again", "hydra.run.dir=kept"]) == 0
    assert json.loads((tmp_path / "kept" / "report.json").read_text())["mode"] == "export"


# ---------------------------------------------------------------- memory at 1b scale (arithmetic only)


def _estimate(overrides: list[str], model: ModelConfig = LLAMA_1B) -> memory.Estimate:
    cfg = compose_cfg(["quant=int4", "init_from=hf:/models/Llama-3.2-1B", *overrides])
    return memory.estimate(cfg, model, memory.Setting(loaded=memory.IMPORTED))


def _calibration_forward(overrides: list[str]) -> int:
    cfg = compose_cfg(["mode=ptq", "quant=int4", "ptq.method=gptq", "init_from=hf:/m", *overrides])
    return next(v for k, v in memory.calibration_phase(cfg, LLAMA_1B, "gptq") if k.startswith("calibration forward"))


def test_1b_gptq_calibration_never_counts_logits_it_does_not_compute() -> None:
    assert memory.n_params(LLAMA_1B) == 1_235_814_400  # Llama-3.2-1B's parameter count, tied head once
    forward = {b: _calibration_forward([f"train.batch_size={b}"]) for b in (1, 8)}
    logits_one_batch = 4 * LLAMA_1B.vocab_size * LLAMA_1B.block_size  # 1.05 GB per window, never computed
    assert forward[1] < logits_one_batch / 3 and forward[8] < 8 * logits_one_batch / 3  # one block's work only
    # a quantized head does run full forwards, one batch's logits at a time (qtrain.quant.gptq)
    head = _calibration_forward(["train.batch_size=1", "quant.lm_head=true"])
    assert logits_one_batch <= head < 4 * logits_one_batch  # one batch: logits, a float copy, the softmax


def test_1b_peaks_are_bounded_and_fall_with_checkpointing() -> None:
    ptq = _estimate(["mode=ptq", "ptq.method=gptq", "train.batch_size=8"])
    assert ptq.total < 3.5 * 4 * memory.n_params(LLAMA_1B)  # about 12 GB: weights, 2 GB of calibration, Hessians
    qat = {ck: _estimate(["mode=qat", "train.batch_size=1", f"train.activation_checkpointing={ck}",
                          "qat.distill=false"]).total
           for ck in ("false", "true")}  # fmt: skip
    assert qat["true"] < qat["false"]
    assert qat["true"] < 6 * 4 * memory.n_params(LLAMA_1B)  # 16 B/param AdamW training + 5 B fake-quant + activations
    # distillation (the default with an init_from) adds the teacher's fp32 weights and its logits' softmaxes
    kd = _estimate(["mode=qat", "train.batch_size=1", "train.activation_checkpointing=true"]).total
    assert 4 * memory.n_params(LLAMA_1B) <= kd - qat["true"] <= 4 * memory.n_params(LLAMA_1B) + 5 * 4 * 128256 * 2048
    loading = dict(memory.loading_phase(LLAMA_1B, memory.IMPORTED))  # mmapped: model + one tensor, not two models
    assert sum(loading.values()) < 1.3 * 4 * memory.n_params(LLAMA_1B)


def test_a_full_context_import_is_told_to_shorten_it() -> None:
    full = dataclasses.replace(LLAMA_1B, block_size=131072)  # Llama-3.2's max_position_embeddings
    cfg = compose_cfg(["mode=ptq", "quant=int4", "ptq.method=gptq", "init_from=hf:/m", "train.batch_size=1"])
    setting = memory.Setting(loaded=memory.IMPORTED)
    limit = 32 * 10**9
    assert memory.estimate(cfg, full, setting).total > limit
    fixes = memory_fixes.remedies(cfg, full, limit, setting)
    assert any(f.startswith("model.block_size=") for f in fixes), fixes
