"""The command line before any job: its flags, `--version`, and the help and tab-completion lists.

Flags are read with Hydra's own argument parser, so `qtrain` understands exactly what Hydra
does. `--version`, `--help` and shell completion answer without importing torch (a Tab
press costs Python, Hydra and one config composition, well under a second), and never offer
the ConfigStore's schema entries (``mode_schema``, ...) as options: they are the YAML options'
types, not choices.

Where the run directory goes (``Flags.scratch``): ``mode=eval``, ``generate`` and ``verify``
only read checkpoints and print their result, and ``mode=export`` writes only to ``out``, so
unless the user names a run directory (``hydra.run.dir=DIR``, where ``report.json`` is then
written) or runs a sweep (whose job
directories ``mode=report`` reads), they run in a temporary directory that is removed
afterwards: no ``outputs/DATE/TIME`` is left behind.
"""

from __future__ import annotations

import contextlib
import io
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata

from omegaconf import OmegaConf

import qtrain
from qtrain.config import SCHEMA_NAMES
from qtrain.console import console
from qtrain.explain import ADDED_GROUPS, group_options, groups

HELP_RESOLVER = "qtrain_groups"
"""OmegaConf resolver the help template (conf/config.yaml) lists the config groups with."""
SCRATCH_MODES = ("eval", "generate", "verify", "export")
"""Modes that keep no run directory unless one is asked for (see the module doc)."""


@dataclass
class Flags:
    """What the command line asks for, besides the overrides."""

    overrides: list[str]
    multirun: bool
    version: bool
    completion: bool
    info_only: bool
    """--help, --hydra-help, --cfg, --info, -sc install=...: print something, run nothing."""
    own_config: bool
    """--config-name/--config-path/--config-dir: not qtrain's shipped config; Hydra checks it."""
    help: bool = False
    """--help (answered by :func:`print_help`, unless the config is the user's own)."""
    shows_config: bool = False
    """--cfg/--info: Hydra prints the composed config; its overrides must compose (checked first)."""
    resolve: bool = False
    """--resolve: show the config in --help with interpolations resolved."""

    @property
    def precheck(self) -> bool:
        """Whether the run (or sweep) is composed and checked before Hydra starts."""
        return not (self.version or self.completion or self.info_only or self.own_config)

    def scratch(self, mode: str | None) -> bool:
        """Whether this run goes to a temporary run directory that is removed afterwards."""
        asked = any(o.lstrip("+").startswith("hydra.run.dir=") for o in self.overrides)
        return mode in SCRATCH_MODES and not (asked or self.multirun)


def parse_flags(argv: list[str]) -> Flags:
    """Read `argv` as Hydra will (unknown flags are left for Hydra to refuse)."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:  # Hydra's parser would print Hydra's version and exit
        return Flags([], False, True, False, True, False)
    args, _ = get_args_parser().parse_known_args(argv)
    sc = args.shell_completion
    return Flags(
        overrides=list(args.overrides),
        multirun=bool(args.multirun) or "hydra.mode=MULTIRUN" in args.overrides,
        version=False,
        completion=bool(sc) and any(o.startswith("query=") for o in args.overrides),
        info_only=bool(args.help or args.hydra_help or args.cfg or args.info or sc or args.experimental_rerun),
        own_config=bool(args.config_name or args.config_path or args.config_dir),
        help=bool(args.help),
        shows_config=bool(args.cfg or args.info) and not sc,
        resolve=bool(args.resolve),
    )


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """qtrain's version with torch's, Hydra's and Python's (read from package metadata: no imports)."""
    return (
        f"qtrain {qtrain.__version__} (torch {_dist_version('torch')}, Hydra {_dist_version('hydra-core')}, "
        f"Python {platform.python_version()})"
    )


def help_groups() -> str:
    """The config groups and their options for `--help` (what ``$APP_CONFIG_GROUPS`` would list, minus schemas)."""
    lines = []
    for group in groups():
        add = f"    (add one with +{group}=NAME)" if group in ADDED_GROUPS else ""
        lines.append(f"{group}: {', '.join(group_options(group))}{add}")
    return "\n".join(lines) + "\n"


def register_help() -> None:
    """Register the resolver the help template lists the groups with (idempotent)."""
    OmegaConf.register_new_resolver(HELP_RESOLVER, help_groups, replace=True)


def print_help(overrides: list[str], resolve: bool) -> None:
    """`--help` as Hydra prints it from ``hydra.help.template``, in one composition.

    Hydra's own `--help` lists every config group of the app and of Hydra itself (about 75
    group look-ups, seconds on a small machine) even when the template does not show them.
    """
    import string

    from hydra import compose, initialize_config_module
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    from qtrain.explain import explain
    from qtrain.precheck import CONF_MODULE, CONFIG_NAME, fail

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONF_MODULE, version_base=None):
            cfg = compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
    except Exception as err:  # noqa: BLE001 - a bad override: say which, like a run would
        fail(explain(err, " ".join(overrides)))
    finally:
        GlobalHydra.instance().clear()
    template = str(cfg.hydra.help.template)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra")
    text = string.Template(template).safe_substitute(
        FLAGS_HELP=Hydra.format_args_help(get_args_parser()),
        APP_CONFIG_GROUPS=help_groups(),
        HYDRA_CONFIG_GROUPS="(qtrain --hydra-help lists them)",
        CONFIG=OmegaConf.to_yaml(cfg, resolve=resolve),
    )
    console.out(text, highlight=False)


def without_schema_names(text: str) -> str:
    """Completion candidates minus the ConfigStore's schema entries (``quant=quant_schema``, ...)."""
    words = text.split()
    kept = [w for w in words if re.split(r"[=/]", w)[-1] not in SCHEMA_NAMES]
    return ("\n" if "\n" in text.strip() else " ").join(kept)


@contextlib.contextmanager
def completion_output() -> Iterator[None]:
    """Capture what Hydra's completion prints and print it again without schema names."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        console.out(without_schema_names(buffer.getvalue()), highlight=False)
