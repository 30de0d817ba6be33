"""RELIABILITY.md case 44: every value that passes validation is one the code can run with.

The class: numbers in range for a `> 0` check that the numerics cannot use (seeds outside a
generator's range, zero dampening, a rotary base of 0, a zero norm epsilon, non-finite floats,
a vocabulary smaller than the byte alphabet), a `compare_to` model that cannot score the same
windows, and checkpoints whose weights are not finite. Each is refused with exit 2 naming the
key (or exit 3 for the checkpoint), or runs: never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtrain import checkpoint as ck
from qtrain.config_rules import SEED_MAX
from qtrain.model import GPT
from tests.reliability.conftest import copy_run, execute, qtrain, rewrite_listed_file, weights


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model is built (refused values are refused before any work)."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a model was built for a refused value")

    monkeypatch.setattr(GPT, "__init__", refuse)


@pytest.mark.parametrize(
    "override,key",
    [
        ("seed=-1", "seed"),
        (f"seed={2**64}", "seed"),  # beyond any random generator's seed
        (f"seed={SEED_MAX + 1}", "seed"),
        ("ptq.damp=0", "ptq.damp"),  # GPTQ's Cholesky factorization fails on an undampened singular Hessian
        ("ptq.damp=-0.5", "ptq.damp"),
        ("model.rope_theta=0", "model.rope_theta"),  # 0 ** x: infinite frequencies, NaN rotations
        ("model.rope_theta=inf", "model.rope_theta"),
        ("model.norm_eps=0", "model.norm_eps"),
        ("model.norm_eps=-1e-5", "model.norm_eps"),
        ("generate.temperature=inf", "generate.temperature"),
        ("train.lr=inf", "train.lr"),  # passes `> 0`, trains to NaN
        ("qat.distill_weight=nan", "qat.distill_weight"),
        ("model.vocab_size=100", "model.vocab_size"),  # byte 200 has no embedding row
    ],
)
def test_case_44_values_the_code_cannot_run_with_are_refused(
    tmp_path: Path, override: str, key: str, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = qtrain(["mode=train", override, f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{key}:" in err and "Traceback" not in err
    assert err.count(f"{key}:") == 1  # one message per key (nan/inf are not reported twice)
    assert not run.exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"seed": 0},
        {"seed": SEED_MAX},  # the largest accepted seed trains and seeds every generator
        {"model.rope_theta": 1.0, "model.norm_eps": 1e-12},  # the edges of their ranges
    ],
)
def test_case_44_values_at_the_edges_of_their_ranges_run(tmp_path: Path, changes: dict[str, object]) -> None:
    assert execute({"train.max_steps": 1, **changes}, tmp_path / "run") == 0


def test_case_44_smallest_gptq_dampening_runs(trained: Path, tmp_path: Path) -> None:
    changes = {"mode.name": "ptq", "quant.scheme": "int4", "ptq.method": "gptq", "ptq.damp": 1e-6}
    assert execute({**changes, "init_from": str(trained), "ptq.calib_batches": 2}, tmp_path / "run") == 0


def _generate(ckpt: Path, run: Path, temperature: float) -> tuple[int, str]:
    changes = {"mode.name": "generate", "init_from": str(ckpt), "generate.max_new_tokens": 24}
    code = execute({**changes, "generate.temperature": temperature, "generate.top_k": 0}, run)
    report = run / "report.json"
    return code, json.loads(report.read_text())["text"] if report.exists() else ""


@pytest.mark.parametrize("temperature", [1e-30, 1e-45])
def test_case_44_tiny_temperature_samples_like_greedy(trained: Path, tmp_path: Path, temperature: float) -> None:
    code, greedy = _generate(trained, tmp_path / "greedy", 0.0)
    assert code == 0
    code, tiny = _generate(trained, tmp_path / "tiny", temperature)
    assert code == 0 and tiny == greedy


def _train_block(tmp_path: Path, name: str, block: int) -> Path:
    run = tmp_path / name
    assert execute({"train.max_steps": 1, "model.block_size": block}, run) == 0
    return run


def test_case_44_compare_to_with_a_shorter_context_exits_2(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = _train_block(tmp_path, "short", 16)  # the evaluated model has model.block_size=32
    capsys.readouterr()
    code = execute({"mode.name": "eval", "init_from": str(trained), "compare_to": str(short)}, tmp_path / "eval")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "compare_to" in err and "block_size=16" in err and "32" in err and "Traceback" not in err


def test_case_44_compare_to_with_a_longer_context_runs(trained: Path, tmp_path: Path) -> None:
    """The other side of the class: a reference that sees more context scores the same windows."""
    long = _train_block(tmp_path, "long", 64)
    run = tmp_path / "eval"
    assert execute({"mode.name": "eval", "init_from": str(trained), "compare_to": str(long)}, run) == 0
    assert json.loads((run / "report.json").read_text())["logit_kl"] >= 0


def _poison(trained: Path, tmp_path: Path, value: float) -> Path:
    """A copy of the trained run whose step-4 weights hold `value` in one matrix, consistently hashed."""
    ckpt = copy_run(trained, tmp_path / "poisoned") / "checkpoints" / "step_0000004"
    state = weights(ckpt)
    name = next(n for n in state if n.endswith("attn.qkv.weight"))
    state[name][0, :3] = value
    tmp = tmp_path / "model.safetensors"
    ck.write_safetensors(state, tmp, metadata={"format": "qtrain"})
    rewrite_listed_file(ckpt, ck.MODEL_FILE, tmp.read_bytes())
    return ckpt


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_case_44_non_finite_weights_are_reported_not_a_crash(
    trained: Path, tmp_path: Path, value: float, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _poison(trained, tmp_path, value)
    code, _ = _generate(ckpt, tmp_path / "gen", 0.8)
    err = capsys.readouterr().err
    assert code == 3, err
    assert "non-finite" in err and "Traceback" not in err
    code = execute({"mode.name": "eval", "init_from": str(ckpt), "eval.decode_tokens": 0}, tmp_path / "eval")
    err = capsys.readouterr().err
    assert code == 0 and "non-finite" in err and "attn.qkv.weight" in err  # evaluated, with a warning
    code = execute({"mode.name": "ptq", "quant.scheme": "int8", "init_from": str(ckpt)}, tmp_path / "ptq")
    err = capsys.readouterr().err
    assert code == 3 and "attn.qkv.weight" in err and "Traceback" not in err  # nothing to quantize from
