"""RELIABILITY.md case 45: data paths that cannot be a corpus exit 2, naming the path and the reason.

The class: a path that cannot be read (permission), one that is not a regular file (a FIFO,
a character device, a socket), a directory without text, and a corpus larger than memory.
None of them is read before it is refused (a FIFO or /dev/zero would stream without end).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qtrain import corpus
from qtrain.config import DataConfig
from qtrain.data import DataError, load_corpus
from tests.reliability.conftest import REPO, SHRINK, execute

TEXT = "def f(x):\n    return x + 1\n" * 200


def _run(tmp_path: Path, path: Path | str, capsys: pytest.CaptureFixture[str]) -> str:
    code = execute({"data.name": "text", "data.path": str(path), "train.max_steps": 1}, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and str(path) in err
    return err


def test_case_45_fifo_refused_without_blocking(tmp_path: Path) -> None:
    """In a child with a deadline: opening a FIFO for reading would block until a writer comes."""
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    args = ["mode=train", *SHRINK, "data=text", f"data.path={fifo}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-m", "qtrain", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert str(fifo) in out.stderr and "FIFO" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_case_45_devices_refused(tmp_path: Path, device: str, capsys: pytest.CaptureFixture[str]) -> None:
    if not Path(device).exists():
        pytest.skip(f"{device} does not exist here")
    err = _run(tmp_path, device, capsys)
    assert "character device" in err and "nothing was read" in err


def test_case_45_socket_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert "socket" in _run(tmp_path, path, capsys)


def test_case_45_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "secret.txt"
    path.write_text(TEXT)
    path.chmod(0)
    try:
        with path.open("rb"):
            pytest.skip("this user reads files whatever their permissions (root); see the monkeypatched test")
    except PermissionError:
        pass
    assert "Permission denied" in _run(tmp_path, path, capsys)


def test_case_45_unreadable_file_as_root_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the kernel says to a user without read permission, for a test that runs as root."""
    path = tmp_path / "secret.txt"
    path.write_text(TEXT)
    real_open = os.open

    def deny(p: object, *args: object, **kwargs: object) -> int:
        if Path(str(p)) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(corpus.os, "open", deny)
    err = _run(tmp_path, path, capsys)
    assert "cannot read" in err and "Permission denied" in err


def test_case_45_unreadable_directory_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    real_stat = Path.stat

    def deny(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if self == d:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", deny)
    err = _run(tmp_path, d, capsys)
    assert "cannot access" in err and "Permission denied" in err


def test_case_45_directory_without_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pictures"
    d.mkdir()
    (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    (d / "b.bin").write_bytes(os.urandom(5000))
    err = _run(tmp_path, d, capsys)
    assert "no .txt files" in err and "2 file(s)" in err


def test_case_45_directory_whose_txt_entries_are_not_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another member: .txt names that are a FIFO and a link to a device; neither is opened."""
    d = tmp_path / "corpus"
    d.mkdir()
    os.mkfifo(d / "pipe.txt")
    (d / "zero.txt").symlink_to("/dev/zero")
    err = _run(tmp_path, d, capsys)
    assert "not readable regular files" in err


def test_case_45_directory_of_binary_txt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_bytes(b"\x00\x01\x02" * 500)
    (d / "b.txt").write_bytes(b"\xff\xfe" * 500)
    assert "looks binary" in _run(tmp_path, d, capsys)


def test_case_45_file_larger_than_memory_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sparse 1 TiB file (no disk used): refused from its size, never opened."""
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(2**40)
    opened: list[object] = []
    real_open = os.open
    monkeypatch.setattr(corpus.os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    err = _run(tmp_path, big, capsys)
    assert "1,099,511,627,776 bytes" in err and "nothing was read" in err and "memory" in err
    assert str(big) not in map(str, opened)


def test_case_45_directory_larger_than_memory_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member: files small one by one, too large together for the memory limit."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text(TEXT)
    monkeypatch.setattr(corpus, "memory_limit", lambda: (2 * len(TEXT), "test: a small machine"))
    with pytest.raises(DataError, match=r"holds [\d,]+ bytes.*test: a small machine.*nothing was read"):
        load_corpus(DataConfig(name="text", path=str(d)), block_size=32)


def test_case_45_file_that_grows_past_the_limit(tmp_path: Path) -> None:
    """Reading is bounded even when the size on disk lies (a file growing, a /proc-like file)."""
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    with pytest.raises(DataError, match="larger than"):
        corpus._read_one(path, 100)


def test_case_45_regular_corpus_still_reads(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text(TEXT)
    os.mkfifo(d / "skipped.txt")
    c = load_corpus(DataConfig(name="text", path=str(d)), block_size=32)
    assert len(c.train) + len(c.val) == 2 * len(TEXT) + 1
    assert stat.S_ISFIFO((d / "skipped.txt").stat().st_mode)  # left alone
