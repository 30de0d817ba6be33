"""Multirun job directory names: short, filesystem-safe, readable, and pasteable into `runs=[...]`."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qtrain.config import register_configs
from qtrain.jobdir import MAX_SUMMARY, job_dir_name, override_hash
from tests.conftest import compose_cfg

SAFE = re.compile(r"[A-Za-z0-9._+-]+")
HOOKS = (
    "hooks=[{_target_:qtrain.quant.hooks.SQNRLogger,every:5},"
    '{_target_:qtrain.quant.hooks.KeepFullPrecision,patterns:["blocks.0.attn.*"]}]'
)
SWEEP_JOB = [
    "mode=qat",
    "quant=int4",
    "quant.group_size=-1",
    "init_from=/tmp/sr_fp",
    "model=tiny",
    "train.max_steps=10",
    "train.batch_size=8",
    "train.lr=5e-4",
    "data.val_windows=8",
    "eval.decode_tokens=32",
    HOOKS,
]
EXCLUDE = ["hydra.run.dir", "hydra.sweep.dir", "init_from", "compare_to", "data.path", "out", "runs"]


def test_plain_overrides_read_as_typed() -> None:
    name = job_dir_name(3, ["mode=qat", "quant=int4", "quant.group_size=32"])
    assert name == "3_mode-qat+quant-int4+quant.group_size-32"
    assert job_dir_name(0, []) == "0"
    assert job_dir_name(1, ["init_from=/a/b"], EXCLUDE) == "1"  # paths stay out of the name
    assert job_dir_name(2, ["~train.lr"]) == "2_no-train.lr"


def test_long_and_hook_overrides_are_cut_and_hashed() -> None:
    name = job_dir_name(7, SWEEP_JOB, EXCLUDE)
    assert SAFE.fullmatch(name), name
    assert len(name) <= len("7_") + MAX_SUMMARY
    assert name.startswith("7_mode-qat+quant-int4+quant.group_size--1+model-tiny")
    assert name.endswith(f"+sha-{override_hash(SWEEP_JOB)}")
    # the hash covers everything: a hook argument or an excluded path changes it
    other_hook = [o.replace("every:5", "every:6") for o in SWEEP_JOB]
    other_init = [o.replace("/tmp/sr_fp", "/tmp/other") for o in SWEEP_JOB]
    assert len({name, job_dir_name(7, other_hook, EXCLUDE), job_dir_name(7, other_init, EXCLUDE)}) == 3
    # a hook list alone is named by its classes, and marked as a summary by the hash
    assert job_dir_name(0, [HOOKS]) == f"0_hooks-SQNRLogger.KeepFullPrecision+sha-{override_hash([HOOKS])}"
    # a single value longer than the limit is cut, never past the filesystem's 255 bytes
    huge = job_dir_name(5, ["generate.prompt=" + "x" * 400])
    assert SAFE.fullmatch(huge) and len(huge) <= len("5_") + MAX_SUMMARY


def _names() -> list[str]:
    """Job dir names as sweeps make them, plus hashes that lex as numbers in Hydra's grammar."""
    names = [job_dir_name(i, SWEEP_JOB[: i + 1], EXCLUDE) for i in range(len(SWEEP_JOB))]
    names += [job_dir_name(0, ["train.lr=1e-3", "qat.distill=true", "ptq.method=gptq"]), "3"]
    names += [f"0_mode-ptq+sha-{h}" for h in ("1e5e5e5e", "00000000", "12345678", "0e000000", "deadbeef", "1a2b3c4d")]
    rng = random.Random(0)
    names += [f"{rng.randrange(100)}_train.lr-{rng.random():.0e}+sha-{rng.getrandbits(32):08x}" for _ in range(200)]
    return names


def test_job_dirs_parse_back_through_runs_override(tmp_path: Path) -> None:
    parser = OverridesParser.create()
    for name in _names():
        assert SAFE.fullmatch(name), name
        for path in (name, f"multirun/2025-01-01/12-00-00/{name}", str(tmp_path / "sweep" / name)):
            value = parser.parse_override(f"runs=[{path}]").value()
            assert [str(v) for v in value] == [path], (path, value)
    # and end to end through the composed, typed config of mode=report
    name = job_dir_name(7, SWEEP_JOB, EXCLUDE)
    cfg = compose_cfg(["mode=report", f"runs=[{tmp_path}/sweep,{tmp_path}/sweep/{name}]"])
    assert cfg.runs == [f"{tmp_path}/sweep", f"{tmp_path}/sweep/{name}"]


def test_config_names_sweep_jobs_with_the_resolver() -> None:
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("qtrain.conf", version_base=None):
            cfg = compose("config", overrides=SWEEP_JOB, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.job.num = 7  # set by the launcher in a real sweep
    assert cfg.hydra.sweep.subdir == job_dir_name(7, SWEEP_JOB, EXCLUDE)
    assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == EXCLUDE


@pytest.mark.parametrize("num", [0, 12])
def test_job_number_leads(num: int) -> None:
    assert job_dir_name(num, ["mode=ptq"]).startswith(f"{num}_")


def test_importing_qtrain_registers_the_resolver() -> None:
    # a launcher plugin's worker imports qtrain.cli's task function and never calls main()
    code = "import qtrain.cli; from omegaconf import OmegaConf; assert OmegaConf.has_resolver('qtrain_jobdir')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
