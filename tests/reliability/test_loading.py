"""RELIABILITY.md, loading untrusted or damaged checkpoints: cases 12-18 and 20 (19 is in test_quant_cases.py)."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from qtrain.checkpoint import write as ck_write  # the low-level writers the tests break
from qtrain.errors import CheckpointError
from qtrain.modes.loading import model_from_checkpoint
from tests.numerics import assert_close_across_cpus, model_reductions
from tests.reliability.conftest import (
    FIXTURES,
    REPO,
    SHRINK,
    copy_run,
    execute,
    manifest,
    qtrain,
    rewrite_listed_file,
    tree_hashes,
    write_manifest,
)

TOKENS = torch.arange(32).view(1, 32)


def _refused(changes: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert execute(changes, tmp / "job") == 3
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert "Traceback" not in err
    return err


def _explicit_loads(ckpt: Path) -> list[dict[str, Any]]:
    """`verify`, `eval` and `train init_from` of one checkpoint: every explicit way to load it."""
    return [
        {"mode.name": "verify", "init_from": str(ckpt)},
        {"mode.name": "eval", "init_from": str(ckpt), "eval.decode_tokens": 2, "eval.decode_repeats": 1},
        {"init_from": str(ckpt), "train.max_steps": 1},
    ]


def _resume_falls_back(run: Path, bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`resume=auto` warns about `bad` and continues from step 2."""
    capsys.readouterr()
    assert execute({"train.max_steps": 5, "train.save_every": 2}, run) == 0
    cap = capsys.readouterr()
    assert f"ignoring {bad}" in cap.err
    assert f"continuing from {run / 'checkpoints' / 'step_0000002'} (step 2)" in cap.out


