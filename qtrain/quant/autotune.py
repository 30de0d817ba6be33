"""Which CPU decode kernel ``quant.kernel=auto`` runs on this machine: qtrain's or PyTorch's.

qtrain's AVX2 kernels (:mod:`qtrain.quant.native`) and PyTorch's (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``) rank differently by CPU: on an AMD EPYC with AVX2 qtrain's int4 kernel
is about twice as fast at one row, while on an AVX-512/AMX Xeon PyTorch's int4 kernel wins end
to end. So the first time a process needs a decode-sized CPU product (at most
``kernels.NATIVE_MAX_ROWS`` rows) with ``kernel=auto``, :func:`choose` measures both candidates
through the same closures the layers use, one row on the decode GEMV shapes of a 1024-wide
model (:data:`SHAPES`), checks both against a float64 reference, and picks the faster correct
one. The measurement is interleaved, keeps each kernel's fastest single call (robust on a
shared machine) and stops after :data:`BUDGET_S` seconds per weight type. On a machine too
busy to give this process's threads their cores, both are measured on one thread (a
multi-threaded call there mostly waits for the scheduler, whatever the kernel); such a noisy
entry is measured again by a later process that finds the machine quieter.

Cache: one JSON file per (CPU model and flags, torch version, kernel build, thread count),
``<kernel cache>/kernels/choice-<hash>.json`` beside the built kernels (``QTRAIN_CACHE_DIR``,
else ``~/.cache/qtrain``); later processes read it instead of measuring. The numbers in the
file decide (an edited file is honoured); a file that does not parse or does not match its
key is measured again and rewritten. The file is data: it is read only if it is a regular file
of this user's that no one else may write, and every field is checked (:func:`_valid`).

Overrides: ``quant.kernel=native`` or ``quant.kernel=torch`` for a run, or
``QTRAIN_CPU_KERNEL=native|torch`` for every ``auto`` layer of a process. The decision is
logged once per process (INFO, a ``note:`` line in the CLI's output): which kernel, on which
CPU, and the numbers behind it; ``mode=eval`` also records it in ``report.json`` (``kernels``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F

from qtrain.quant import kernels, native
from qtrain.quant import primitives as P
from qtrain.quant.kernel_ops import PackedWeights

log = logging.getLogger(__name__)

ENV_FORCE = "QTRAIN_CPU_KERNEL"
CANDIDATES = ("native", "torch")
SHAPES = ((1024, 3072), (1024, 1024), (2048, 1024))
"""K x N, one row: the fused qkv, attention output and MLP down projections of a 1024-wide model."""
BUDGET_S = 0.15
"""Measuring time per weight type (int4, int8); the rounds stop when it is spent."""
ROUNDS, CALLS = 8, 3
NAMES = {
    (4, "native"): "qtrain's AVX2 int4 kernel",
    (4, "torch"): "PyTorch's _weight_int4pack_mm_for_cpu",
    (8, "native"): "qtrain's AVX2 int8 kernel",
    (8, "torch"): "PyTorch's _weight_int8pack_mm",
}

_CHOSEN: dict[tuple[int, int], dict[str, Any]] = {}


def cpu_identity() -> dict[str, str]:
    """CPU model name, a hash of its feature flags, and PyTorch's view of its vector ISA."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            if name.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return {"cpu": model, "cpu_flags": digest, "isa": str(torch.backends.cpu.get_cpu_capability())}


def cache_key(threads: int) -> dict[str, Any]:
    """What a measurement depends on (see the module docstring)."""
    return {**cpu_identity(), "torch": torch.__version__, "kernels": native.build_id(), "threads": threads}


def cache_path(key: dict[str, Any]) -> Path:
    """The JSON file holding the measurements for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return native.cache_dir() / "kernels" / f"choice-{digest}.json"


Candidates = dict[str, Callable[[torch.Tensor], torch.Tensor]]


def _weights(bits: int, k: int, n: int, gen: torch.Generator) -> tuple[Candidates, torch.Tensor]:
    """Both candidates' closures for a random ``K x N`` layer (the layers' own), and its float32 weight."""
    scales = (torch.rand(n, k // 32 if bits == 4 else 1, generator=gen) * 0.01 + 0.01).to(P.SCALE_DTYPE)
    if bits == 4:
        w4 = PackedWeights(4, torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8), scales, None, k, 32)
        w4 = dataclasses.replace(w4, group=32)
        ref = P.dequantize(w4.codes(), scales, None, 4, 32)
        return {"native": kernels.native_int4(w4), "torch": kernels.aten_int4_cpu(w4)}, ref
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    w8 = PackedWeights(8, codes, scales, None, k, -1)
    return {"native": kernels.native_int8(w8), "torch": kernels.aten_int8_cpu(w8)}, codes.float() * scales.float()


def _correct(y: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Within the bf16-activation bound of the packed layers' tests, 2^-7 |x| @ |W|^T (a float32
    reference is exact enough: its own error is about 2^-24 of the same sum)."""
    if y is None:
        return False
    bound = 2**-7 * F.linear(x.abs(), w.abs()) + 1e-6
    return bool(((y.float() - F.linear(x, w)).abs() <= bound).all())


