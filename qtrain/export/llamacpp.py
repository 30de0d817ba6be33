"""llama.cpp as a CPU backend of `mode=eval` and `mode=generate` (`backend=llamacpp`).

The checkpoint is exported losslessly to GGUF (:func:`qtrain.export.gguf.write_gguf`: int4
symmetric -> Q4_0 and int8 -> Q8_0 bit for bit, full precision -> F32), cached in
``<qtrain cache>/gguf/`` under a key made of the checkpoint's ``manifest_sha256`` and the GGUF
writer's own source (a changed writer never serves a stale file), written to a temporary file
and renamed into place. The file then runs through ``llama_cpp.Llama`` (llama-cpp-python),
fed qtrain's token ids directly (llama.cpp's own tokenizer is never used), with qtrain's
thread count and the model's context. The figures are those of the qtrain backend, measured
the same way: validation loss over the same windows (each window scored alone, from an empty
cache), batch-1 greedy decode tokens/s after a 16-token prompt (warm-up excluded, median of
repeats) and one-prompt prefill tokens/s. Sampling (`mode=generate`) applies qtrain's own
sampler (temperature, top-k, seed) to llama.cpp's logits.

Example:
    $ qtrain mode=eval backend=llamacpp init_from=outputs/DATE/TIME data=text data.path=corpus.txt
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qtrain.data import windows
from qtrain.errors import ConfigError
from qtrain.evaluate import _check_finite, _sample
from qtrain.model import GPT
from qtrain.progress import phase
from qtrain.quant.native import cache_dir

BACKENDS = ("qtrain", "llamacpp")
MISSING = "backend=llamacpp needs llama-cpp-python (pip install 'qtrain[llamacpp]')"
FLOAT_TYPE = "f32"
"""Full-precision tensors are written as F32: lossless for fp32 and bf16 checkpoints alike."""
_WRITER_SOURCES = ("gguf.py", "gguf_quant.py", "gguf_vocab.py")


_LOG: dict[str, Any] = {"errors": []}
"""llama.cpp's log callback (kept referenced) and its recent error lines."""


def llama_cpp() -> Any:
    """The ``llama_cpp`` module (and the ``gguf`` writer it is fed through), its log captured.

    llama.cpp logs through a callback; it is replaced by one that keeps error lines (shown
    when a file fails to load) and drops the rest (``n_ctx_seq > n_ctx_train`` after llama.cpp
    pads the context to 256, tokenizer notes), which would otherwise reach stderr.

    Raises:
        ConfigError: llama-cpp-python or gguf is not installed (exit 2).
    """
    try:
        import gguf  # noqa: F401 - the writer's package, needed before any export
        import llama_cpp as module
    except ImportError:
        raise ConfigError(MISSING) from None
    if "callback" not in _LOG:

        def keep_errors(level: int, text: bytes, _user: Any) -> None:
            if level == GGML_LOG_LEVEL_ERROR:
                _LOG["errors"] = [*_LOG["errors"][-9:], text.decode("utf-8", "replace").strip()]

        _LOG["callback"] = module.llama_log_callback(keep_errors)
        module.llama_log_set(_LOG["callback"], ctypes.c_void_p(0))
    return module


GGML_LOG_LEVEL_ERROR = 4
"""ggml's log levels: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation."""


def gguf_cache_dir() -> Path:
    """``<qtrain cache>/gguf``: ``$QTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtrain``, else ``~/.cache/qtrain``."""
    return cache_dir() / "gguf"


def cache_key(manifest: dict[str, Any]) -> str | None:
    """The cache key of a checkpoint's GGUF file, or None (no ``manifest_sha256``: not cached)."""
    sealed = manifest.get("manifest_sha256")
    if not sealed:
        return None
    h = hashlib.sha256(f"{sealed}|{FLOAT_TYPE}".encode())
    here = Path(__file__).resolve().parent
    for name in _WRITER_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:32]


def _export(model: GPT, manifest: dict[str, Any], tokenizer: Any, path: Path) -> dict[str, Any]:
    """``write_gguf`` to ``path``; a model llama.cpp cannot run is refused naming why and backend=qtrain."""
    from qtrain.export.gguf import write_gguf

    try:
        return write_gguf(model, manifest, tokenizer, path, FLOAT_TYPE)
    except ConfigError as err:
        raise ConfigError(
            f"backend=llamacpp: llama.cpp cannot run this checkpoint ({err}); use backend=qtrain"
        ) from None


