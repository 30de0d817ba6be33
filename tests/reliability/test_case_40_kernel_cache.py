"""RELIABILITY.md case 40: built kernels are trusted only if they are what qtrain built.

The kernel cache is created owner-only (0o700); a cached library is loaded only after its
SHA-256 matches the one recorded when it was built, else it is rebuilt with a warning; a
cache directory other users control is not used at all. The kernel-choice JSON beside it is
data: read only from a regular file of this user's, every field checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qtrain.quant import autotune, native

CC = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
pytestmark = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or CC is None,
    reason="needs an AVX2 CPU and a C compiler",
)
HOSTILE_C = """
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {{
    int fd = open("{sentinel}", O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
}}
int qt_abi_version(void) {{ return 3; }}
"""
"""A library that, if it were ever loaded, would create the sentinel file at load time."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernel cache in which qtrain built its library once (copied by each test)."""
    root = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTRAIN_CACHE_DIR", str(root))
        native.reset()
        assert native.library() is not None
    native.reset()
    return root


@pytest.fixture
def cache(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "cache"
    shutil.copytree(built, root)  # modes kept
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(root))
    monkeypatch.delenv(autotune.ENV_FORCE, raising=False)
    native.reset()
    autotune.reset()
    yield root
    native.reset()
    autotune.reset()


def _lib(root: Path) -> Path:
    return next((root / "kernels").glob("qgemv-*.so"))


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A compiled hostile library and the sentinel it would create when loaded."""
    sentinel, src, out = tmp_path / "PWNED", tmp_path / "evil.c", tmp_path / "evil.so"
    src.write_text(HOSTILE_C.format(sentinel=sentinel))
    subprocess.run([str(CC), "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out, sentinel


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_case_40_cache_created_owner_only_with_a_hash_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "fresh" / "cache"
    monkeypatch.setenv("QTRAIN_CACHE_DIR", str(root))
    native.reset()
    try:
        assert native.library() is not None
    finally:
        native.reset()
    for d in (root, root / "kernels"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    lib = _lib(root)
    assert native.recorded_hash(lib) == _sha(lib)


@pytest.mark.parametrize("how", ["replaced", "symlink", "no_record", "group_writable"])
def test_case_40_a_library_that_is_not_what_qtrain_built_is_rebuilt_never_loaded(
    cache: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    lib = _lib(cache)
    good = _sha(lib)
    evil, sentinel = _hostile(tmp_path)
    if how == "replaced":  # same name, other bytes, the record left as it was
        shutil.copyfile(evil, lib)
    elif how == "symlink":
        lib.unlink()
        lib.symlink_to(evil)
    elif how == "no_record":  # a forger who removes the record instead of matching it
        shutil.copyfile(evil, lib)
        lib.with_name(lib.name + ".sha256").unlink()
    else:  # a file another user could have written, even with the right bytes
        lib.chmod(0o664)
    with caplog.at_level(logging.WARNING, logger="qtrain.quant.native"):
        assert native.library() is not None
    assert not sentinel.exists()  # the planted code never ran
    assert "rebuilding" in caplog.text and str(lib) in caplog.text
    assert not lib.is_symlink() and _sha(lib) == native.recorded_hash(lib)
    assert _sha(lib) == good or how == "group_writable"  # the build is reproducible; mode fixed by rebuilding
    assert sorted(p.name for p in lib.parent.iterdir() if p.name.startswith("tmp")) == []


def test_case_40_open_cache_dir_is_tightened(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    (cache / "kernels").chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="qtrain.quant.native"):
        assert native.library() is not None
    assert stat.S_IMODE((cache / "kernels").stat().st_mode) == 0o700
    assert "now owner-only" in caplog.text


@pytest.mark.parametrize("how", ["world_writable_root", "kernels_symlink"])
def test_case_40_cache_dir_others_control_is_not_used(
    cache: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    evil, sentinel = _hostile(tmp_path)
    if how == "world_writable_root":  # anyone could rename kernels/ away and plant their own
        cache.chmod(0o777)
        shutil.copyfile(evil, _lib(cache))
    else:
        elsewhere = tmp_path / "elsewhere"
        shutil.move(str(cache / "kernels"), elsewhere)
        (cache / "kernels").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="qtrain.quant.native"):
        assert native.library() is None  # PyTorch's kernels instead
    assert "kernel cache not trusted" in caplog.text and not sentinel.exists()


def _valid_entry() -> dict[str, Any]:
    return {
        "shapes": [f"{k}x{n}" for k, n in autotune.SHAPES],
        "native_us": [100.0] * len(autotune.SHAPES),
        "torch_us": [500.0] * len(autotune.SHAPES),
        "native_ok": True,
        "torch_ok": True,
        "rounds": 1,
        "load_average": 0.0,
        "cores": 2,
        "measured_threads": torch.get_num_threads(),
    }


def _hostile_choice(path: Path, how: str, key: dict[str, Any], tmp_path: Path) -> None:
    entry: dict[str, Any] = _valid_entry()
    if how == "fifo":
        os.mkfifo(path)  # reading it would block forever
        return
    if how == "symlink":
        target = tmp_path / "victim.json"
        target.write_text(json.dumps({"key": key, "int4": entry}))
        path.symlink_to(target)
        return
    if how == "nan":
        entry["torch_us"] = [float("nan")] * len(autotune.SHAPES)
    elif how == "negative":
        entry["native_us"] = [-1.0] * len(autotune.SHAPES)
    elif how == "wrong_shapes":
        entry["shapes"], entry["native_us"], entry["torch_us"] = ["1x1"], [1.0], [1.0]
    elif how == "extra_key":
        entry["note"] = "[/x]\x1b[2J" * 100  # would go into report.json and the printed note
    elif how == "wrong_type":
        entry["shapes"] = 42  # the announcement would crash joining it
    text = json.dumps({"key": key, "int4": entry}, allow_nan=True)
    path.write_text(text if how != "huge" else text + " " * (1 << 20))


@pytest.mark.parametrize(
    "how", ["fifo", "symlink", "nan", "negative", "wrong_shapes", "extra_key", "wrong_type", "huge"]
)
def test_case_40_kernel_choice_json_is_validated_data(
    cache: Path, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native.library() is not None
    key = autotune.cache_key(torch.get_num_threads())
    path = autotune.cache_path(key)
    _hostile_choice(path, how, key, tmp_path)
    calls: list[int] = []
    monkeypatch.setattr(autotune, "measure", lambda bits: calls.append(bits) or _valid_entry())
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert autotune.choose(4) == "native"
    assert calls == [4]  # measured again, not taken from the file
    decision = autotune.decisions()["int4"]
    assert "note" not in decision and decision["shapes"] == _valid_entry()["shapes"]
    assert stat.S_ISREG(os.lstat(path).st_mode)  # rewritten as a regular file
    if how == "symlink":
        assert json.loads((tmp_path / "victim.json").read_text())["int4"]["torch_us"][0] == 500.0  # not written through
    assert json.loads(path.read_text())["int4"] == _valid_entry()
