"""Plain-language messages for mistakes on the command line, each naming the override it is about.

Hydra reports a bad override as an exception whose text is written for Hydra's developers
(``Error merging override train.lr=abc``). :func:`explain` turns each one into one line that
says what was typed, why it was refused and what would be accepted, using the typed schema
(:class:`qtrain.config.RunConfig`) for key names, value types and defaults. Schema entries of
the ConfigStore (``mode_schema``, ...) are never offered as choices.

Example:
    >>> unknown_key("trian.max_steps")
    "trian.max_steps: unknown config key. Did you mean train? Valid top-level keys: ..."  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from qtrain.config import SCHEMA_NAMES, RunConfig

ADDED_GROUPS = ("experiment",)
"""Config groups that are not in the defaults list: a user adds one with ``+group=option``."""
EXAMPLES = {
    "hooks": "'hooks=[{_target_: qtrain.quant.hooks.SQNRLogger, every: 100}]'",
    "runs": "'runs=[DIR1,DIR2]'",
}
"""Example values for keys whose type alone does not say how to write one."""


def conf_dir() -> Path:
    """The shipped config directory (`qtrain.conf`)."""
    import qtrain.conf

    return Path(qtrain.conf.__file__).parent


def group_options(group: str) -> list[str]:
    """The YAML options of a config group, as users type them (never a schema name)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if p.stem not in SCHEMA_NAMES)


def groups() -> list[str]:
    """The config groups a user can choose from (directories of `conf/` holding YAML options)."""
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and group_options(p.name))


# ---------------------------------------------------------------- the schema


@cache
def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """Field name -> (type hint, default) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        default = factory() if factory is not dataclasses.MISSING else f.default
        out[f.name] = (hints[f.name], default)
    return out


def _node(path: str) -> tuple[Any, Any] | None:
    """(type hint, default) of a dotted schema key; the root for ``""``; None if no such key."""
    hint: Any = RunConfig
    default: Any = None
    for part in filter(None, path.split(".")):
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)) or part not in _fields(hint):
            return None
        hint, default = _fields(hint)[part]
    return hint, default


def valid_keys(parent: str) -> list[str]:
    """The keys of the schema node at `parent` (``""``: the top level); [] if it is not a group of keys."""
    node = _node(parent)
    hint = node[0] if node else None
    return sorted(_fields(hint)) if isinstance(hint, type) and dataclasses.is_dataclass(hint) else []


def describe_type(hint: Any) -> str:
    """How a value of this type is written, in words ("a float", "true or false", ...)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        return f"{describe_type(args[0])} or null"
    if typing.get_origin(hint) is list or hint is list:
        return "a list in brackets"
    names = {bool: "true or false", int: "an integer", float: "a float", str: "a string"}
    return names.get(hint, "a value")


# ---------------------------------------------------------------- messages


def _suggest(word: str, candidates: list[str]) -> list[str]:
    return difflib.get_close_matches(word, candidates, n=3, cutoff=0.75)


def unknown_key(key: str) -> str:
    """A key that is not in the schema: the first unknown part, close matches, and the valid keys there."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        valid = valid_keys(parent)
        if not valid:  # parent is a single value, not a group of keys
            return f"{key}: unknown config key; {parent} is a single value, not a group of keys"
        if part in valid:
            continue
        candidates = valid + list(ADDED_GROUPS) if not parent else valid
        close = [f"+{c}" if c in ADDED_GROUPS else f"{parent}.{c}" if parent else c for c in _suggest(part, candidates)]
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        where = f"Valid keys of {parent}" if parent else "Valid top-level keys"
        return f"{key}: unknown config key.{hint} {where}: {', '.join(valid)}"
    return f"{key}: unknown config key"


def bad_option(group: str, option: str, options: list[str] | None = None) -> str:
    """`group=option` where the group has no such option."""
    valid = [o for o in (options or group_options(group)) if o not in SCHEMA_NAMES]
    close = _suggest(option, valid)
    hint = f" Did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else ""
    return f"{group}={option}: no such option in group '{group}'; valid choices: {', '.join(valid)}.{hint}"


def _written(value: Any) -> str:
    """A default as it is typed on the command line (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def bad_value(line: str, key: str) -> str:
    """`key=value` whose value does not fit the key's type."""
    node = _node(key)
    if node is None:
        return f"{line}: value refused for {key}"
    hint, default = node
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        first, (_, value) = next(iter(_fields(hint).items()))  # the first declared: the main one
        return (
            f"{line}: {key} is a group of settings, not a single value; set its keys, e.g. "
            f"{key}.{first}={_written(value)} (keys: {', '.join(valid_keys(key))})"
        )
    example = EXAMPLES.get(key)
    if example is None and hint in (int, float, bool):
        example = f"{key}={_written(default)}"
    elif example is None and typing.get_origin(hint) is list:
        example = f"'{key}=[a,b]'"
    return f"{line}: expected {describe_type(hint)} for {key}" + (f", e.g. {example}" if example else "")


def explain(err: BaseException, line: str) -> str:
    """One line for a Hydra composition or parse error caused by the override `line`."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError, ValidationError

    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    cause = err.__cause__
    key = line.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return bad_option(group, option, list(err.options or []))
    if isinstance(err, OverrideParseException):
        return unparsable(line, err)
    if key.startswith("hydra"):
        return f"{line}: {first}"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or "Could not override" in text:
        if "No match in the defaults list" in text:
            return f"{line}: {key} is not chosen by default, so it cannot be replaced; add it with +{line}"
        return unknown_key(key)
    if isinstance(cause, ValidationError):
        return bad_value(line, str(getattr(cause, "full_key", "") or key))
    if isinstance(cause, ConfigTypeError) and line.startswith("~"):
        return f"{line}: keys of qtrain's config cannot be deleted; set a value instead ({key}=...)"
    if "An item is already at" in text:
        return f"{line}: {key} already exists, so it cannot be added with +; set it without the +: {line[1:]}"
    if "Ambiguous value" in text:
        return not_a_sweep(line)
    return f"{line}: {first}"


def unparsable(line: str, err: BaseException) -> str:
    """An override that is not valid override syntax."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (
        f"{line}: cannot parse this override ({first}). Quote a value with spaces, commas or brackets, "
        f"e.g. 'generate.prompt=\"def f(a, b):\"'"
    )


def not_a_sweep(line: str) -> str:
    """A sweep (`key=a,b`, `range(...)`) in a single run."""
    return (
        f"{line}: a comma-separated value (or range/glob) is a sweep; add -m to run one job per value, "
        f"write a list as [a,b], or quote it as a string"
    )