@contextmanager
def gguf_file(model: GPT, manifest: dict[str, Any], tokenizer: Any) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The checkpoint as a GGUF file: from the cache, else exported (atomically) into it.

    Yields:
        (path, export report); the report has ``cached`` (True when the file was already there).
        A checkpoint without ``manifest_sha256`` (an imported model) gets a temporary file,
        removed afterwards.

    Raises:
        ConfigError: the model has a feature llama.cpp cannot run (names it), or the cache is unwritable.
    """
    root = gguf_cache_dir()
    key = cache_key(manifest)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(
            f"backend=llamacpp: cannot create the GGUF cache {root} ({err.strerror}); "
            f"set QTRAIN_CACHE_DIR to a writable directory"
        ) from None
    final = root / f"{key}.gguf" if key else None
    if final is not None and final.is_file():
        yield final, {**_sidecar(final), "cached": True}
        return
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()  # the writer creates the file itself
        report = _export(model, manifest, tokenizer, tmp)
        if final is None:
            yield tmp, {**report, "cached": False}
            return
        report["path"] = str(final)
        side = tmp.with_suffix(".json")
        side.write_text(json.dumps(report, default=str) + "\n")
        os.replace(side, final.with_suffix(".json"))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    yield final, {**report, "cached": False}


def _sidecar(final: Path) -> dict[str, Any]:
    """The export report stored beside a cached file (just its path when missing or unreadable)."""
    try:
        report = json.loads(final.with_suffix(".json").read_text())
    except (OSError, ValueError):
        report = None
    return report if isinstance(report, dict) else {"path": str(final)}


class LlamaCppModel:
    """A GGUF file loaded by ``llama_cpp.Llama``: logits for token ids, one sequence at a time.

    Args:
        path: the GGUF file.
        n_ctx: context (the model's ``block_size``).
        vocab_size: the model's vocabulary (checked against the file's).
        threads: CPU threads for decode and prompt processing.
    """

    def __init__(self, path: Path, n_ctx: int, vocab_size: int, threads: int) -> None:
        lib = llama_cpp()
        _LOG["errors"] = []
        try:
            self.llm = lib.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False, n_gpu_layers=0,
            )  # fmt: skip
        except ValueError as err:
            why = "; ".join(_LOG["errors"]) or str(err)
            raise ConfigError(f"backend=llamacpp: llama.cpp cannot load {path} ({why}); use backend=qtrain") from None
        if self.llm.n_vocab() != vocab_size:
            raise ConfigError(f"backend=llamacpp: {path} has {self.llm.n_vocab()} tokens, the model {vocab_size}")
        self.n_ctx = n_ctx

    def start(self, ids: list[int]) -> np.ndarray:
        """Evaluate ``ids`` from an empty cache; their logits, ``(len(ids), vocab)`` (a view)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def step(self, token: int) -> np.ndarray:
        """Append one token; the logits after it, ``(vocab,)`` (a view)."""
        self.llm.eval([token])
        return self.llm.scores[self.llm.n_tokens - 1]

    @property
    def pos(self) -> int:
        """Tokens in the cache."""
        return int(self.llm.n_tokens)

    def close(self) -> None:
        """Free llama.cpp's model and context."""
        self.llm.close()


