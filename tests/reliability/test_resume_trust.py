"""RELIABILITY.md round 2, checkpoints that lie: cases 32 (trainer state validated), 33 (resume
falls back past any failure), 34 (step directory names), and operating-system stray files
(issue 12 item 10)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from qtrain.errors import CheckpointError
from tests.reliability.conftest import (
    copy_run,
    execute,
    manifest,
    rewrite_listed_file,
    step_names,
    tree_hashes,
    write_manifest,
)

OPT = ("trainer", "optimizer")


def _trainer_json(ckpt: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit trainer.json (size, hash and seal updated: only the trainer state is hostile)."""
    meta = json.loads((ckpt / ck.TRAINER_META).read_text())
    edit(meta)
    rewrite_listed_file(ckpt, ck.TRAINER_META, json.dumps(meta).encode())


def _trainer_tensor(ckpt: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace one tensor of trainer.safetensors (size, hash and seal updated)."""
    tensors = load_file(str(ckpt / ck.TRAINER_FILE))
    tensors[name] = fn(tensors[name])
    tmp = ckpt.parent / "trainer.tmp"
    ck.write_safetensors(tensors, tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    rewrite_listed_file(ckpt, ck.TRAINER_FILE, data)


def _at(meta: dict[str, Any], *path: Any) -> Any:
    for p in path:
        meta = meta[p]
    return meta


def _deep(levels: int) -> Any:
    node: Any = 0
    for _ in range(levels):
        node = [node]
    return node


TRAINER_JSON: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "sampler missing": (lambda m: m["trainer"].pop("sampler"), "trainer state 'trainer' must hold exactly"),
    "step a string": (lambda m: m["trainer"].update(step="4"), "'trainer.step'"),
    "step disagrees": (lambda m: m["trainer"].update(step=3), "manifest's step is 4"),
    "lr NaN": (lambda m: _at(m, *OPT, "param_groups", 0).update(lr=float("nan")), "param_groups.0.lr"),
    "betas out of range": (lambda m: _at(m, *OPT, "param_groups", 0).update(betas=[1.5, 0.9]), "param_groups.0.betas"),
    "flag a string": (lambda m: _at(m, *OPT, "param_groups", 1).update(amsgrad="no"), "param_groups.1.amsgrad"),
    "parameter counted twice": (
        lambda m: _at(m, *OPT, "param_groups", 1).update(params=_at(m, *OPT, "param_groups", 0, "params")),
        "must number the parameters",
    ),
    "state index in Arabic-Indic digits": (
        lambda m: _at(m, *OPT, "state").update({"\u0660": _at(m, *OPT, "state").pop("0")}),
        "is not the index of a parameter",
    ),
    "reference to a missing tensor": (
        lambda m: _at(m, *OPT, "state", "0").update(exp_avg={"__tensor__": "nope"}),
        "'nope', absent from trainer.safetensors",
    ),
    "tensor where a number goes": (lambda m: m["trainer"].update(step={"__tensor__": "x"}), "'trainer.step'"),
    "sampler seed too large": (lambda m: m["trainer"]["sampler"].update(seed=10**30), "trainer.sampler.seed"),
    "nested 100 levels": (lambda m: m["trainer"]["sampler"].update(epoch=_deep(100)), "nested deeper"),
    # PyTorch pairs a group's params[j] with that group's j-th parameter: a reordered list moves
    # the moments onto parameters of another shape.
    "params reordered in a group": (
        lambda m: _at(m, *OPT, "param_groups", 0).update(params=_at(m, *OPT, "param_groups", 0, "params")[::-1]),
        "but its parameter has",
    ),
    "unknown trainer key": (lambda m: m["trainer"].update(extra=1), "must hold exactly"),
}

TRAINER_TENSORS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "moment of another shape": ("state.0.exp_avg", lambda t: torch.zeros(3), "has shape [3], but its parameter has"),
    "moment stored as bool": ("state.1.exp_avg_sq", lambda t: t.bool(), "must be a float tensor"),
    "step a vector": ("state.2.step", lambda t: torch.zeros(4), "must be a float scalar"),
    "rng state truncated": ("rng_cpu", lambda t: t[:100], "trainer.rng_cpu"),
    "rng state as floats": ("rng_cpu", lambda t: t.float(), "a CPU RNG state is U8"),
}


def _ref(name: str) -> str:
    return f"meta.trainer.optimizer.{name}" if name.startswith("state.") else f"meta.trainer.{name}"


@pytest.mark.parametrize("name", [*TRAINER_JSON, *TRAINER_TENSORS])
def test_case_32_hostile_trainer_state_refused_naming_the_field(
    name: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    if name in TRAINER_JSON:
        edit, needle = TRAINER_JSON[name]
        _trainer_json(bad, edit)
    else:
        tensor, fn, needle = TRAINER_TENSORS[name]
        _trainer_tensor(bad, _ref(tensor), fn)
    with pytest.raises(CheckpointError) as err:
        ck.verify_checkpoint(bad)
    assert needle in str(err.value) and str(bad / ck.TRAINER_META) in str(err.value)
    for changes in ({"mode.name": "verify", "init_from": str(bad)}, {"init_from": str(bad), "train.max_steps": 1}):
        capsys.readouterr()
        assert execute(changes, tmp_path / "job") == 3
        cap = capsys.readouterr()
        assert needle in cap.err and "Traceback" not in cap.err
    # resuming the run: warned about (naming the field) and skipped for step 2
    assert execute({"train.max_steps": 3, "train.save_every": 0}, run) == 0
    cap = capsys.readouterr()
    assert f"ignoring {bad}" in cap.err and needle in cap.err
    assert "continuing from" in cap.out and "step_0000002 (step 2)" in cap.out


def test_case_32_json_too_deep_to_parse(trained: Path, tmp_path: Path) -> None:
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    rewrite_listed_file(ckpt, ck.TRAINER_META, b'{"trainer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(CheckpointError, match="trainer.json is not valid JSON"):
        ck.load_checkpoint(ckpt)


# ---------------------------------------------------------------- case 33: resume falls back


def _flip_manifest_bit(ckpt: Path) -> None:
    raw = bytearray((ckpt / ck.MANIFEST).read_bytes())
    raw[raw.index(b'"n_head": ') + 10] ^= 0x04  # one bit: 2 -> 6, still valid JSON
    (ckpt / ck.MANIFEST).write_bytes(bytes(raw))


def _resealed(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        m = manifest(ckpt)
        edit(m)
        write_manifest(ckpt, m)

    return apply


FAILURES: dict[str, tuple[Callable[[Path], None], str]] = {
    "hash: one bit of the manifest": (_flip_manifest_bit, "manifest hash mismatch"),
    "shape: n_layer 2": (_resealed(lambda m: m["model"].update(n_layer=2)), "model.n_layer=2"),
    "manifest: n_head 0": (_resealed(lambda m: m["model"].update(n_head=0)), "model.n_head"),
    "trainer state: moment shape": (
        lambda c: _trainer_tensor(c, "meta.trainer.optimizer.state.0.exp_avg", lambda t: torch.zeros(3)),
        "trainer.optimizer.state.0.exp_avg",
    ),
    "trainer state: none": (lambda c: rewrite_listed_file(c, ck.TRAINER_META, b"{}"), "no trainer state"),
    "files: weights truncated": (
        lambda c: (c / ck.MODEL_FILE).write_bytes((c / ck.MODEL_FILE).read_bytes()[:100]),
        "truncated or altered",
    ),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_case_33_resume_falls_back_past_any_failure(
    name: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    damage, reason = FAILURES[name]
    damage(bad)
    capsys.readouterr()
    assert execute({"train.max_steps": 3, "train.save_every": 0}, run) == 0
    cap = capsys.readouterr()
    assert cap.err.count(f"ignoring {bad}") == 1 and reason in cap.err, cap.err
    assert f"continuing from {run / 'checkpoints' / 'step_0000002'} (step 2)" in cap.out
    assert "Traceback" not in cap.err


def test_case_33_none_usable_auto_starts_fresh_must_exits_3(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    for step in ("step_0000002", "step_0000004"):
        _flip_manifest_bit(run / "checkpoints" / step)
    before = tree_hashes(run / "checkpoints")
    capsys.readouterr()
    assert execute({"resume": "must", "train.max_steps": 1}, run) == 3
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and err.count("ignoring") == 2
    assert tree_hashes(run / "checkpoints") == before
    assert execute({"resume": "auto", "train.max_steps": 1, "train.save_every": 0}, run) == 0
    cap = capsys.readouterr()
    assert "(2 refused, see the warnings above); starting fresh" in cap.out and cap.err.count("ignoring") == 2
    after = tree_hashes(run / "checkpoints")
    assert all(after[k] == v for k, v in before.items() if k != ck.LATEST)  # nothing lost


# ---------------------------------------------------------------- case 34: step directory names


def test_case_34_directory_claiming_a_later_step(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    root = run / "checkpoints"
    liar = root / "step_9999999"
    shutil.copytree(root / "step_0000002", liar)  # holds step 2
    assert execute({"mode.name": "verify", "init_from": str(liar)}, tmp_path / "v") == 3
    assert "the directory name says step 9999999 but its manifest holds step 2" in capsys.readouterr().err
    # resume skips it (one warning) and continues from the newest valid; retention (keep=2) counts
    # only valid checkpoints, so saving at 6 and 8 keeps 6 and 8 and leaves the liar for inspection
    assert execute({"train.max_steps": 8, "train.save_every": 2, "train.keep": 2}, run) == 0
    cap = capsys.readouterr()
    assert cap.err.count(f"ignoring {liar}") == 1
    assert f"continuing from {root / 'step_0000004'} (step 4)" in cap.out
    assert step_names(root) == ["step_0000006", "step_0000008", "step_9999999"]
    assert (root / ck.LATEST).read_text().strip() == "step_0000008"


@pytest.mark.parametrize(
    "digits", ["\u0660" * 6 + "\u0664", "\uff10" * 6 + "\uff14"], ids=["arabic-indic", "fullwidth"]
)
def test_case_34_non_ascii_digits(
    digits: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert int(digits) == 4  # what a naive parser would make of it
    run = copy_run(trained, tmp_path / "run")
    root = run / "checkpoints"
    shutil.rmtree(root / "step_0000004")
    odd = root / f"step_{digits}"
    shutil.copytree(trained / "checkpoints" / "step_0000004", odd)
    assert [d.name for d in ck.list_step_dirs(root)] == ["step_0000002"]
    assert execute({"mode.name": "verify", "init_from": str(odd)}, tmp_path / "v") == 3
    assert "ASCII digits only" in capsys.readouterr().err
    assert execute({"train.max_steps": 3, "train.save_every": 0}, run) == 0
    cap = capsys.readouterr()
    assert f"ignoring {odd}" in cap.err and "not with ASCII digits" in cap.err
    assert f"continuing from {root / 'step_0000002'} (step 2)" in cap.out


def test_case_34_directory_claiming_an_earlier_step(trained: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "step_0000001"
    shutil.copytree(trained / "checkpoints" / "step_0000004", ckpt)
    with pytest.raises(CheckpointError, match="says step 1 but its manifest holds step 4"):
        ck.load_checkpoint(ckpt)
    other = tmp_path / "renamed_copy"  # a name that is not a step directory's is not checked
    ckpt.rename(other)
    assert ck.verify_checkpoint(other)["step"] == 4


# ---------------------------------------------------------------- operating-system stray files


STRAYS = [".DS_Store", "Thumbs.db", "._model.safetensors", "desktop.ini"]


def test_os_stray_files_are_ignored_with_a_warning(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_0000004"
    for name in STRAYS:
        (ckpt / name).write_bytes(b"\x00\x05\x16\x07 finder metadata")
    capsys.readouterr()
    assert execute({"mode.name": "verify", "init_from": str(ckpt)}, tmp_path / "v") == 0
    err = capsys.readouterr().err
    for name in STRAYS:
        assert err.count(f"{ckpt / name}: operating-system file") == 1
    out = tmp_path / "up"
    assert execute({"mode.name": "upgrade", "init_from": str(ckpt), "out": str(out)}, tmp_path / "u") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([ck.MANIFEST, *manifest(ckpt)["files"]])
    assert execute({"train.max_steps": 5, "train.save_every": 0}, run) == 0
    assert f"continuing from {ckpt} (step 4)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["notes.txt", "model.pt", "DS_Store", ".DS_Store.pt", "link"])
def test_other_unlisted_files_are_still_refused(name: str, trained: Path, tmp_path: Path) -> None:
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    if name == "link":  # a stray's name on a symlink is not a stray file
        (ckpt / ".DS_Store").symlink_to(ckpt / ck.MODEL_FILE)
        match = "not a regular file|unsafe or unknown"
    else:
        (ckpt / name).write_bytes(b"x")
        match = "unsafe or unknown file"
    with pytest.raises(CheckpointError, match=match):
        ck.verify_checkpoint(ckpt)
