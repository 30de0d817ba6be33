"""Which settings a resumed run may change, compared key by key with its checkpoint (case 38).

A checkpoint's manifest records the resolved config it was trained with (``config``) and the
fingerprint of its corpus (``corpus``). Resuming restores the optimizer state (learning
rate, betas, weight decay), the data order and the model from the checkpoint, so most
settings cannot change mid-run without the new manifest recording a value that was not the
one used. Only the settings in :data:`SAFE_KEYS` (and the :data:`SAFE_GROUPS`) may change:
they are applied, recorded in the new checkpoints and ``.hydra``, and printed. Any other
difference refuses the resume (exit 2) with the list of keys.

Example:
    >>> saved = {"train": {"lr": 0.003, "max_steps": 100}, "seed": 1}
    >>> diff = compare(saved, {"train": {"lr": 0.01, "max_steps": 200}, "seed": 1})
    >>> [c.key for c in diff.applied], [c.key for c in diff.refused]
    (['train.max_steps'], ['train.lr'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qtrain.config import TRAINING_MODES, RunConfig

SAFE_KEYS = frozenset(
    {
        "train.max_steps",
        "train.eval_every",
        "train.save_every",
        "train.keep",
        "train.log_every",
        "threads",
        # how the same computation is executed, not what is computed
        "device",
        "compile",
        "train.activation_checkpointing",
        # used by other modes only (eval, upgrade, report)
        "compare_to",
        "out",
        "runs",
    }
)
"""Settings a resumed run may change: applied, recorded and printed."""
SAFE_GROUPS = ("eval", "generate")
"""Groups a resumed run may change as a whole: benchmark sizes and sampling, not training."""
NOT_COMPARED = frozenset({"resume"})
"""Asking to resume (auto/must) is not a setting of the run."""
PATH_KEYS = frozenset({"init_from", "data.path"})
"""Compared as paths: the same file written another way is no change."""
CORPUS_HASHES = ("train_sha256", "val_sha256")
"""The corpus fingerprint fields that say whether the data is the same."""
FORMER_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "train.min_lr_ratio": (0.1,),
    "qat.distill": (False,),
    "qat.distill_weight": (1.0,),
}
"""Defaults that changed, with their earlier values. A checkpoint trained with an earlier default and
resumed by a command that leaves the key at today's default keeps the checkpoint's value: the run
continues as it was started (a resume across an upgrade is not a settings change)."""
_CORPUS_NOTE = (
    ". The corpus text differs from the text the checkpoint was trained on (corpus.*: SHA-256 of its "
    "training and validation splits): restore it, or train on the new text in a new run dir"
)


@dataclass(frozen=True)
class Change:
    """One setting that differs from the checkpoint's."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}={self.old!r} (this run: {self.new!r})"


@dataclass
class Comparison:
    """The settings that changed since the checkpoint: the ones a resume applies, the ones it refuses."""

    applied: list[Change] = field(default_factory=list)
    refused: list[Change] = field(default_factory=list)
    kept: list[Change] = field(default_factory=list)
    """Keys whose default changed since the checkpoint: the run keeps the checkpoint's value (`old`)."""


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config mapping -> ``{"train.lr": 0.003, ...}`` (lists are one value)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


TOKENIZER_KEYS = ("data.tokenizer", "data.tokenizer_path")
"""Set by the run itself from `init_from=hf:DIR` (the model's own tokenizer)."""


def _set_by_the_run(key: str, saved: Mapping[str, Any], now: Any, defaults: Mapping[str, Any]) -> bool:
    """Whether `key` differs only because the run set it: a command that leaves it at its default is no change.

    A bpe/hf run records the tokenizer's `model.vocab_size`, and `init_from=hf:DIR` records
    `data.tokenizer=hf` with that directory; the resumed run sets them again from the same
    tokenizer, whose SHA-256 the resume compares with the checkpoint's.
    """
    if now != defaults.get(key):
        return False
    if key == "model.vocab_size":
        return saved.get("data.tokenizer", "bytes") != "bytes"
    return key in TOKENIZER_KEYS and str(saved.get("init_from") or "").startswith("hf:")


def is_safe(key: str) -> bool:
    """Whether a resumed run may change `key`."""
    return key in SAFE_KEYS or key.split(".", 1)[0] in SAFE_GROUPS


