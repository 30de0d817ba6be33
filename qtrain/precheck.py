"""Check what the user typed before any job starts: every problem at once, exit 2, nothing created.

A plain run composes its config once. A multirun (``-m``) is expanded the way Hydra's basic
sweeper expands it (the product of the comma lists, ``range(...)``, ...) and every job's config
is composed and validated, so a typo in a sweep is refused with the same message as in a single
run, before the sweep directory exists. Jobs share the expensive part: each distinct set of
group choices (``quant=int4``, ``+experiment=...``, ``hydra...``) is composed by Hydra once, and
a job's other overrides are applied to a copy the way Hydra applies them. A problem several jobs
share is listed once, with the jobs it concerns.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from qtrain.config import RunConfig
from qtrain.config_rules import validate, warnings_for
from qtrain.console import err_console, error, labelled
from qtrain.errors import EXIT_CONFIG
from qtrain.explain import explain, not_a_sweep, unknown_key, unparsable, valid_keys

CONF_MODULE = "qtrain.conf"
CONFIG_NAME = "config"


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    """Print one clear error paragraph and exit with `code` (`message` is plain text, never markup)."""
    error(message)
    sys.exit(code)


@dataclass
class Findings:
    """What the check found: each message once, with the indices of the jobs it concerns."""

    jobs: list[list[str]]
    problems: dict[str, list[int]] = field(default_factory=dict)
    warnings: dict[str, list[int]] = field(default_factory=dict)
    configs: list[RunConfig | None] = field(default_factory=list)

    def add(self, kind: dict[str, list[int]], messages: list[str], job: int) -> None:
        """Record `messages` for job `job` in `kind` (problems or warnings), once per job."""
        for msg in messages:
            seen = kind.setdefault(msg, [])
            if not seen or seen[-1] != job:
                seen.append(job)


# ---------------------------------------------------------------- composing jobs


@dataclass
class _Base:
    """A config composed from one set of group choices, the Hydra settings it resolved, its problems."""

    cfg: DictConfig | None
    hydra: dict[str, Any]
    problems: list[str]


class Composer:
    """Composes job configs; each distinct set of group (and `hydra...`) overrides composes once."""

    def __init__(self) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader: Any = GlobalHydra.instance().config_loader()
        self.parser = OverridesParser.create(config_loader=self.loader)
        self._parsed: dict[str, Any] = {}
        self._bases: dict[tuple[str, ...], _Base] = {}

    def parse(self, line: str) -> Any:
        """The parsed override, or the message saying why it does not parse."""
        if line not in self._parsed:
            try:
                self._parsed[line] = self.parser.parse_override(line)
            except Exception as err:  # noqa: BLE001 - any parse failure is the user's override
                self._parsed[line] = unparsable(line, err)
        return self._parsed[line]

    def _structural(self, ov: Any) -> bool:
        """Whether an override changes what is composed (a group choice or a Hydra setting)."""
        key = ov.key_or_group
        return key.startswith("hydra") or (
            not isinstance(ov.value(), dict) and self.loader.repository.group_exists(key)
        )

    def base(self, lines: tuple[str, ...]) -> _Base:
        """The config of these group choices (composed once); a bad choice is left out and named."""
        if lines not in self._bases:
            self._bases[lines] = self._compose_base(list(lines))
        return self._bases[lines]

    def _compose_base(self, lines: list[str]) -> _Base:
        from hydra import compose

        problems: list[str] = []
        while True:
            try:
                cfg = compose(CONFIG_NAME, overrides=lines, return_hydra_config=True)
                break
            except Exception as err:  # noqa: BLE001 - every composition failure is a user error here
                culprit = _culprit(err, lines)
                problems.append(explain(err, culprit or " ".join(lines)))
                if culprit is None:
                    return _Base(None, {}, problems)
                lines = [x for x in lines if x != culprit]
        h = cfg.hydra
        sweeper = OmegaConf.to_container(h.sweeper, resolve=True)
        assert isinstance(sweeper, dict)
        info = {"run_dir": str(h.run.dir), "sweep_dir": str(h.sweep.dir), "sweeper": sweeper}
        with open_dict(cfg):
            del cfg["hydra"]
        return _Base(cfg, info, problems)

    def job(self, lines: list[str]) -> tuple[DictConfig | None, dict[str, Any], list[str]]:
        """A job's composed config (None if its group choices fail), Hydra settings and problems."""
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        problems: list[str] = []
        structural: list[str] = []
        values: list[tuple[str, Any]] = []
        for line in lines:
            ov = self.parse(line)
            if isinstance(ov, str):
                problems.append(ov)
            elif ov.is_sweep_override():
                problems.append(not_a_sweep(line))
            elif self._structural(ov):
                structural.append(line)
            else:
                values.append((line, ov))
        base = self.base(tuple(structural))
        problems += base.problems
        if base.cfg is None:
            return None, base.hydra, problems
        cfg = copy.deepcopy(base.cfg)
        for line, ov in values:  # one at a time, as Hydra applies them, so every bad one is named
            try:
                ConfigLoaderImpl._apply_overrides_to_config([ov], cfg)
            except Exception as err:  # noqa: BLE001 - a refused override is the user's
                problems.append(explain(err, line))
        return cfg, base.hydra, problems