def measure(bits: int) -> dict[str, Any]:
    """Time both candidates on :data:`SHAPES` (microseconds per one-row call) and check them.

    Measured with this process's thread count when the machine has room for its threads
    (load average + threads <= cores + 0.5); on a busier machine a multi-threaded call mostly
    waits for the scheduler (tens of milliseconds whatever the kernel), so both are measured
    on one thread instead (``measured_threads``) and the entry counts as noisy (:func:`_stale`).

    Returns:
        ``{"shapes", "native_us", "torch_us", "native_ok", "torch_ok", "rounds", "load_average",
        "cores", "measured_threads"}``; ``*_us`` are each kernel's fastest call per shape.
    """
    threads, cores, load = torch.get_num_threads(), available_cores(), os.getloadavg()[0]
    measured = threads if load + threads <= cores + 0.5 else 1
    gen = torch.Generator().manual_seed(0)
    layers = [(*_weights(bits, k, n, gen), torch.randn(1, k, generator=gen)) for k, n in SHAPES]
    out: dict[str, Any] = {"shapes": [f"{k}x{n}" for k, n in SHAPES], "measured_threads": measured}
    torch.set_num_threads(measured)
    try:
        with torch.inference_mode():
            for c in CANDIDATES:  # also the warm-up (PyTorch's kernel repacks on its first call)
                out[f"{c}_ok"] = all(_correct(fns[c](x), x, w) for fns, w, x in layers)
            best, out["rounds"] = _time(layers)
    finally:
        torch.set_num_threads(threads)
    for c in CANDIDATES:
        out[f"{c}_us"] = [round(v, 2) for v in best[c]]
    out["load_average"], out["cores"] = round(max(load, os.getloadavg()[0]), 2), cores
    return out