def _same_path(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def _defaults() -> dict[str, Any]:
    """The schema's default of every key: what a checkpoint written before a key existed used."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig()), resolve=True))  # type: ignore[arg-type]


def same_corpus(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> bool | None:
    """Whether two corpus fingerprints have the same content (None when either is unknown)."""
    if not isinstance(saved, Mapping) or not isinstance(now, Mapping):
        return None
    if not all(k in saved for k in CORPUS_HASHES):
        return None
    return all(saved.get(k) == now.get(k) for k in CORPUS_HASHES)


def compare(
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    saved_corpus: Mapping[str, Any] | None = None,
    now_corpus: Mapping[str, Any] | None = None,
) -> Comparison:
    """Compare the checkpoint's config (`saved`) with this run's (`now`), key by key.

    A key the checkpoint does not record (written before the key existed) counts as its
    default. A key only the checkpoint has (a setting since removed) is not compared.

    Args:
        saved: the manifest's ``config``.
        now: this run's resolved config (``config_dict``).
        saved_corpus: the manifest's ``corpus`` fingerprint, if any.
        now_corpus: the fingerprint of the corpus this run loaded, if known yet.

    Returns:
        The safe changes (applied) and the others (refused), in key order.
    """
    old, new, defaults = flatten(saved), flatten(now), _defaults()
    result = Comparison()
    content = same_corpus(saved_corpus, now_corpus)
    for key in sorted(new):
        before = old.get(key, defaults.get(key))
        after = new[key]
        if key in NOT_COMPARED or before == after or (key in PATH_KEYS and _same_path(before, after)):
            continue
        if _set_by_the_run(key, old, after, defaults):
            continue
        if after == defaults.get(key) and before in FORMER_DEFAULTS.get(key, ()):
            result.kept.append(Change(key, before, after))
            continue
        change = Change(key, before, after)
        if is_safe(key) or (key == "data.path" and content):  # the same text under another name
            result.applied.append(change)
        else:
            result.refused.append(change)
    if content is False:
        assert saved_corpus is not None and now_corpus is not None
        for k in CORPUS_HASHES:
            if saved_corpus.get(k) != now_corpus.get(k):
                result.refused.append(Change(f"corpus.{k}", saved_corpus.get(k), now_corpus.get(k)))
    return result


def refusal(path: Path, refused: list[Change]) -> str:
    """The exit-2 message: what differs, why it cannot change, what to do."""
    safe = ", ".join([*sorted(k for k in SAFE_KEYS if k not in ("out", "runs", "compare_to")), "eval.*"])
    return (
        f"resume: {path} was trained with other settings than this run: {', '.join(map(str, refused))}. "
        f"A resumed run keeps the checkpoint's model, data, optimizer state and schedule, so these cannot "
        f"change mid-run: re-run with the checkpoint's values, or start a new run dir (hydra.run.dir=...) "
        f"(init_from={path} to start from its weights). A resume may change only: {safe}, generate.*"
    ) + (_CORPUS_NOTE if any(c.key.startswith("corpus.") for c in refused) else "")


def applied_note(path: Path, applied: list[Change]) -> str:
    """The line that says which changed settings the resumed run applies (and records)."""
    what = ", ".join(f"{c.key} {c.old!r} -> {c.new!r}" for c in applied)
    return f"resume: settings changed since {path}, applied and recorded in this run's checkpoints: {what}"


def kept_note(path: Path, kept: list[Change]) -> str:
    """The line that says which settings a resumed run keeps from its checkpoint (their default changed since)."""
    what = ", ".join(f"{c.key}={c.old!r} (today's default {c.new!r})" for c in kept)
    return f"resume: {path} was trained with an earlier default; this run continues with it: {what}"


def keep_values(cfg: Any, kept: list[Change]) -> None:
    """Set each kept key of `cfg` (a RunConfig) back to the checkpoint's value, in place."""
    for c in kept:
        *parents, leaf = c.key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, c.old)


def check_run_dir(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Before Hydra writes ``.hydra/``: the refusal, if `run_dir`'s checkpoints forbid `cfg`'s settings.

    Reads only the newest readable (sealed, validated) manifest and this run's corpus (its
    fingerprint, as the run computes it); the run compares again when it resumes. Nothing
    is written, so a refused command leaves the run dir, ``.hydra`` included, as it was.

    Returns:
        One message when the resume would be refused, else nothing.
    """
    if cfg.mode.name not in TRAINING_MODES or cfg.resume == "never":
        return []
    root = run_dir / "checkpoints"
    if root.is_symlink() or not root.is_dir():
        return []
    from qtrain import checkpoint as ck  # imports torch: only for a run dir that holds checkpoints
    from qtrain.errors import CheckpointError

    for d in reversed(ck.list_step_dirs(root)):
        try:
            manifest = ck.read_manifest(d)
        except CheckpointError:
            continue  # the run skips it with a warning and compares the one it resumes from
        saved = manifest.get("config")
        if not isinstance(saved, Mapping):
            return []
        refused = compare(saved, config_dict(cfg), manifest.get("corpus"), _fingerprint(cfg)).refused
        return [refusal(d, refused)] if refused else []
    return []


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data, as a checkpoint's manifest records it."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _fingerprint(cfg: RunConfig) -> dict[str, Any] | None:
    """This run's corpus fingerprint (None when it cannot be read: the run says why)."""
    from qtrain.corpus import corpus_fingerprint

    try:
        return corpus_fingerprint(cfg.data.name, cfg.data.path, cfg.data.val_fraction)
    except (OSError, ValueError):
        return None
