"""Quality matrix: regime Q's protocol on several corpora and seeds (issue 17; README, Results).

Every cell (a corpus and a seed) runs regime Q (scripts/regime_q.py, ../shared/BENCHMARKS.md)
through the `qtrain` CLI, so the numbers are what users get, validated on all windows
(`data.val_windows=-1`):

1. full precision: `model=tiny`, 3000 steps, batch 32, lr 3e-3, warmup 50, cosine
2. PTQ of it: int8; int4 group 32 rtn / mse / gptq; int8da_int4w rtn / gptq
3. 600 more steps at lr 5e-4 from the same checkpoint: a full-precision control (then int4 and
   int8da_int4w PTQ of it) and QAT arms: int4 and int8da_int4w with the defaults, each
   `--preset` (a conf/experiment QAT preset) and each `--qat-extra` variant
4. recovery = (ppl_PTQ_control - ppl_QAT) / (ppl_PTQ_control - ppl_fp_control)

Corpora (UTF-8 text, byte tokens; first 90% train, last 10% validate):
- `tinyshakespeare`: --shakespeare PATH (default ../shared/data/tinyshakespeare.txt next to the
  repository; Karpathy's char-rnn `tinyshakespeare/input.txt`, 1,115,394 bytes)
- `pydocs`: qtrain's embedded corpus (`data=pydocs`): the Python documentation topics
  (`pydoc_data.topics`) of CPython 3.11.7, shipped in qtrain/corpora/pydocs.txt.gz
- `pystdlib`: source code, built here without downloading: the `.py` files of the running
  Python's standard library (`sysconfig.get_paths()["stdlib"]`; no site-packages, no test
  directories), sorted by relative path, each after a `# file: RELPATH` line, cut at the last
  line end within the first 2,000,000 bytes; written once to OUT/corpora/pystdlib.txt (and
  reused from there, so a resumed matrix sees the same text). Other Python versions give other
  text: its Python version and SHA-256 are in OUT/corpora/pystdlib.json and summary.json.

One run directory per arm, OUT/<corpus>/seed<k>/<arm>; an arm whose report.json exists is not
run again, so re-running the same command resumes an interrupted matrix. A failed arm is logged
to OUT/<corpus>/seed<k>/<arm>.failed.log and shown as failed; the arms that start from it are
shown as missing. Cells run seed by seed (every corpus at the first seed, then the next seed).

    python scripts/quality_matrix.py                  # 3 corpora x 3 seeds, ~2.5-4 h on 2 cores
    python scripts/quality_matrix.py --preset qat_int4_distill --preset qat_int8da_int4w_distill
    python scripts/quality_matrix.py --quick --corpora pydocs    # tiny step counts, 1 seed, ~2.5 min

Prints the tables and writes OUT/summary.json and OUT/matrix.md: per cell, and per corpus and
over all cells mean, standard deviation and worst case; every run made in OUT is in them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import regime_q as rq  # noqa: E402  (scripts/ is not a package)

REPO = SCRIPTS.parent
CORPORA = ("tinyshakespeare", "pydocs", "pystdlib")
SEEDS = (1337, 1338, 1339)
"""1337 is qtrain's default seed: tinyshakespeare/seed1337 repeats regime Q's run."""
PTQ = ("int8", "int4_g32_rtn", "int4_g32_mse", "int4_g32_gptq", "int8da_int4w_rtn", "int8da_int4w_gptq",
       "int4_g32_gptq_noact", "int8da_int4w_gptq_noact")
PTQ_EXTRA = {f"{a}_noact": [*rq.PTQ_ARMS[a], "ptq.act_order=false"] for a in ("int4_g32_gptq", "int8da_int4w_gptq")}
"""GPTQ as it was before `ptq.act_order=true` became the default (left to right, dynamic groups)."""
SCHEMES = ("int4", "int8da_int4w")
STDLIB_BYTES = 2_000_000
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
QUICK = {"fp_steps": 60, "cont_steps": 20, "val_windows": 8}
Runner = Callable[..., subprocess.CompletedProcess]


class UsageError(Exception):
    """A bad argument or an OUT that does not fit this command (exit 2)."""


def set_arg(args: list[str], key: str, value: object) -> list[str]:
    """`args` with `key=...` replaced by `key=value` (appended when absent)."""
    out = [a for a in args if a.split("=", 1)[0] != key]
    return [*out, f"{key}={value}"]


def protocol(quick: bool) -> dict[str, list[str]]:
    """The override lists shared by every run (`common`), of step 1 (`fp`) and of step 3 (`cont`)."""
    common = [a for a in rq.COMMON if not a.startswith("data=")]
    fp, cont = list(rq.FP), list(rq.CONT)
    if quick:
        common = set_arg(common, "data.val_windows", QUICK["val_windows"])
        fp = set_arg(set_arg(set_arg(fp, "train.max_steps", QUICK["fp_steps"]), "train.eval_every", 0),
                     "train.save_every", 0)
        cont = set_arg(cont, "train.max_steps", QUICK["cont_steps"])
    return {"common": common, "fp": fp, "cont": cont}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stdlib_files(root: Path) -> list[str]:
    """The standard library's `.py` files below `root` (no site-packages or test dirs), sorted relative paths."""
    rels: list[str] = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in STDLIB_SKIP]
        rels += [Path(d, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return sorted(rels)


def concat_sources(root: Path, cap: int) -> tuple[bytes, list[str], list[str]]:
    """The `# file: REL` + source texts below `root` cut at the last line end within `cap` bytes.

    Returns the bytes, the files they hold (the last one cut) and the files skipped as not UTF-8.
    """
    parts, starts, skipped, size = [], [], [], 0
    for rel in stdlib_files(root):
        if size >= cap:
            break
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped.append(rel)
            continue
        parts.append(f"# file: {rel}\n{text}{'' if text.endswith(chr(10)) else chr(10)}".encode())
        starts.append((size, rel))
        size += len(parts[-1])
    raw = b"".join(parts)[:cap]
    raw = raw[: raw.rfind(b"\n") + 1]
    return raw, [rel for start, rel in starts if start < len(raw)], skipped


def build_stdlib_corpus(dest: Path, root: Path | None = None, cap: int = STDLIB_BYTES) -> dict:
    """Write the `pystdlib` corpus to `dest` once (its metadata to dest.json) and return the metadata.

    An existing `dest` is reused when its SHA-256 matches the metadata written with it.
    """
    meta_file = dest.with_suffix(".json")
    if dest.exists() or meta_file.exists():
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if not dest.is_file() or sha256(dest) != meta.get("sha256"):
            raise UsageError(f"{dest}: does not match {meta_file} (edited or half written); delete both to rebuild")
        return meta
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    raw, used, skipped = concat_sources(root, cap)
    if not raw:
        raise UsageError(f"{root}: no UTF-8 .py files to build the pystdlib corpus from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".tmp").write_bytes(raw)
    os.replace(dest.with_suffix(".tmp"), dest)
    meta = {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "stdlib": str(root), "cap_bytes": cap, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
            "files": len(used), "first_file": used[0], "last_file": used[-1], "skipped_not_utf8": skipped,
            "note": "built from this Python's standard library; other Python versions give other text"}
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


def preset_scheme(name: str, conf: Path = REPO / "conf" / "experiment") -> str:
    """The quant scheme of the QAT preset `name` (conf/experiment/NAME.yaml); UsageError if it is none."""
    f = conf / f"{name}.yaml"
    if not f.is_file():
        have = ", ".join(sorted(p.stem for p in conf.glob("*.yaml")))
        raise UsageError(f"--preset {name}: no {f} (presets: {have})")
    doc = yaml.safe_load(f.read_text()) or {}
    picks = {k: v for d in doc.get("defaults", []) if isinstance(d, dict) for k, v in d.items()}
    if picks.get("override /mode") != "qat":
        raise UsageError(f"--preset {name}: {f} is not a QAT preset (no 'override /mode: qat')")
    if "quant" in doc:
        raise UsageError(f"--preset {name}: {f} sets quant.* keys; the control PTQ would not match it")
    return str(picks.get("override /quant", "int4"))


def qat_variants(presets: list[str], extras: list[str]) -> dict[str, tuple[str, list[str]]]:
    """QAT arm name -> (scheme, overrides): the defaults, each `--qat-extra NAME=OVERRIDES`, each preset."""
    arms: dict[str, tuple[str, list[str]]] = {}
    for v in ["default=", *extras]:
        name, _, over = v.partition("=")
        only, _, name = name.rpartition(":")  # SCHEME:NAME=OVERRIDES: that scheme's arm only
        if not name or not name.replace("_", "").replace("-", "").isalnum() or (only and only not in SCHEMES):
            raise UsageError(f"--qat-extra {v!r}: expected [SCHEME:]NAME=OVERRIDES, NAME of letters, digits, - and _"
                             f", SCHEME one of {', '.join(SCHEMES)}")
        for s in [only] if only else SCHEMES:
            arms[f"qat_{s}_{name}"] = (s, ["mode=qat", f"quant={s}", *over.split()])
    for p in presets:
        arms[f"qat_preset_{p}"] = (preset_scheme(p), [f"+experiment={p}"])
    return arms


def matched(specs: list[str]) -> dict[str, list[str]]:
    """`--variant NAME=OVERRIDES` -> {NAME: overrides}: settings for a control and QAT arms alike."""
    out: dict[str, list[str]] = {}
    for v in specs:
        name, _, over = v.partition("=")
        if not name or not name.replace("_", "").isalnum() or name == "default":
            raise UsageError(f"--variant {v!r}: expected NAME=OVERRIDES, NAME of letters, digits and _ (not default)")
        out[name] = over.split()
    return out


def plan(proto: dict[str, list[str]], variants: dict[str, tuple[str, list[str]]],
         only: str = "all", matched_variants: dict[str, list[str]] | None = None,
         ) -> list[tuple[str, str | None, list[str]]]:
    """A cell's arms in run order: (arm, the arm whose checkpoint it starts from, overrides).

    A matched variant NAME gets its own control (control_fp_NAME, control_ptq_<scheme>_NAME) and QAT
    arms (qat_<scheme>_NAME), all with its overrides: a schedule compared with its own control.
    """
    arms: list[tuple[str, str | None, list[str]]] = [("fp", None, proto["fp"])]
    if only in ("all", "ptq"):
        arms += [(f"ptq_{n}", "fp", ["mode=ptq", *(rq.PTQ_ARMS | PTQ_EXTRA)[n]]) for n in PTQ]
    if only in ("all", "qat"):
        arms.append(("control_fp", "fp", ["mode=train", *proto["cont"]]))
        schemes = dict.fromkeys([*SCHEMES, *(s for s, _ in variants.values())])
        arms += [(f"control_ptq_{s}", "control_fp", ["mode=ptq", f"quant={s}"]) for s in schemes]
        # the arm's own overrides last, so a --qat-extra key (train.lr=...) wins over the protocol's
        arms += [(name, "fp", [*proto["cont"], *over]) for name, (_, over) in variants.items()]
        for name, over in (matched_variants or {}).items():
            arms.append((f"control_fp_{name}", "fp", ["mode=train", *proto["cont"], *over]))
            arms += [(f"control_ptq_{s}_{name}", f"control_fp_{name}", ["mode=ptq", f"quant={s}"]) for s in SCHEMES]
            arms += [(f"qat_{s}_{name}", "fp", ["mode=qat", f"quant={s}", *proto["cont"], *over]) for s in SCHEMES]
    return arms


@dataclass
class Matrix:
    """Runs cells into `out`, skipping finished arms; `run` is `subprocess.run` (a test passes a fake)."""

    out: Path
    proto: dict[str, list[str]]
    arms: list[tuple[str, str | None, list[str]]]
    data: dict[str, list[str]]
    run: Runner = subprocess.run
    failed: list[str] = field(default_factory=list)

    def cell(self, corpus: str, seed: int) -> None:
        """Every arm of one cell; an arm whose start failed or is missing is skipped."""
        cell = self.out / corpus / f"seed{seed}"
        for arm, start, over in self.arms:
            if start is not None and not (cell / start / "report.json").is_file():
                continue
            init = [f"init_from={cell / start}"] if start else []
            self.arm(cell / arm, [*self.proto["common"], *self.data[corpus], f"seed={seed}", *over, *init])

    def arm(self, run_dir: Path, args: list[str]) -> bool:
        """Run one qtrain job unless its report.json exists; False (and a .failed.log) when it fails."""
        if (run_dir / "report.json").is_file():
            return True
        if "mode=ptq" in args and (run_dir / "checkpoints").exists():
            args = [*args, "overwrite=true"]  # a PTQ cut short before its report; it always starts over
        cmd = [sys.executable, "-m", "qtrain", *args, f"hydra.run.dir={run_dir}"]
        rq.console.print(f"[dim]$ qtrain {' '.join(cmd[3:])}[/dim]")
        t0 = time.perf_counter()
        res = self.run(cmd, capture_output=True, text=True)
        log = run_dir.with_name(run_dir.name + ".failed.log")
        if res.returncode in (130, 143):
            raise SystemExit(f"interrupted (exit {res.returncode}) in {run_dir}; run the same command to resume")
        if res.returncode != 0 or not (run_dir / "report.json").is_file():
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"exit {res.returncode}\n$ {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
            rq.console.print(f"[red]failed (exit {res.returncode}): {run_dir}[/red]\n{res.stderr[-2000:]}")
            self.failed.append(str(run_dir))
            return False
        log.unlink(missing_ok=True)
        rq.console.print(f"  done in {time.perf_counter() - t0:.0f}s")
        return True


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: several matrix processes may share OUT (on
    disjoint cells), and one must never read another's half-written protocol.json."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_protocol(out: Path, record: dict) -> None:
    """Record the protocol in OUT/protocol.json, or refuse an OUT whose runs were made with another one.

    The step counts and overrides must be the same; a corpus file must have the same SHA-256 as
    when it was first used (other corpora may be added later).
    """
    f = out / "protocol.json"
    old = json.loads(f.read_text()) if f.is_file() else record
    diff = sorted(k for k in set(old) | set(record) if k != "corpora" and old.get(k) != record.get(k))
    diff += [f"corpus {c}" for c, h in record["corpora"].items() if old["corpora"].get(c, h) != h]
    if diff:
        raise UsageError(f"--out {out}: its runs were made with another protocol ({', '.join(diff)} differ, "
                         f"see {f}); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(old | {"corpora": old["corpora"] | record["corpora"]}, indent=2))


METRICS = {
    "fp_ppl": ("full precision, val ppl", "ppl"),
    "int8_ratio": ("int8 PTQ ppl / fp ppl", "ratio"),
    "int4_rtn_gap": ("int4 g32 rtn PTQ gap", "gap"),
    "int4_mse_gap": ("int4 g32 mse PTQ gap", "gap"),
    "int4_gptq_gap": ("int4 g32 gptq PTQ gap", "gap"),
    "int4_mse_closed": ("int4 mse: share of rtn gap closed", "share"),
    "int4_gptq_closed": ("int4 gptq: share of rtn gap closed", "share"),
    "w4a8_gptq_closed": ("int8da_int4w gptq: share closed", "share"),
    "int4_gptq_noact_closed": ("int4 gptq, act_order=false: share closed", "share"),
    "w4a8_gptq_noact_closed": ("int8da_int4w gptq, act_order=false: share closed", "share"),
    "control_fp_ppl": ("control fp (+continuation), ppl", "ppl"),
}
"""Metric key -> (label, kind). Worst case: the largest ppl, ratio or gap; the smallest share."""


def _ppl(arms: dict[str, dict], name: str) -> float | str:
    """An arm's val ppl, or why there is none: "missing" (not run yet) or "failed"."""
    a = arms.get(name)
    return "missing" if a is None else a.get("ppl", "failed")


def _calc(f: Callable[..., float | str], *xs: float | str) -> float | str:
    """f(*xs), or "failed"/"missing" when an input is."""
    bad = [x for x in xs if isinstance(x, str)]
    return ("failed" if "failed" in bad else "missing") if bad else f(*xs)


def closed(worse: float, better: float, ref: float) -> float | str:
    """Share of the gap worse - ref that `better` closes ("n/a" when there is no gap); QAT recovery too."""
    return (worse - better) / (worse - ref) if worse > ref else "n/a"


def cell_metrics(arms: dict[str, dict], qat: dict[str, str]) -> dict[str, float | str]:
    """One cell's metrics from its arms' ppl; `qat` maps QAT arm -> scheme (recovery_<arm minus qat_>)."""
    fp, rtn = _ppl(arms, "fp"), _ppl(arms, "ptq_int4_g32_rtn")
    m: dict[str, float | str] = {"fp_ppl": fp, "int8_ratio": _calc(lambda a, b: a / b, _ppl(arms, "ptq_int8"), fp)}
    for meth in ("rtn", "mse", "gptq"):
        m[f"int4_{meth}_gap"] = _calc(lambda a, b: a / b - 1, _ppl(arms, f"ptq_int4_g32_{meth}"), fp)
    for meth in ("mse", "gptq"):
        m[f"int4_{meth}_closed"] = _calc(closed, rtn, _ppl(arms, f"ptq_int4_g32_{meth}"), fp)
    m["w4a8_gptq_closed"] = _calc(closed, _ppl(arms, "ptq_int8da_int4w_rtn"), _ppl(arms, "ptq_int8da_int4w_gptq"), fp)
    for key, scheme in (("int4", "int4_g32"), ("w4a8", "int8da_int4w")):
        m[f"{key}_gptq_noact_closed"] = _calc(closed, _ppl(arms, f"ptq_{scheme}_rtn"),
                                              _ppl(arms, f"ptq_{scheme}_gptq_noact"), fp)
    m["control_fp_ppl"] = _ppl(arms, "control_fp")
    for arm, scheme in qat.items():
        name = arm.removeprefix(f"qat_{scheme}_")  # a matched variant's arms use its own control
        sfx = f"_{name}" if name != arm and f"control_fp_{name}" in arms else ""
        ctl, ptq = _ppl(arms, f"control_fp{sfx}"), _ppl(arms, f"control_ptq_{scheme}{sfx}")
        m[f"recovery_{arm[4:]}"] = _calc(closed, ptq, _ppl(arms, arm), ctl)
    return m


def read_arms(cell: Path) -> dict[str, dict]:
    """The arms a cell directory holds: ppl, scheme and time from report.json, or the failure's first line."""
    arms: dict[str, dict] = {}
    for p in sorted(cell.iterdir()) if cell.is_dir() else []:
        if p.name.endswith(".failed.log"):  # sorts after the arm's own directory: a report wins
            arms.setdefault(p.name.removesuffix(".failed.log"), {"failed": p.read_text().split("\n", 1)[0]})
        elif (p / "report.json").is_file():
            r = json.loads((p / "report.json").read_text())
            arms[p.name] = {"ppl": r["val_ppl"], "scheme": (r.get("quant") or {}).get("scheme"),
                            "fake_quant_ppl": r.get("fake_quant_val_ppl"), "elapsed_s": r.get("elapsed_s")}
    return arms


def aggregate(values: list[float | str], kind: str) -> dict:
    """n of N cells with a number, their mean, sample standard deviation and worst case."""
    xs = [float(v) for v in values if not isinstance(v, str)]
    mean = sum(xs) / len(xs) if xs else None
    sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if mean is not None and len(xs) > 1 else None
    worst = (min if kind == "share" else max)(xs) if xs else None
    return {"n": len(xs), "of": len(values), "mean": mean, "sd": sd, "worst": worst}


def summarize(out: Path, cells: list[tuple[str, int]], qat: dict[str, str]) -> dict:
    """Every cell asked for or found in OUT (every arm found in them), with metrics and aggregates."""
    qat = dict(qat)
    found = {(c.name, int(s.name[4:])) for c in out.glob("*") if c.name in CORPORA
             for s in c.glob("seed*") if s.name[4:].isdigit()}
    order = sorted(set(cells) | found, key=lambda cs: (CORPORA.index(cs[0]), cs[1]))
    arms = {cs: read_arms(out / cs[0] / f"seed{cs[1]}") for cs in order}
    for cell_arms in arms.values():  # QAT arms made earlier (other presets, variants) count too
        for name, a in cell_arms.items():
            if name.startswith("qat_"):
                qat.setdefault(name, a.get("scheme") or ("int8da_int4w" if "int8da_int4w" in name else "int4"))
    metrics = dict(METRICS) | {f"recovery_{a[4:]}": (f"QAT recovery, {a[4:]}", "share") for a in qat}
    rows: list[dict[str, Any]] = [
        {"corpus": c, "seed": s, "metrics": cell_metrics(arms[c, s], qat), "arms": arms[c, s],
         "elapsed_s": round(sum(a.get("elapsed_s") or 0 for a in arms[c, s].values()))} for c, s in order]
    agg: dict = {"all": {}, "by_corpus": {c: {} for c in dict.fromkeys(c for c, _ in order)}}
    for key, (_, kind) in metrics.items():
        agg["all"][key] = aggregate([r["metrics"][key] for r in rows], kind)
        for c in agg["by_corpus"]:
            agg["by_corpus"][c][key] = aggregate([r["metrics"][key] for r in rows if r["corpus"] == c], kind)
    return {"metrics": {k: {"label": lab, "kind": kind} for k, (lab, kind) in metrics.items()},
            "cells": rows, "aggregate": agg}


def fmt(v: float | str | None, kind: str, spread: bool = False) -> str:
    """A metric for the tables: ppl and ratios to 4 decimals, gaps and shares in percent."""
    if v is None or isinstance(v, str):
        return v or "-"
    if kind in ("ppl", "ratio"):
        return f"{v:.4f}"
    if kind == "share":
        return f"{v * 100:.1f}%"
    return f"{v * 100:.2f}%" if spread else f"{v * 100:+.2f}%"


def tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the per-cell and the across-cells table."""
    cells, agg, metrics = summary["cells"], summary["aggregate"], summary["metrics"]
    per = [[m["label"], *(fmt(c["metrics"][k], m["kind"]) for c in cells)] for k, m in metrics.items()]
    per.append(["run time of the cell's arms, s", *(str(c["elapsed_s"]) for c in cells)])

    def ms(a: dict, kind: str) -> str:
        sd = "" if a["sd"] is None else f" ± {fmt(a['sd'], kind, True)}"
        return "-" if a["mean"] is None else fmt(a["mean"], kind) + sd

    across = [[m["label"], *(ms(agg["by_corpus"][c][k], m["kind"]) for c in agg["by_corpus"]),
               ms(agg["all"][k], m["kind"]), fmt(agg["all"][k]["worst"], m["kind"]),
               f"{agg['all'][k]['n']}/{agg['all'][k]['of']}"] for k, m in metrics.items()]
    return [("Per cell", ["metric", *(f"{c['corpus']} s{c['seed']}" for c in cells)], per),
            ("Across cells (mean ± sd)", ["metric", *agg["by_corpus"], "all", "worst", "cells"], across)]


def render(out: Path, summary: dict) -> None:
    """Print the tables and write OUT/summary.json and OUT/matrix.md."""
    md = [f"# Quality matrix{' (--quick)' if summary.get('quick') else ''}", "",
          f"`{summary.get('command', '')}` on {summary.get('machine', {}).get('cpu', '?')}", ""]
    for step, over in summary.get("protocol", {}).items():
        md.append(f"- {step}: `{' '.join(over)}`")
    for name, c in summary.get("corpora", {}).items():
        extra = f", built with Python {c['python']} (other versions give other text)" if "python" in c else ""
        md.append(f"- {name}: {c['source']}{extra}" + (f", {c['bytes']:,} bytes, sha256 {c['sha256']}"
                                                        if "sha256" in c else ""))
    for title, header, rows in tables(summary):
        t = Table(title=title)
        for h in header:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        rq.console.print(t)
        md += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "Gap: ppl / fp ppl - 1. Share closed: (rtn - method) / (rtn - fp). QAT recovery: (control PTQ - "
           "QAT) / (control PTQ - control fp). sd: sample standard deviation over the cells with a number; worst: "
           "the largest gap or ratio, the smallest share; cells: cells with a number / cells. missing: not run (yet); "
           "failed: <corpus>/seed<k>/<arm>.failed.log; n/a: no gap to close (left out of mean, sd, worst).", ""]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "matrix.md", "\n".join(md))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                    metavar="PATH", help="tinyshakespeare.txt (default: ../shared/data/ next to the repository)")
    ap.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated subset of {','.join(CORPORA)}")
    ap.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {','.join(map(str, SEEDS))}; "
                    "--quick: the first)")
    ap.add_argument("--out", default=None, help="default bench_out/quality_matrix (--quick: ..._quick)")
    ap.add_argument("--only", choices=["all", "ptq", "qat"], default="all")
    ap.add_argument("--preset", action="append", default=[], metavar="NAME",
                    help="a QAT arm with +experiment=NAME (conf/experiment/NAME.yaml); repeatable")
    ap.add_argument("--qat-extra", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="QAT arms int4 and int8da_int4w with these overrides, e.g. 'lsq=qat.learn_scales=true'; "
                    "'int4:NAME=...': the int4 arm only")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="a control (control_fp_NAME + its PTQ) and QAT arms qat_<scheme>_NAME, all with these "
                    "overrides, recovery against that control, e.g. 'floor10=train.min_lr_ratio=0.1'")
    ap.add_argument("--quick", action="store_true", help=f"tiny step counts for iteration: {QUICK}")
    ap.add_argument("--report-only", action="store_true", help="run nothing; tabulate what OUT holds")
    return ap.parse_args(argv)


def setup(a: argparse.Namespace) -> tuple[list[str], list[int], Path, dict]:
    """Validated corpora, seeds, OUT and the corpus metadata; UsageError naming the bad argument."""
    corpora = [c.strip() for c in a.corpora.split(",") if c.strip()]
    bad = [c for c in corpora if c not in CORPORA]
    if bad or not corpora:
        raise UsageError(f"--corpora {a.corpora}: unknown {', '.join(bad) or '(empty)'}; choose from {CORPORA}")
    try:
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(SEEDS[:1] if a.quick else SEEDS)
    except ValueError:
        raise UsageError(f"--seeds {a.seeds}: expected comma-separated integers") from None
    out = Path(a.out or ("bench_out/quality_matrix" + ("_quick" if a.quick else ""))).resolve()
    meta: dict = {"pydocs": {"source": "qtrain/corpora/pydocs.txt.gz (data=pydocs)", "args": ["data=pydocs"]}}
    shakespeare = Path(a.shakespeare).resolve()
    if "tinyshakespeare" in corpora:
        if not shakespeare.is_file():
            raise UsageError(f"--shakespeare {a.shakespeare}: no such file (tinyshakespeare.txt, 1,115,394 bytes)")
        meta["tinyshakespeare"] = {"source": str(shakespeare), "bytes": shakespeare.stat().st_size,
                                   "sha256": sha256(shakespeare), "args": ["data=text", f"data.path={shakespeare}"]}
    if "pystdlib" in corpora:
        dest = out / "corpora" / "pystdlib.txt"
        info = dest.with_suffix(".json")
        built = json.loads(info.read_text()) if a.report_only and info.is_file() else {}
        built = built if a.report_only else build_stdlib_corpus(dest)
        meta["pystdlib"] = built | {"source": str(dest), "args": ["data=text", f"data.path={dest}"]}
    return corpora, seeds, out, meta


def main(argv: list[str] | None = None) -> int:
    """Run (or with --report-only only tabulate) the matrix; 0 when every requested arm has a report."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        corpora, seeds, out, meta = setup(a)
        proto = protocol(a.quick)
        variants = qat_variants(a.preset, a.qat_extra)
        arms = plan(proto, variants, a.only, matched(a.variant))
        if not a.report_only:
            check_protocol(out, {"quick": a.quick, **proto, "corpora": {c: meta[c].get("sha256") for c in corpora}})
    except UsageError as e:
        rq.console.print(f"[red]error:[/red] {e}")
        return 2
    m = Matrix(out, proto, arms, {c: meta[c]["args"] for c in corpora})
    if not a.report_only:
        for seed in seeds:
            for corpus in corpora:
                m.cell(corpus, seed)
    qat = {n: scheme for n, (scheme, _) in variants.items()} if a.only != "ptq" else {}
    qat |= {f"qat_{s}_{v}": s for v in matched(a.variant) for s in SCHEMES} if a.only != "ptq" else {}
    # --report-only without --seeds: the cells OUT holds (the default seeds as missing when it has none)
    asked = [(c, s) for s in seeds for c in corpora]
    if a.report_only and not a.seeds and any(out.glob("*/seed*")):
        asked = []
    summary = summarize(out, asked, qat)
    summary |= {"command": shlex.join(["python", "scripts/quality_matrix.py", *argv]), "quick": a.quick,
                "protocol": proto, "corpora": {c: meta[c] for c in corpora}, "machine": rq.machine(),
                "driver_python": platform.python_version()}
    render(out, summary)
    if m.failed:
        rq.console.print(f"[red]{len(m.failed)} run(s) failed[/red] (logs: <run dir>.failed.log): "
                         + ", ".join(m.failed))
    return 1 if m.failed else 0


if __name__ == "__main__":
    sys.exit(main())