def _time(
    layers: list[tuple[Candidates, torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, list[float]], int]:
    """Each candidate's fastest single call per layer (interleaved rounds, within :data:`BUDGET_S`)."""
    best = {c: [float("inf")] * len(layers) for c in CANDIDATES}
    t_end, rounds = time.perf_counter() + BUDGET_S, 0
    while rounds < ROUNDS and (rounds == 0 or time.perf_counter() < t_end):
        for c in CANDIDATES if rounds % 2 == 0 else CANDIDATES[::-1]:  # alternating order
            for i, (fns, _, x) in enumerate(layers):
                for _ in range(CALLS):  # each call timed alone: the best one is least disturbed by load
                    t0 = time.perf_counter()
                    fns[c](x)
                    best[c][i] = min(best[c][i], (time.perf_counter() - t0) * 1e6)
        rounds += 1
    return best, rounds


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _stale(entry: dict[str, Any], threads: int) -> bool:
    """A cached measurement taken in worse conditions than this machine offers now (measure again):
    on fewer threads than asked, or under a load average above the cores; and now there is room."""
    load, cores = entry.get("load_average"), entry.get("cores")
    overloaded = isinstance(load, (int, float)) and isinstance(cores, int) and load > cores
    noisy = overloaded or entry.get("measured_threads", threads) != threads
    return noisy and os.getloadavg()[0] + threads <= available_cores() + 0.5


def decide(entry: dict[str, Any]) -> tuple[str, str]:
    """The faster correct candidate of a measurement (by the sum over shapes), and why."""
    ok = [c for c in CANDIDATES if entry.get(f"{c}_ok")]
    if not ok:
        return "torch", "neither kernel passed the accuracy check"
    if len(ok) == 1:
        return ok[0], f"{'torch' if ok[0] == 'native' else 'native'} failed the accuracy check"
    fast, slow = sorted(CANDIDATES, key=lambda c: sum(entry[f"{c}_us"]))
    ratio = sum(entry[f"{slow}_us"]) / max(sum(entry[f"{fast}_us"]), 1e-9)
    on = entry.get("measured_threads")
    return fast, f"{ratio:.2f}x faster" + (f", measured on {on} thread{'s' if on != 1 else ''}" if on else "")


ENTRY_KEYS = frozenset(
    {"shapes", "native_us", "torch_us", "native_ok", "torch_ok", "rounds", "load_average", "cores", "measured_threads"}
)
"""What a measurement holds (:func:`measure`); a cached entry with anything else is measured again."""
MAX_CACHE_BYTES = 64 * 1024
"""A choice file is a few hundred bytes; a larger one is not read."""


def _number(v: object, lo: float = 0.0) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 20


def _valid(entry: object) -> TypeGuard[dict[str, Any]]:
    """Whether a cached entry is a measurement of :data:`SHAPES` as :func:`measure` writes it.

    The file is data: every field is checked (types, finite non-negative timings, one per
    shape, the shapes themselves), so an edited file can change the decision but never what
    is printed or recorded beyond those fields, nor crash a run.
    """
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        return False
    shapes = [f"{k}x{n}" for k, n in SHAPES]
    times = [entry[f"{c}_us"] for c in CANDIDATES]
    return (
        entry["shapes"] == shapes
        and all(isinstance(t, list) and len(t) == len(shapes) and all(_number(v) for v in t) for t in times)
        and all(isinstance(entry[f"{c}_ok"], bool) for c in CANDIDATES)
        and all(_count(entry[k]) for k in ("rounds", "cores", "measured_threads"))
        and _number(entry["load_average"])
    )


def _read(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The cached measurements for `key` ({} when missing, unreadable, untrusted or for another key)."""
    try:
        data = json.loads(native.read_private(path, MAX_CACHE_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, native.Untrusted) as err:  # ValueError: not JSON, not UTF-8
        log.info("kernel choice cache %s not used (%s); measuring again", path, err)
        return {}
    return data if isinstance(data, dict) and data.get("key") == key else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp: str | None = None
    try:
        native.kernel_dir()  # created owner-only, and ours
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        tmp = None
    except (OSError, native.Untrusted) as err:  # a read-only or untrusted cache: measure again next time
        log.info("kernel choice not cached (%s)", err)
    finally:  # also on a signal: no temporary left in the cache
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _forced() -> str | None:
    value = os.environ.get(ENV_FORCE, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in CANDIDATES:
        log.warning("%s=%s ignored (expected auto|native|torch)", ENV_FORCE, value)
        return None
    return value


def choose(bits: int) -> str:
    """``"native"`` or ``"torch"``: the decode kernel ``kernel=auto`` uses for ``bits``-bit weights.

    Decided once per process and thread count (see the module docstring), announced once.
    """
    threads = torch.get_num_threads()
    if (bits, threads) in _CHOSEN:
        return str(_CHOSEN[(bits, threads)]["kernel"])
    decision: dict[str, Any] = {"threads": threads}
    forced = _forced()
    if forced is not None:
        decision.update(kernel=forced, source=f"forced by {ENV_FORCE}")
    elif native.library() is None:
        decision.update(kernel="torch", source="qtrain's kernels unavailable here")
    else:
        decision.update(_measured(bits, threads))
    _CHOSEN[(bits, threads)] = decision
    _announce(bits, decision)
    return str(decision["kernel"])


def _measured(bits: int, threads: int) -> dict[str, Any]:
    key = cache_key(threads)
    path = cache_path(key)
    data = _read(path, key)
    entry, source = data.get(f"int{bits}"), f"cached in {path}"
    if not _valid(entry) or _stale(entry, threads):
        entry, source = measure(bits), f"measured now, cached in {path}"
        _write(path, {**_read(path, key), "key": key, f"int{bits}": entry})
    kernel, why = decide(entry)
    return {"kernel": kernel, "why": why, "source": source, **entry}


def _announce(bits: int, d: dict[str, Any]) -> None:
    ident = cpu_identity()
    where = f"{ident['cpu']} ({ident['isa']}, {d['threads']} thread{'s' if d['threads'] > 1 else ''})"
    msg = f"kernels: int{bits} decode on {where} uses {NAMES[(bits, d['kernel'])]}"
    if "native_us" in d:
        other = "torch" if d["kernel"] == "native" else "native"
        msg += (
            f": {sum(d[d['kernel'] + '_us']):.0f} us vs {sum(d[other + '_us']):.0f} us for {NAMES[(bits, other)]}"
            f" ({d['why']}; one-row GEMVs {', '.join(d['shapes'])}, load average {d['load_average']})"
        )
    msg += f"; {d['source']}; quant.kernel=native|torch forces one"
    log.info(msg)  # a "note:" line on the CLI's stderr


def decisions() -> dict[str, dict[str, Any]]:
    """This process's decisions so far, for ``report.json``: ``{"int4": {...}, "int8": {...}}``."""
    threads = torch.get_num_threads()
    return {f"int{b}": dict(d) for (b, t), d in sorted(_CHOSEN.items()) if t == threads}


def reset() -> None:
    """Forget this process's decisions, so the next decode-sized call decides again.

    Public for long-lived processes (notebooks, tests) that change ``QTRAIN_CPU_KERNEL`` or the
    thread count's machine conditions after a first decision.
    """
    _CHOSEN.clear()