def test_case_12_truncated_weights(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    f = bad / ck.MODEL_FILE
    full = f.stat().st_size
    f.write_bytes(f.read_bytes()[: full // 2])
    for changes in _explicit_loads(bad):
        _refused(changes, tmp_path, capsys, str(f), f"size {full // 2} bytes", f"manifest says {full}")
    # the command line too: exit 3 and the reason, no traceback
    assert qtrain(["mode=verify", f"init_from={bad}", f"hydra.run.dir={tmp_path / 'cli'}"]) == 3
    assert f"manifest says {full}" in capsys.readouterr().err
    _resume_falls_back(run, bad, capsys)


def _flip_bit_in_tensor_data(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n + (len(raw) - 8 - n) // 2] ^= 0x10  # inside the data section, same size
    f.write_bytes(bytes(raw))


def test_case_13_flipped_bit(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    f = bad / ck.MODEL_FILE
    size = f.stat().st_size
    _flip_bit_in_tensor_data(f)
    assert f.stat().st_size == size
    for changes in _explicit_loads(bad):
        _refused(changes, tmp_path, capsys, str(f), "SHA-256 mismatch")
    _resume_falls_back(run, bad, capsys)


@pytest.mark.parametrize("remove", [ck.MANIFEST, ck.TRAINER_FILE])
def test_case_14_missing_manifest_or_listed_file(
    trained: Path, tmp_path: Path, remove: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    (bad / remove).unlink()
    needle = f"{ck.MANIFEST} is missing" if remove == ck.MANIFEST else f"missing {ck.TRAINER_FILE}"
    for changes in _explicit_loads(bad):
        _refused(changes, tmp_path, capsys, str(bad), "incomplete checkpoint", needle)
    _resume_falls_back(run, bad, capsys)


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.sentinel}",)


def _pickles(sentinel: Path, tmp: Path) -> dict[str, bytes]:
    pt = tmp / "evil.pt"
    torch.save({"model": _Evil(sentinel)}, pt)  # a .pt file exactly as torch.save writes one
    return {"torch.save": pt.read_bytes(), "pickle": pickle.dumps(_Evil(sentinel))}


def test_case_15_planted_pickle_never_runs(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "PWNED"
    payloads = _pickles(sentinel, tmp_path)
    # The payload is live: unpickling it would create the sentinel.
    pickle.loads(payloads["pickle"])
    assert sentinel.exists()
    sentinel.unlink()

    run = copy_run(trained, tmp_path / "run")
    bad = run / "checkpoints" / "step_0000004"
    variants = {}
    # (a) an extra .pt file next to the safetensors files
    a = copy_run(bad, tmp_path / "a")
    (a / "model.pt").write_bytes(payloads["torch.save"])
    variants[a] = "unsafe or unknown file"
    # (b) the weights file replaced by a pickle, manifest updated to match (size and hash pass)
    b = copy_run(bad, tmp_path / "b")
    rewrite_listed_file(b, ck.MODEL_FILE, payloads["torch.save"])
    variants[b] = ck.MODEL_FILE
    # (c) the manifest itself lists a pickle file
    c = copy_run(bad, tmp_path / "c")
    (c / "optimizer.pt").write_bytes(payloads["pickle"])
    m = manifest(c)
    m["files"]["optimizer.pt"] = {"bytes": 1, "sha256": "0" * 64}
    write_manifest(c, m)  # resealed: only the listed pickle is wrong
    variants[c] = "optimizer.pt"
    # (d) trainer.json replaced by a pickle, manifest updated to match
    d = copy_run(bad, tmp_path / "d")
    rewrite_listed_file(d, ck.TRAINER_META, payloads["pickle"])
    variants[d] = ck.TRAINER_META
    for ckpt, needle in variants.items():
        for changes in _explicit_loads(ckpt):
            _refused(changes, tmp_path, capsys, needle)
    # (a) planted in the newest checkpoint of a run: resume refuses it and falls back
    (bad / "model.pt").write_bytes(payloads["torch.save"])
    _resume_falls_back(run, bad, capsys)
    assert not sentinel.exists(), "a pickle payload ran"


def test_case_15_no_unsafe_loader_in_qtrain() -> None:
    """No silent fallback to unsafe loading exists: nothing in qtrain can unpickle."""
    pattern = re.compile(
        r"torch\.load\(|\bimport pickle\b|\bpickle\.|weights_only\s*=\s*False|\bimport dill\b|"
        r"\bjoblib\b|\bmarshal\.loads|\bnp\.load\(|numpy\.load\("
    )
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (REPO / "qtrain").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def _header_file(header: bytes, length: int | None = None, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


HOSTILE = {
    "huge length field": _header_file(b"{}", length=2**63 - 1, body=b"\0" * 64),
    "length past the end": _header_file(b'{"a":1}', length=10**6),
    "non-UTF-8": _header_file(b'{"\xff\xfe": 1}'),
    "non-JSON": _header_file(b"this is not json at all!"),
    "JSON that is not an object": _header_file(b"[1, 2, 3]"),
    "deeply nested JSON": _header_file(b"[" * 200_000 + b"]" * 200_000),
    "overflowing offsets": _header_file(
        json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**64 + 16]}}).encode(), body=b"\0" * 16
    ),
    "offsets past the data": _header_file(
        json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}).encode(), body=b"\0" * 16
    ),
    "shape larger than its bytes": _header_file(
        json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}).encode(), body=b"\0" * 16
    ),
    "overlapping tensors": _header_file(
        json.dumps(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            }
        ).encode(),
        body=b"\0" * 16,
    ),
    "unknown dtype": _header_file(
        json.dumps({"w": {"dtype": "PYOBJ", "shape": [1], "data_offsets": [0, 8]}}).encode(), body=b"\0" * 8
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_case_16_hostile_safetensors_header(
    trained: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    rewrite_listed_file(ckpt, ck.MODEL_FILE, HOSTILE[kind])  # hash and size pass: only the header is hostile
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=re.escape(str(ckpt / ck.MODEL_FILE))):
            ck.load_checkpoint(ckpt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak} bytes allocated to refuse a hostile header"
    _refused({"mode.name": "verify", "init_from": str(ckpt)}, tmp_path, capsys, ck.MODEL_FILE)


def test_case_17_newer_format_version(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    m = manifest(ckpt)
    m["format_version"] = 99
    (ckpt / ck.MANIFEST).write_text(json.dumps(m))
    for changes in _explicit_loads(ckpt):
        _refused(changes, tmp_path, capsys, "format_version 99", f"format_version {ck.FORMAT_VERSION}")


def _logits(ckpt: Path, kernel: str = "auto") -> torch.Tensor:
    model = model_from_checkpoint(ck.load_checkpoint(ckpt, with_trainer=False), torch.device("cpu"), kernel)
    with torch.no_grad():
        return model(TOKENS)


ALL_FIXTURES = sorted(p for p in FIXTURES.iterdir() if p.is_dir() and re.match(r"^v\d+_", p.name))
OLD_FIXTURES = [p for p in ALL_FIXTURES if manifest(p)["format_version"] < ck.FORMAT_VERSION]


def test_case_18_every_older_format_has_a_fixture() -> None:
    versions = {manifest(p)["format_version"] for p in OLD_FIXTURES}
    assert versions == set(range(1, ck.FORMAT_VERSION))


def _assert_logits(ckpt: Path, expected: torch.Tensor) -> None:
    """The stored logits, up to the summation order of this CPU's kernels (tests/numerics.py).

    Quantized fixtures stored the logits of PyTorch's packed kernel (32 rows is above the native
    kernels' row limit), so that kernel is asked for by name: the bound covers another summation
    order, not another kernel's activation rounding.
    """
    m = manifest(ckpt)
    kernel = "torch" if m.get("quant") is not None else "auto"
    shape = m["model"] if "model" in m else m["config"]["model"]
    assert_close_across_cpus(_logits(ckpt, kernel), expected, **model_reductions(shape))


@pytest.mark.parametrize("fixture", ALL_FIXTURES, ids=lambda p: p.name)
def test_case_18_fixture_loads_migrates_and_upgrades(
    fixture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = load_file(str(fixture) + ".expected.safetensors")["logits"]
    before = tree_hashes(fixture)
    old_version = manifest(fixture)["format_version"]
    loaded = ck.load_checkpoint(fixture)
    assert loaded.manifest["format_version"] == ck.FORMAT_VERSION
    assert loaded.manifest.get("migrated_from", ck.FORMAT_VERSION) == old_version
    _assert_logits(fixture, expected)
    assert execute({"mode.name": "verify", "init_from": str(fixture)}, tmp_path / "v") == 0

    out = tmp_path / "upgraded"
    assert qtrain(["mode=upgrade", f"init_from={fixture}", f"out={out}", f"hydra.run.dir={tmp_path / 'u'}"]) == 0
    new = manifest(out)
    assert new["format_version"] == ck.FORMAT_VERSION and new["upgraded_from"]["format_version"] == old_version
    assert "migrated_from" not in ck.load_checkpoint(out).manifest
    _assert_logits(out, expected)
    assert tree_hashes(fixture) == before  # the original is untouched
    assert not list(tmp_path.glob(".tmp-*"))

    # An existing non-empty `out`, or one inside the source, is refused with exit 2; nothing written.
    capsys.readouterr()
    snapshot = tree_hashes(out)
    assert execute({"mode.name": "upgrade", "init_from": str(fixture), "out": str(out)}, tmp_path / "u2") == 2
    assert f"out: {out} already exists" in capsys.readouterr().err
    assert tree_hashes(out) == snapshot
    src = copy_run(fixture, tmp_path / "src")
    assert execute({"mode.name": "upgrade", "init_from": str(src), "out": str(src / "up")}, tmp_path / "u3") == 2
    assert not (src / "up").exists()


def test_case_18_upgrade_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = OLD_FIXTURES[0]
    original = ck_write._write_json

    def failing(path: Path, data: object) -> None:
        if path.name == ck.MANIFEST:
            raise OSError(5, "Input/output error")
        original(path, data)

    monkeypatch.setattr(ck_write, "_write_json", failing)
    with pytest.raises(OSError):
        ck.upgrade_checkpoint(fixture, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither `out` nor a temporary directory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to write the checkpoint")
def test_case_20_cuda_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "qtrain",
            "mode=train",
            *SHRINK,
            "train.max_steps=3",
            "device=cuda",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    ckpt = run / "checkpoints" / "step_0000003"
    loaded = ck.load_checkpoint(ckpt)
    on_cuda = model_from_checkpoint(loaded, torch.device("cuda"))
    with torch.no_grad():
        ref = on_cuda(TOKENS.cuda()).cpu()
    torch.testing.assert_close(_logits(ckpt), ref, rtol=1e-4, atol=1e-4)


def test_case_20_checkpoints_are_device_free(trained: Path, tmp_path: Path) -> None:
    """What a CUDA run writes is what a CPU run writes: plain tensors, no device anywhere, loaded on CPU.

    Without a GPU this checks the device-independence the CUDA test relies on: no device
    field in any safetensors header, tensors always read onto the CPU, and a checkpoint whose
    run said `device=cuda` evaluates with `device=cpu`.
    """
    ckpt = copy_run(trained / "checkpoints" / "step_0000004", tmp_path / "ckpt")
    for name in (ck.MODEL_FILE, ck.TRAINER_FILE):
        header = ck.check_safetensors_header(ckpt / name)
        assert "device" not in json.dumps(header).lower()
    loaded = ck.load_checkpoint(ckpt)
    assert {t.device.type for t in [*loaded.model_state.values(), *loaded.trainer_tensors.values()]} == {"cpu"}
    m = manifest(ckpt)
    m["config"]["device"] = "cuda"  # as written by a CUDA run
    write_manifest(ckpt, m)
    expected = _logits(trained / "checkpoints" / "step_0000004")
    assert torch.equal(_logits(ckpt), expected)
    assert (
        execute(
            {
                "mode.name": "eval",
                "init_from": str(ckpt),
                "device": "cpu",
                "eval.decode_tokens": 2,
                "eval.decode_repeats": 1,
            },
            tmp_path / "e",
        )
        == 0
    )
