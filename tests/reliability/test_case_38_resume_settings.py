"""RELIABILITY.md case 38: resuming with changed settings applies and records the safe ones
(and says so), and refuses (exit 2, keys listed) any other, before anything is loaded or
recorded: the checkpoints and ``.hydra`` never hold a value that was not the one used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qtrain.modes.resume_check import compare, is_safe
from tests.reliability.conftest import (
    copy_run,
    execute,
    manifest,
    qtrain,
    step_names,
    train_args,
    tree_hashes,
)

SAVED = {
    "train": {"lr": 0.003, "max_steps": 4, "beta2": 0.95, "eval_every": 0},
    "seed": 1337,
    "threads": "auto",
    "eval": {"decode_tokens": 64},
    "data": {"name": "pydocs", "path": None},
}
FP = {"name": "pydocs", "train_sha256": "a" * 64, "val_sha256": "b" * 64}


def _now(**changes: object) -> dict[str, object]:
    cfg = json.loads(json.dumps(SAVED))
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [("train__lr", 0.01), ("train__beta2", 0.99), ("seed", 1), ("data__name", "text")],
)
def test_case_38_compare_refuses_settings_a_resume_cannot_change(key: str, value: object) -> None:
    diff = compare(SAVED, _now(**{key: value}))
    assert [c.key for c in diff.refused] == [key.replace("__", ".")] and diff.applied == []


def test_case_38_compare_applies_only_the_allow_list() -> None:
    diff = compare(SAVED, _now(train__max_steps=8, train__eval_every=2, threads=2, eval__decode_tokens=0))
    assert sorted(c.key for c in diff.applied) == [
        "eval.decode_tokens",
        "threads",
        "train.eval_every",
        "train.max_steps",
    ]
    assert diff.refused == []
    for key in (
        "train.lr",
        "train.weight_decay",
        "train.warmup_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.grad_clip",
        "train.min_lr_ratio",
        "seed",
        "model.n_head",
        "quant.group_size",
        "qat.start_step",
        "data.val_fraction",
        "hooks",
        "mode.name",
        "init_from",
    ):
        assert not is_safe(key), key


def test_case_38_compare_missing_keys_and_corpus(tmp_path: Path) -> None:
    # a checkpoint written before a key existed trained with that key's default
    assert compare(SAVED, {**_now(), "compile": False}).applied == []
    assert [c.key for c in compare(SAVED, {**_now(), "compile": True}).applied] == ["compile"]
    # the same corpus content is no change; other content is refused by its hashes
    assert compare(SAVED, _now(), FP, dict(FP)).refused == []
    other = {**FP, "val_sha256": "c" * 64}
    assert [c.key for c in compare(SAVED, _now(), FP, other).refused] == ["corpus.val_sha256"]
    # another spelling of the same data.path is no change; another file with the same text is applied
    (tmp_path / "d").mkdir()
    saved = _now(data__path=str(tmp_path / "d" / "c.txt"))
    assert compare(saved, _now(data__path=f"{tmp_path}/d/../d/c.txt")).refused == []
    moved = compare(saved, _now(data__path=str(tmp_path / "e.txt")), FP, dict(FP))
    assert [c.key for c in moved.applied] == ["data.path"] and moved.refused == []
    assert [c.key for c in compare(saved, _now(data__path="x.txt"), FP, other).refused] == [
        "data.path",
        "corpus.val_sha256",
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"train.lr": 0.01},  # the example of the issue: silently kept the old lr before
        {"train.weight_decay": 0.0, "train.beta1": 0.8},
        {"seed": 7},
        {"train.batch_size": 2},
        {"train.warmup_steps": 3},
    ],
)
def test_case_38_changed_settings_refused_nothing_written(
    trained: Path, tmp_path: Path, changes: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    before = tree_hashes(run)
    assert execute({"train.max_steps": 6, "train.save_every": 2, "train.log_every": 1, **changes}, run) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings" in err and "Traceback" not in err
    for key in changes:
        assert f"{key}=" in err, key
    assert "train.max_steps" not in err.split("A resume may change only")[0]  # only the refused keys listed
    assert tree_hashes(run) == before


def test_case_38_safe_changes_applied_recorded_and_said(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    changes = {"train.max_steps": 6, "train.save_every": 3, "train.log_every": 2, "train.keep": 4, "threads": 1}
    assert execute({**changes, "eval.decode_tokens": 0}, run) == 0
    out = capsys.readouterr().out
    assert "applied and recorded" in out
    for key in ("train.max_steps 4 -> 6", "train.save_every 2 -> 3", "train.keep 3 -> 4", "eval.decode_tokens"):
        assert key in out, key
    assert step_names(run / "checkpoints") == ["step_0000002", "step_0000004", "step_0000006"]
    new = manifest(run / "checkpoints" / "step_0000006")["config"]
    old = manifest(run / "checkpoints" / "step_0000004")["config"]
    assert new["train"]["max_steps"] == 6 and new["train"]["keep"] == 4 and new["threads"] == 1
    changed = {k.removeprefix("train.") for k in changes}
    assert {k: v for k, v in new["train"].items() if k not in changed} == {
        k: v for k, v in old["train"].items() if k not in changed
    }  # everything else recorded as trained
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and 5 not in steps  # log_every=2 applied after the resume


def test_case_38_changed_corpus_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
    corpus = tmp_path / "corpus.txt"
    data = text.read_bytes()[:20000] if text.is_file() else ("to be or not to be\n" * 1000).encode()
    corpus.write_bytes(data)
    run = tmp_path / "run"
    data_args = ["data=text", f"data.path={corpus}", "train.save_every=2"]
    assert qtrain(train_args(run, 2, *data_args)) == 0
    before = tree_hashes(run)
    corpus.write_bytes(data[::-1])  # same path and size, other text
    capsys.readouterr()
    assert qtrain(train_args(run, 4, *data_args)) == 2  # refused before Hydra writes .hydra/
    err = capsys.readouterr().err
    assert "corpus.train_sha256" in err and "corpus.val_sha256" in err and "corpus text differs" in err
    assert tree_hashes(run) == before
    # the run itself compares again (a sweep job's dir is only known inside the run)
    assert execute({"data.name": "text", "data.path": str(corpus), "train.max_steps": 4}, run) == 2
    assert "corpus.val_sha256" in capsys.readouterr().err
    assert step_names(run / "checkpoints") == ["step_0000002"]
    # the same text under another name is no change: applied and said
    moved = tmp_path / "moved.txt"
    moved.write_bytes(data)
    assert qtrain(train_args(run, 4, "data=text", f"data.path={moved}", "train.save_every=2")) == 0
    assert "data.path" in capsys.readouterr().out
    assert step_names(run / "checkpoints") == ["step_0000002", "step_0000004"]


def test_case_38_command_line_refused_before_hydra_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert qtrain(train_args(run, 2, "train.save_every=2")) == 0
    before = tree_hashes(run)
    capsys.readouterr()
    assert qtrain(train_args(run, 4, "train.save_every=2", "train.lr=0.01", "seed=3")) == 2
    err = capsys.readouterr().err
    assert "train.lr=0.003 (this run: 0.01)" in err and "seed=1337 (this run: 3)" in err
    assert tree_hashes(run) == before  # .hydra/config.yaml still says what the checkpoints were trained with


def test_case_38_earlier_default_is_kept_not_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run started when train.min_lr_ratio defaulted to 0.1, resumed by a command that does not set it,
    continues with 0.1 (its schedule), says so and records it; setting it explicitly is still a refused change."""
    assert [c.key for c in compare(_now(train__min_lr_ratio=0.1), _now(train__min_lr_ratio=0.0)).kept] == [
        "train.min_lr_ratio"
    ]
    assert [c.key for c in compare(_now(train__min_lr_ratio=0.2), _now(train__min_lr_ratio=0.0)).refused] == [
        "train.min_lr_ratio"
    ]
    run = tmp_path / "run"
    assert qtrain(train_args(run, 4, "train.save_every=2", "train.log_every=1", "train.warmup_steps=0",
                             "train.min_lr_ratio=0.1")) == 0
    assert qtrain(train_args(run, 8, "train.save_every=2", "train.log_every=1", "train.warmup_steps=0")) == 0
    out = capsys.readouterr().out
    assert "earlier default" in out and "train.min_lr_ratio=0.1" in out
    assert manifest(run / "checkpoints" / "step_0000008")["config"]["train"]["min_lr_ratio"] == 0.1
    lr = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    floor = {f: 3e-3 * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * 7 / 8))) for f in (0.1, 0.0)}  # last step's lr
    assert lr[8] == pytest.approx(floor[0.1], rel=1e-6) and floor[0.0] < 0.3 * floor[0.1]


def test_case_38_qat_started_without_distillation_resumes_without_it() -> None:
    """QAT runs started when qat.distill defaulted to false (and distill_weight to 1.0) keep their own
    values on a resume that does not set them; asking for another value is still refused."""
    saved = {"mode": {"name": "qat"}, "qat": {"distill": False, "distill_weight": 1.0}}
    now = {"mode": {"name": "qat"}, "qat": {"distill": None, "distill_weight": 0.5}}
    diff = compare(saved, now)
    assert [c.key for c in diff.kept] == ["qat.distill", "qat.distill_weight"] and not diff.refused
    diff = compare(saved, {"mode": {"name": "qat"}, "qat": {"distill": True, "distill_weight": 0.5}})
    assert [c.key for c in diff.refused] == ["qat.distill"]