def val_loss(runner: LlamaCppModel, tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over the windows at ``starts``, as qtrain's ``val_loss``."""
    total, count = 0.0, 0
    with phase("validation (llama.cpp)", total=len(starts), unit="windows") as bar:
        for i in range(len(starts)):
            x, y = windows(tokens, starts[i : i + 1], block_size)
            logits = torch.from_numpy(np.array(runner.start(x[0].tolist()), dtype=np.float32))
            total += float(F.cross_entropy(logits, y[0], reduction="sum"))
            count += y.numel()
            bar.advance()
    return total / max(count, 1)


def decode_speed(
    runner: LlamaCppModel, vocab: int, n_tokens: int, repeats: int, prompt_len: int = 16
) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s, as :func:`qtrain.evaluate.decode_speed` (same prompt, caps, median)."""
    prompt_len = max(1, min(prompt_len, runner.n_ctx - 1))
    n_tokens = max(1, min(n_tokens, runner.n_ctx - prompt_len))
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))[0].tolist()
    rates = []
    with phase("decode benchmark (llama.cpp)", total=repeats + 1, unit="passes") as bar:
        for r in range(repeats + 1):
            logits = runner.start(prompt)[-1]
            t0 = time.perf_counter()
            for _ in range(n_tokens):
                logits = runner.step(int(logits.argmax()))
            if r > 0:  # the first pass is warm-up
                rates.append(n_tokens / (time.perf_counter() - t0))
            bar.advance()
    return {"decode_tokens_per_s": statistics.median(rates), "decode_tokens": n_tokens}


def prefill_speed(runner: LlamaCppModel, vocab: int, n_tokens: int, repeats: int) -> dict[str, Any]:
    """One-prompt prefill tokens/s, as :func:`qtrain.evaluate.prefill_speed` (same prompt and cap, median)."""
    n_tokens = max(1, min(n_tokens, runner.n_ctx))
    x = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1))[0].tolist()
    times = []
    with phase("prefill benchmark (llama.cpp)", total=repeats + 1, unit="passes") as bar:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            runner.start(x)
            if r > 0:
                times.append(time.perf_counter() - t0)
            bar.advance()
    return {"prefill_tokens_per_s": n_tokens / statistics.median(times), "prefill_tokens": n_tokens}


def benchmark(runner: LlamaCppModel, vocab: int, ev: Any) -> dict[str, Any]:
    """Decode and prefill speed per ``eval.*`` (``decode_tokens``, ``decode_repeats``, ``prefill_tokens``)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if ev.decode_tokens > 0:
        out.update(decode_speed(runner, vocab, ev.decode_tokens, ev.decode_repeats))
    if ev.prefill_tokens > 0:
        out.update(prefill_speed(runner, vocab, ev.prefill_tokens, ev.decode_repeats))
    if out:
        out["bench_s"] = round(time.perf_counter() - t0, 3)
    return out


def generate_ids(
    runner: LlamaCppModel, ids: list[int], max_new: int, temperature: float, top_k: int, seed: int
) -> list[int]:
    """Extend ``ids`` by ``max_new`` sampled tokens (qtrain's sampler on llama.cpp's logits).

    As :func:`qtrain.evaluate.generate_tokens`: when the context fills, the cache is rebuilt
    from the last half of the window.
    """
    gen = torch.Generator().manual_seed(seed)
    out = list(ids[-runner.n_ctx :])
    logits = torch.from_numpy(np.array(runner.start(out)[-1]))[None]
    for _ in range(max_new):
        _check_finite(logits, runner.pos)
        nxt = int(_sample(logits, temperature, top_k, gen)[0, 0])
        out.append(nxt)
        if runner.pos >= runner.n_ctx:  # slide: re-prefill the most recent half window
            logits = torch.from_numpy(np.array(runner.start(out[-(runner.n_ctx // 2) :])[-1]))[None]
            continue
        logits = torch.from_numpy(np.array(runner.step(nxt)))[None]
    return out


def generate_text(runner: LlamaCppModel, prompt: str, g: Any, seed: int, tokenizer: Any) -> str:
    """Sample text after ``prompt`` per ``generate.*``, encoded and decoded as :func:`qtrain.evaluate.generate` does."""
    if tokenizer is None or tokenizer.kind == "bytes":
        ids = list(prompt.encode("utf-8")) or [10]
        out = generate_ids(runner, ids, g.max_new_tokens, g.temperature, g.top_k, seed)
        return bytes(out).decode("utf-8", errors="replace")
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n") or [0]
    out = generate_ids(runner, ids, g.max_new_tokens, g.temperature, g.top_k, seed)
    return str(tokenizer.decode(out))


def generate(model: GPT, manifest: dict[str, Any], tokenizer: Any, g: Any, seed: int) -> str:
    """`mode=generate backend=llamacpp`: the checkpoint's GGUF file (cached) sampled through llama.cpp."""
    with gguf_file(model, manifest, tokenizer) as (path, _):
        runner = LlamaCppModel(path, model.cfg.block_size, model.cfg.vocab_size, torch.get_num_threads())
        try:
            return generate_text(runner, g.prompt, g, seed, tokenizer)
        finally:
            runner.close()


def version() -> str:
    """llama-cpp-python's version (it builds llama.cpp from source at install)."""
    return str(getattr(llama_cpp(), "__version__", "unknown"))


def export_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report.json keys of the GGUF file a run used."""
    return {
        "backend": "llamacpp",
        "llama_cpp_python": version(),
        "gguf_file": report.get("path"),
        "gguf_cached": report.get("cached"),
        "gguf_file_type": report.get("file_type"),
        "gguf_bits_per_weight": report.get("bits_per_weight"),
    }
