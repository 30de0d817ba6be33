"""RELIABILITY.md round 2, checkpoints that lie: cases 29 (sealed manifest), 30 (sizes checked
before allocating) and 31 (manifest values validated in verify and every loading mode alike)."""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain import checkpoint as ck
from qtrain import model as qmodel
from qtrain.errors import CheckpointError
from tests.reliability.conftest import (
    FIXTURES,
    REPO,
    copy_run,
    execute,
    manifest,
    rewrite_listed_file,
    tree_hashes,
    write_manifest,
)

Edit = Callable[[dict[str, Any]], None]


def loading_modes(ckpt: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    """Every explicit way to load one checkpoint: verify, eval, generate, upgrade, train/ptq from it."""
    return {
        "verify": {"mode.name": "verify", "init_from": str(ckpt)},
        "eval": {"mode.name": "eval", "init_from": str(ckpt), "eval.decode_tokens": 2, "eval.decode_repeats": 1},
        "generate": {"mode.name": "generate", "init_from": str(ckpt), "generate.max_new_tokens": 2},
        "upgrade": {"mode.name": "upgrade", "init_from": str(ckpt), "out": str(tmp / "upgraded")},
        "train": {"init_from": str(ckpt), "train.max_steps": 1},
        "ptq": {"mode.name": "ptq", "init_from": str(ckpt), "quant.scheme": "int8", "ptq.calib_batches": 1},
    }


def refused_everywhere(ckpt: Path, tmp: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """Exit 3 with every needle in the message, no traceback, in every loading mode; nothing written."""
    before = tree_hashes(ckpt)
    for mode, changes in loading_modes(ckpt, tmp).items():
        capsys.readouterr()
        assert execute(changes, tmp / f"job-{mode}") == 3, mode
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, f"{mode}: {needle!r} not in:\n{err}"
        assert "Traceback" not in err
    assert not (tmp / "upgraded").exists()
    assert tree_hashes(ckpt) == before


def edited(src: Path, dst: Path, edit: Edit, reseal: bool) -> Path:
    """A copy of checkpoint `src` whose manifest `edit` changed, resealed (a forger) or not (damage)."""
    ckpt = copy_run(src, dst)
    m = manifest(ckpt)
    edit(m)
    if reseal:
        write_manifest(ckpt, m)
    else:  # the way a person edits it: same layout, the seal left as it was
        (ckpt / ck.MANIFEST).write_bytes(ck.json_file_bytes(m))
    return ckpt


@pytest.fixture(scope="module")
def packed(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An asymmetric int4 group-32 PTQ checkpoint (scales and zero points) of the trained model."""
    run = tmp_path_factory.mktemp("packed") / "run"
    changes = {
        "mode.name": "ptq",
        "init_from": str(trained / "checkpoints" / "step_0000004"),
        "quant.scheme": "int4",
        "quant.symmetric": False,
        "quant.group_size": 32,
        "ptq.calib_batches": 1,
        "eval.decode_tokens": 0,
        "eval.prefill_tokens": 0,
    }
    assert execute(changes, run) == 0
    return run / "checkpoints" / "step_0000004"


# ---------------------------------------------------------------- case 29: the manifest is sealed


def _value_bytes(raw: bytes, key: str) -> range:
    """Byte positions of the line `"key": value` in the indented manifest."""
    start = raw.index(f'"{key}":'.encode())
    return range(start, raw.index(b"\n", start))


def test_case_29_any_bit_flip_in_the_manifest_is_refused(packed: Path, trained: Path) -> None:
    """All 8 bits of the named fields' lines, and one seeded random bit of every other byte."""
    for ckpt in (packed, trained / "checkpoints" / "step_0000004"):
        raw = (ckpt / ck.MANIFEST).read_bytes()
        mpath = ckpt / ck.MANIFEST
        ck.parse_manifest(mpath, raw)  # the intact manifest is accepted
        named = ["n_head", "tie_embeddings", "norm_eps", "rope_theta", "tied", "format_version", ck.MANIFEST_HASH]
        if manifest(ckpt)["quant"]:
            named += ["group_size", "symmetric", "activations", "scheme", "bits"]
        flips = {(i, bit) for key in named for i in _value_bytes(raw, key) for bit in range(8)}
        rng = random.Random(29)
        flips |= {(i, rng.randrange(8)) for i in range(0, len(raw), 3)}
        accepted = []
        for i, bit in sorted(flips):
            damaged = bytearray(raw)
            damaged[i] ^= 1 << bit
            try:
                ck.parse_manifest(mpath, bytes(damaged))
                accepted.append((i, bit, chr(raw[i])))
            except CheckpointError:
                pass
        assert accepted == [], f"{len(accepted)} one-bit changes passed, e.g. {accepted[:5]}"


def _set(path: str | tuple[str, ...], value: Any) -> Edit:
    """Set a manifest entry by dotted path (a tuple when a key itself has dots, as layer names do)."""

    def edit(m: dict[str, Any]) -> None:
        *parents, leaf = path.split(".") if isinstance(path, str) else path
        node = m
        for p in parents:
            node = node[p]
        node[leaf] = value

    return edit


# Plausible edits: each keeps the shapes of every tensor, so only the seal can tell.
SILENT_EDITS = {
    "n_head 2 -> 4": _set("model.n_head", 4),
    "tie_embeddings": _set("model.tie_embeddings", False),
    "norm_eps": _set("model.norm_eps", 1e-3),
    "rope_theta": _set("model.rope_theta", 500000.0),
}
PACKED_EDITS = {
    "activations none -> int8": _set(("quant", "layers", "blocks.0.attn.qkv", "activations"), "int8"),
    "config scheme int4 -> int8da_int4w": _set("quant.config.scheme", "int8da_int4w"),
}


@pytest.mark.parametrize("name", [*SILENT_EDITS, *PACKED_EDITS])
def test_case_29_edited_field_refused_in_every_loading_mode(
    name: str, trained: Path, packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = packed if name in PACKED_EDITS else trained / "checkpoints" / "step_0000004"
    ckpt = edited(src, tmp_path / "ckpt", {**SILENT_EDITS, **PACKED_EDITS}[name], reseal=False)
    refused_everywhere(ckpt, tmp_path, capsys, str(ckpt / ck.MANIFEST), "manifest hash mismatch")


def test_case_29_seal_cannot_be_dropped_or_versioned_away(trained: Path, tmp_path: Path) -> None:
    src = trained / "checkpoints" / "step_0000004"
    # removing the seal, or claiming the unsealed format 2 while keeping it, is refused
    for name, edit in {"no seal": lambda m: m.pop(ck.MANIFEST_HASH), "as v2": _set("format_version", 2)}.items():
        ckpt = copy_run(src, tmp_path / name)
        m = manifest(ckpt)
        edit(m)
        (ckpt / ck.MANIFEST).write_bytes(ck.json_file_bytes(m))
        with pytest.raises(CheckpointError, match=ck.MANIFEST_HASH if name == "no seal" else "hash mismatch"):
            ck.verify_checkpoint(ckpt)
    # the same content, re-indented: the file is not what qtrain wrote
    ckpt = copy_run(src, tmp_path / "reindented")
    (ckpt / ck.MANIFEST).write_text(json.dumps(manifest(ckpt), indent=4, sort_keys=True))
    with pytest.raises(CheckpointError, match="not byte for byte"):
        ck.verify_checkpoint(ckpt)


def test_case_29_v2_checkpoints_load_and_upgrade_writes_a_sealed_v3(tmp_path: Path) -> None:
    fixture = FIXTURES / "v2_int4"
    assert ck.MANIFEST_HASH not in manifest(fixture)  # the previous version, as committed
    assert ck.load_checkpoint(fixture).manifest["migrated_from"] == 2
    out = tmp_path / "v3"
    ck.upgrade_checkpoint(fixture, out)
    m = manifest(out)
    assert m["format_version"] == ck.FORMAT_VERSION and m[ck.MANIFEST_HASH] == ck.manifest_digest(m)
    assert (out / ck.MANIFEST).read_bytes() == ck.json_file_bytes(m)
    _set("model.n_head", 4)(m)  # the upgraded copy is protected
    (out / ck.MANIFEST).write_bytes(ck.json_file_bytes(m))
    with pytest.raises(CheckpointError, match="manifest hash mismatch"):
        ck.load_checkpoint(out)


# ---------------------------------------------------------------- case 30: sizes before allocation


class _Builds:
    """Records every GPT built outside the meta device, with its config."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real: list[Any] = []
        original = qmodel.GPT.__init__

        def init(model: Any, cfg: Any) -> None:
            if torch.empty(0).device.type != "meta":
                self.real.append(cfg)
            original(model, cfg)

        monkeypatch.setattr(qmodel.GPT, "__init__", init)


HUGE = {
    "n_layer=1000000": {"n_layer": 1_000_000},
    "n_embd=10**9": {"n_embd": 10**9},
    "mlp_hidden=10**9": {"mlp_hidden": 10**9},
    "vocab_size=10**9": {"vocab_size": 10**9},
    "block_size=10**9": {"block_size": 10**9},
}


@pytest.mark.parametrize("name", list(HUGE))
def test_case_30_huge_manifest_refused_before_anything_is_built(
    name: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = trained / "checkpoints" / "step_0000004"
    ckpt = edited(src, tmp_path / "ckpt", lambda m: m["model"].update(HUGE[name]), reseal=True)
    builds = _Builds(monkeypatch)
    field = f"model.{name.split('=')[0]}"
    needle = field if name.startswith(("n_layer", "n_embd", "block_size")) else "needs F32"
    refused_everywhere(ckpt, tmp_path, capsys, needle)
    assert builds.real == [], "a model was built for a manifest that does not fit its tensors"


def test_case_30_user_command_under_a_memory_limit(trained: Path, tmp_path: Path) -> None:
    """`qtrain mode=verify` on a 1M-layer manifest, in a process limited to 4 GiB more
    address space than an idle qtrain takes: exit 3 and the reason, no MemoryError."""
    src = trained / "checkpoints" / "step_0000004"
    ckpt = edited(src, tmp_path / "ckpt", _set("model.n_layer", 1_000_000), reseal=True)
    idle = subprocess.run([sys.executable, "-c", _VM_PEAK], capture_output=True, text=True, cwd=REPO, timeout=120)
    limit = int(idle.stdout) + 4 * 2**30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    for mode in ("verify",):  # the in-process tests above refuse it in every loading mode
        args = [f"mode={mode}", f"init_from={ckpt}", f"hydra.run.dir={tmp_path / mode}"]
        res = subprocess.run(
            [sys.executable, "-m", "qtrain", *args],
            capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=cap,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert res.returncode == 3, res.stderr
        assert "model.n_layer=1000000" in res.stderr and "holds blocks 0..0" in res.stderr
        assert "Traceback" not in res.stderr


_VM_PEAK = (
    "import qtrain.cli, qtrain.checkpoint, torch\n"
    "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmPeak')][0])"
)


# ---------------------------------------------------------------- case 31: every value validated


def _replace_tensor(ckpt: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite one tensor of model.safetensors (hash and seal updated: only the value is hostile)."""
    from safetensors.torch import load_file

    state = load_file(str(ckpt / ck.MODEL_FILE))
    state[name] = fn(state[name])
    tmp = ckpt / "rewrite.tmp"
    ck.write_safetensors(state, tmp, metadata={"format": "qtrain"})
    data = tmp.read_bytes()
    tmp.unlink()
    rewrite_listed_file(ckpt, ck.MODEL_FILE, data)


QKV = "blocks.0.attn.qkv"
MANIFEST_VALUES: dict[str, tuple[Edit, str, bool]] = {
    # name: (edit, field named in the message, needs the packed checkpoint)
    "n_head=0": (_set("model.n_head", 0), "model.n_head", False),
    "n_head=3 does not divide 32": (_set("model.n_head", 3), "model.n_head=3", False),
    "n_head as a string": (_set("model.n_head", "2"), "model.n_head", False),
    "n_layer as a float": (_set("model.n_layer", 1.0), "model.n_layer", False),
    "norm_eps NaN": (_set("model.norm_eps", float("nan")), "model.norm_eps", False),
    "rope_theta negative": (_set("model.rope_theta", -1.0), "model.rope_theta", False),
    "tie_embeddings a string": (_set("model.tie_embeddings", "yes"), "model.tie_embeddings", False),
    "unknown model entry": (_set("model.n_expert", 8), "n_expert", False),
    "step as a string": (_set("step", "4"), "'step'", False),
    "created_unix infinite": (_set("created_unix", float("inf")), "created_unix", False),
    "quant a string": (_set("quant", "int4"), "quant must be an object", True),
    "layer spec a string": (_set(("quant", "layers", QKV), "int4"), f"quant.layers.{QKV}", True),
    "bits disagree with scheme": (_set(("quant", "layers", QKV, "bits"), 8), f"quant.layers.{QKV}.bits", True),
    "group_size 5": (_set(("quant", "layers", QKV, "group_size"), 5), "group_size=5", True),
    "layers disagree with config": (_set("quant.config.symmetric", True), "but quant.config says", True),
    "unknown state": (_set("quant.state", "half"), "quant.state", True),
    "config scheme none": (_set("quant.config.scheme", "none"), "quant.config.scheme", True),
}


@pytest.mark.parametrize("name", list(MANIFEST_VALUES))
def test_case_31_manifest_values_refused_naming_the_field(
    name: str, trained: Path, packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, field, quantized = MANIFEST_VALUES[name]
    src = packed if quantized else trained / "checkpoints" / "step_0000004"
    ckpt = edited(src, tmp_path / "ckpt", edit, reseal=True)  # the seal passes: only the value is wrong
    with pytest.raises(CheckpointError, match=None) as err:
        ck.verify_checkpoint(ckpt)
    assert field in str(err.value)
    refused_everywhere(ckpt, tmp_path, capsys, field)


def _first(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Set the first element to `value` (the rest stay valid)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.view(-1)[0] = value
        return out

    return fn


TENSOR_VALUES: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor], str]] = {
    "zero point 200": (f"{QKV}.zeros", lambda t: t.clone().fill_(200), "outside the int4 code range 0..15"),
    "one zero point 16": (f"{QKV}.zeros", _first(16), "1 zero point(s) outside the int4 code range"),
    "scales NaN": (f"{QKV}.scales", lambda t: t.clone().fill_(float("nan")), "non-finite scale"),
    "one scale inf": (f"{QKV}.scales", _first(float("inf")), "1 non-finite scale"),
    "scales 0": (f"{QKV}.scales", torch.zeros_like, "<= 0"),
    "scales negative": (f"{QKV}.scales", lambda t: -t, "<= 0"),
    "scales stored F32": (f"{QKV}.scales", lambda t: t.float(), "needs BF16"),
    "codes stored I8": (f"{QKV}.weight_packed", lambda t: t.view(torch.int8), "needs U8"),
    "norm weight stored F16": ("norm.weight", lambda t: t.half(), "needs F32"),
}


@pytest.mark.parametrize("name", list(TENSOR_VALUES))
def test_case_31_quantization_tensors_refused_naming_the_tensor(
    name: str, packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensor, fn, needle = TENSOR_VALUES[name]
    ckpt = copy_run(packed, tmp_path / "ckpt")
    _replace_tensor(ckpt, tensor, fn)
    refused_everywhere(ckpt, tmp_path, capsys, tensor, needle)


def test_case_31_verify_and_loading_agree(packed: Path, tmp_path: Path) -> None:
    """The one path: verify's verdict is load_checkpoint's, for a good and a bad checkpoint."""
    assert ck.verify_checkpoint(packed) == ck.load_checkpoint(packed).manifest
    bad = edited(packed, tmp_path / "bad", _set("model.n_head", 0), reseal=True)
    with pytest.raises(CheckpointError) as by_verify:
        ck.verify_checkpoint(bad)
    with pytest.raises(CheckpointError) as by_load:
        ck.load_checkpoint(bad, with_trainer=False)
    assert str(by_verify.value) == str(by_load.value)


def test_case_31_safetensors_header_offsets_still_checked(packed: Path, tmp_path: Path) -> None:
    """Header checks run before the comparison with the model (no regression of case 16)."""
    ckpt = copy_run(packed, tmp_path / "ckpt")
    raw = (ckpt / ck.MODEL_FILE).read_bytes()
    rewrite_listed_file(ckpt, ck.MODEL_FILE, struct.pack("<Q", 2**40) + raw[8:])
    with pytest.raises(CheckpointError, match="header length"):
        ck.verify_checkpoint(ckpt)


SCHEMES: dict[str, tuple[dict[str, Any], bool]] = {  # quant settings, tied embeddings
    "int8": ({"scheme": "int8"}, True),
    "int4 g32 asym + embeddings + lm_head, untied": (
        {"scheme": "int4", "symmetric": False, "embeddings": True, "lm_head": True},
        False,
    ),
    "int4 g32 + embeddings + lm_head, tied": ({"scheme": "int4", "embeddings": True, "lm_head": True}, True),
    "int4 per channel + lm_head": ({"scheme": "int4", "group_size": -1, "lm_head": True}, True),
    "int8da_int4w + embeddings": ({"scheme": "int8da_int4w", "embeddings": True}, False),
    "int8 + embeddings + lm_head, untied": ({"scheme": "int8", "embeddings": True, "lm_head": True}, False),
}


@pytest.mark.parametrize("state", ["fake", "packed"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_case_31_every_valid_scheme_passes_the_checks(name: str, state: str, tmp_path: Path) -> None:
    """No false refusals: every scheme, fake (QAT in progress, learned scales) or packed, tied or not,
    verifies, and the model rebuilt from the manifest gives the saved model's logits."""
    from dataclasses import asdict

    from qtrain import quant as api
    from qtrain.config import ModelConfig, QuantConfig

    settings, tied = SCHEMES[name]
    model = qmodel.GPT(ModelConfig(n_layer=1, n_embd=64, n_head=2, mlp_hidden=64, block_size=16, tie_embeddings=tied))
    model.init_weights(0)
    qcfg = QuantConfig(**settings)
    api.prepare(model, qcfg, learn_scales=state == "fake")
    if state == "packed":
        api.convert(model, qcfg)
    quant = {"config": asdict(qcfg), "state": state, "method": "rtn", "learn_scales": state == "fake"}
    payload = ck.Payload(
        model_state=dict(model.state_dict()),
        manifest={"model": asdict(model.cfg), "quant": {**quant, "layers": api.layer_specs(model)}},
    )
    path = ck.save_checkpoint(tmp_path, 3, payload, keep=2)
    loaded = ck.load_checkpoint(path)
    again = ck.build_model(loaded, torch.device("cpu"), "reference")
    if state == "packed":
        api.set_kernel(model, "reference")
    x = torch.arange(16).view(1, 16)
    with torch.no_grad():  # the same ops on the same tensors in one process: equal bit for bit on any CPU
        assert torch.equal(again(x), model(x))