def _culprit(err: BaseException, lines: list[str]) -> str | None:
    """The override that made a composition fail, when the error says which."""
    from hydra.errors import MissingConfigException

    if len(lines) == 1:
        return lines[0]
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        for line in lines:
            key, _, value = line.partition("=")
            if key.lstrip("+~").split("@")[0] == group and value == option:
                return line
    text = str(err)
    return next((x for x in lines if x in text or f"'{x.split('=')[0].lstrip('+~')}'" in text), None)


def extra_keys(node: DictConfig, parent: str = "") -> list[str]:
    """Keys in a composed config that the schema does not have (added with `+key=...`)."""
    valid = valid_keys(parent)
    out: list[str] = []
    for name in node:
        key = str(name)
        path = f"{parent}.{key}" if parent else key
        if key not in valid:
            out.append(path)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and valid_keys(path):
            out += extra_keys(child, path)
    return out


# ---------------------------------------------------------------- checking a run or a sweep


def expand(composer: Composer, lines: list[str]) -> tuple[list[list[str]], list[str]]:
    """A multirun's job override lists, as Hydra's basic sweeper makes them; or why it cannot."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = [composer.parse(line) for line in lines]
    problems = [p for p in parsed if isinstance(p, str)]
    if problems:
        return [], problems
    try:
        return BasicSweeper.split_arguments(parsed, None)[0], []
    except Exception as err:  # noqa: BLE001 - e.g. an interval sweep, which only other sweepers take
        return [], [f"{' '.join(lines)}: {err}"]


def _to_run_config(cfg: DictConfig) -> tuple[RunConfig | None, list[str]]:
    extra = extra_keys(cfg)
    if extra:
        return None, [f"{unknown_key(k)} (+ cannot add keys to qtrain's config)" for k in extra]
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as err:  # noqa: BLE001 - a value the schema refuses
        return None, [str(err).strip().splitlines()[0]]
    assert isinstance(obj, RunConfig)
    return obj, []


def check(overrides: list[str], multirun: bool, values: bool = True) -> Findings:
    """Compose and validate the run (or every job of the sweep) that `overrides` describe.

    With ``values=False`` only what keeps a config from composing is a problem (typos, bad
    options, types): ``--cfg job`` can still print a config whose values are out of range.
    """
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base=None):
            return _check(Composer(), overrides, multirun, values)
    finally:
        GlobalHydra.instance().clear()


def _check(composer: Composer, overrides: list[str], multirun: bool, values: bool = True) -> Findings:
    jobs, problems = expand(composer, overrides) if multirun else ([overrides], [])
    if multirun and jobs:
        sweeper = composer.job(jobs[0])[1].get("sweeper", {})
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return Findings(jobs=[])  # another sweeper expands its own way: Hydra checks its jobs
        if sweeper.get("params"):
            extra = [f"{k}={v}" for k, v in sweeper["params"].items()]
            jobs, problems = expand(composer, [*extra, *overrides])
    found = Findings(jobs=jobs or [overrides])
    found.add(found.problems, problems, 0)
    env = _Environment()
    for i, job in enumerate(jobs):
        cfg, hydra, msgs = composer.job(job)
        run: RunConfig | None = None
        if cfg is not None and not msgs:
            run, msgs = _to_run_config(cfg)
        if run is not None and values:
            msgs = validate(run) + env.problems(run)
            found.add(found.warnings, warnings_for(run), i)
        found.add(found.problems, msgs, i)
        found.configs.append(run)
        if i == 0 and hydra and values:
            where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            found.add(found.problems, _unwritable(where, hydra["sweep_dir" if multirun else "run_dir"]), 0)
        if i == 0 and hydra and values and not multirun and run is not None and not found.problems:
            from qtrain.modes.resume_check import check_run_dir  # a resume with settings it may not change

            found.add(found.problems, check_run_dir(run, Path(hydra["run_dir"])), 0)
    return found


class _Environment:
    """Checks against this machine and installation (CUDA, hook imports), each done once."""

    def __init__(self) -> None:
        self._device: list[str] | None = None
        self._hooks: dict[str, list[str]] = {}

    def problems(self, cfg: RunConfig) -> list[str]:
        """Problems of `cfg` that only show on this machine: CUDA, input paths, hook imports."""
        out = self._device_problems() if cfg.device == "cuda" else []
        paths = {"init_from": cfg.init_from, "compare_to": cfg.compare_to}
        if cfg.data.name == "text":
            paths["data.path"] = cfg.data.path
        out += [f"{k}: {Path(v).expanduser()} does not exist" for k, v in paths.items() if v and not _exists(v)]
        if cfg.hooks:
            key = repr(cfg.hooks)
            if key not in self._hooks:
                from qtrain.quant.hooks import check_specs

                self._hooks[key] = check_specs(cfg.hooks)
            out += self._hooks[key]
        return out

    def _device_problems(self) -> list[str]:
        if self._device is None:
            import torch

            if not torch.backends.cuda.is_built():
                why = f"this PyTorch build ({torch.__version__}) has no CUDA support"
            elif not torch.cuda.is_available():
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
                why = f"PyTorch {torch.__version__} is built with CUDA {torch.version.cuda} but sees no GPU{shown}"
            else:
                self._device = []
                return []
            self._device = [f"device=cuda: {why}. Use device=cpu, or device=auto (CUDA when there is a GPU, else CPU)"]
        return self._device


def _exists(path: str) -> bool:
    return Path(path.removeprefix("hf:")).expanduser().exists()  # hf:DIR, a local Hugging Face model


def _unwritable(key: str, run_dir: str) -> list[str]:
    p = Path(run_dir).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        return [f"{key}: output directory {run_dir} is not writable ({p} is not a writable directory)"]
    return []


# ---------------------------------------------------------------- reporting


def _jobs_note(indices: list[int], found: Findings, multirun: bool) -> str:
    if not multirun:
        return ""
    total = len(found.jobs)
    if len(indices) == total:
        return "  [every job]" if total > 1 else ""
    first = indices[0]
    example = " ".join(o for o in found.jobs[first] if not o.lstrip("+~").startswith("hydra"))
    if len(indices) == 1:
        return f"  [job {first}: {example}]"
    return f"  [{len(indices)} of {total} jobs, e.g. job {first}: {example}]"


def report(found: Findings, multirun: bool) -> None:
    """Print the warnings; on problems, list them all and exit 2."""
    for msg, jobs in found.warnings.items():
        err_console.print(labelled("warning", "yellow", msg + _jobs_note(jobs, found, multirun)))
    if not found.problems:
        return
    lines = [msg + _jobs_note(jobs, found, multirun) for msg, jobs in found.problems.items()]
    n = len(lines)
    total = len(found.jobs)
    what = "invalid configuration"
    if multirun:
        what = f"invalid sweep of {total} job{'s' if total > 1 else ''}; none was started"
    if n == 1 and not multirun:
        fail(lines[0])
    listed = "\n  - ".join(lines)
    fail(f"{what} ({n} problem{'s' if n > 1 else ''}):\n  - {listed}")


def precheck(overrides: list[str], multirun: bool = False, values: bool = True) -> list[RunConfig | None]:
    """Check a run or sweep (see the module doc); exit 2 on problems; return the jobs' configs."""
    found = check(overrides, multirun, values)
    report(found, multirun)
    return found.configs
