"""Typed configuration: one dataclass per Hydra group, registered in the ConfigStore.

YAML files under ``conf/`` hold values only; these dataclasses are the schema. Range and
cross-field checks live in :func:`validate`, which returns *every* problem at once so the
CLI can list them together and exit 2 before any work starts.

Example:
    >>> cfg = RunConfig(model=ModelConfig(name="tiny", n_layer=2, n_embd=96, n_head=4,
    ...                 block_size=128, mlp_hidden=256))
    >>> validate(cfg)
    []
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore

from qtrain.jobdir import register_resolver

MODES = ("train", "ptq", "qat", "finetune", "eval", "generate", "verify", "upgrade", "report")
GROUPED_SCHEMES = {"int8": False, "int4": True, "int8da_int4w": True}
"""The `quant.scheme` values (besides none) and whether their weights come in groups along K
(`quant.group_size` applies); the others are per channel and symmetric. The scheme table
itself (`qtrain.quant.schemes`) lives above config; a test keeps the two in step."""
SCHEME_NAMES = ("none", *GROUPED_SCHEMES)
GROUP_SIZES = (32, 64, 128, 256)
PTQ_METHODS = ("rtn", "mse", "gptq")
"""The `ptq.method` values (the registry `qtrain.quant.ptq.METHODS`; a test keeps them in step)."""
TRAINING_MODES = ("train", "qat", "finetune")
"""Modes that run the optimisation loop (train.* schedule applies)."""
KERNELS = ("auto", "native", "torch", "reference")


@dataclass
class ModeConfig:
    """Which job `qtrain` runs."""

    name: str = "train"
    """One of MODES."""


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder; sizes live in conf/model/*.yaml."""

    name: str = "tiny"
    """Preset name, informational."""
    n_layer: int = 2
    """Number of Transformer blocks."""
    n_embd: int = 96
    """Residual width."""
    n_head: int = 4
    """Attention heads; n_embd must be divisible by it."""
    block_size: int = 128
    """Context length in tokens."""
    mlp_hidden: int = 256
    """SwiGLU hidden width."""
    vocab_size: int = 256
    """Byte-level vocabulary."""
    tie_embeddings: bool = True
    """Share the token embedding and the output head."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""


@dataclass
class QuantConfig:
    """Quantization scheme; see qtrain.quant.schemes.SCHEMES."""

    scheme: str = "none"
    """none | int8 | int4 | int8da_int4w."""
    group_size: int = 32
    """int4 group size along the input dimension (32/64/128/256), or -1 for per channel."""
    symmetric: bool = True
    """int4: symmetric codes [-8, 7]; false adds a per-group zero point."""
    activations: str = "none"
    """none | int8 (dynamic per-token); int8da_int4w sets int8."""
    embeddings: bool = False
    """Also quantize the token embedding (weight-only, per-channel int8/int4 by scheme)."""
    lm_head: bool = False
    """Also quantize the output head."""
    kernel: str = "auto"
    """auto (on CPU, per machine the faster of qtrain's and PyTorch's decode kernels, measured once
    and cached) | native (qtrain's CPU kernels) | torch (PyTorch's packed kernels only) |
    reference (dequantize + float32 matmul)."""


@dataclass
class DataConfig:
    """Corpus and batching."""

    name: str = "pydocs"
    """pydocs (embedded CPython docs) | text (data.path)."""
    path: str | None = None
    """File or directory of .txt files for data=text."""
    val_fraction: float = 0.1
    """Last fraction of the corpus used for validation."""
    val_windows: int = 128
    """Number of fixed validation windows (-1 for all)."""


@dataclass
class TrainConfig:
    """Optimisation loop."""

    max_steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step (per process under DDP: global = batch_size * world)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: far less
    memory for activations, about one more forward per step; the same losses and gradients."""
    eval_every: int = 250
    """Validation interval in steps (0: only at the end)."""
    save_every: int = 250
    """Checkpoint interval in steps (0: only at the end)."""
    keep: int = 3
    """Checkpoints retained (at least 2)."""
    log_every: int = 0
    """metrics.jsonl (and plain progress line) interval in steps; 0: auto (`log_interval`)."""

    def log_interval(self) -> int:
        """Steps between logged records: `log_every`, or with 0 about 50 points per run, at most every 10 steps.

        Short runs so get loss curves with enough points to plot; long ones are logged every 10 steps.
        """
        return self.log_every or max(1, min(10, self.max_steps // 50))


@dataclass
class PTQConfig:
    """Post-training quantization."""

    method: str = "rtn"
    """rtn | mse | gptq."""
    calib_batches: int = 8
    """Calibration batches of train.batch_size windows from the training split."""
    damp: float = 0.01
    """GPTQ Hessian dampening, fraction of the mean diagonal."""
    mse_grid: int = 100
    """MSE clipping search: number of candidate ranges."""


@dataclass
class QATConfig:
    """Quantization-aware training."""

    start_step: int = 0
    """Step at which weight fake-quant turns on (full precision before)."""
    act_start_step: int = 0
    """Step at which activation fake-quant turns on (int8da_int4w)."""
    freeze_step: int = -1
    """Step from which scales are frozen (-1: never)."""
    learn_scales: bool = False
    """LSQ-style learnable scales."""
    scale_lr: float = 1e-4
    """Learning rate of the learnable scales."""
    init: str = "auto"
    """Where QAT starts: auto (gptq with a full-precision init_from, else rtn) | rtn | mse | gptq.
    mse/gptq start from that PTQ result itself (its codes and scales)."""
    distill: bool = False
    """Distil from the frozen full-precision init_from model."""
    distill_weight: float = 1.0
    """Weight of the KL term."""
    distill_temperature: float = 1.0
    """Softmax temperature of the KL term."""


@dataclass
class GenerateConfig:
    """Sampling."""

    prompt: str = "def "
    """Prompt text."""
    max_new_tokens: int = 200
    """Tokens to sample."""
    temperature: float = 0.8
    """0 for greedy."""
    top_k: int = 50
    """Top-k filter (0: off)."""


@dataclass
class EvalConfig:
    """Evaluation extras."""

    decode_tokens: int = 64
    """Tokens generated when timing decode (eval, and the packed result of ptq/qat/finetune; 0: skip)."""
    decode_repeats: int = 3
    """Timed repeats (median reported)."""
    prefill_tokens: int = 512
    """Prompt length for the prefill timing (capped at the context; 0: skip)."""


@dataclass
class RunConfig:
    """Everything one `qtrain` invocation needs."""

    mode: ModeConfig = field(default_factory=ModeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init_from: str | None = None
    """Checkpoint dir (or run dir: its latest valid checkpoint) to start a new run from."""
    resume: str = "auto"
    """auto | never | must: continue this run dir from its latest valid checkpoint."""
    overwrite: bool = False
    """Discard the checkpoints, metrics.jsonl and report.json an earlier run left in this run dir when
    starting over (``resume=never``, ``mode=ptq``); without it such a start is refused (exit 2)."""
    compare_to: str | None = None
    """eval: reference checkpoint for KL / top-1 agreement."""
    out: str | None = None
    """upgrade: destination directory."""
    runs: list[str] = field(default_factory=list)
    """report: run or sweep directories."""
    seed: int = 1337
    """Seed for initialisation and data order."""
    device: str = "auto"
    """auto | cpu | cuda."""
    compile: bool = False
    """torch.compile the training model."""
    threads: Any = "auto"
    """CPU threads (PyTorch intra-op and qtrain's kernels): auto (OMP_NUM_THREADS if set, else the
    cores this process may run on, shared among the processes of a node) | a positive integer."""
    hooks: list[Any] = field(default_factory=list)
    """Experiment hooks: [{_target_: pkg.fn, ...}]."""


def _check(problems: list[str], ok: bool, key: str, msg: str) -> None:
    if not ok:
        problems.append(f"{key}: {msg}")


def _check_overwrite(p: list[str], cfg: RunConfig) -> None:
    """`overwrite=true` only where a run starts over in a run dir that may hold checkpoints."""
    mode = cfg.mode.name
    if not cfg.overwrite or mode == "ptq" or (mode in ("train", "qat", "finetune") and cfg.resume == "never"):
        return
    if mode in ("train", "qat", "finetune"):
        p.append(
            f"overwrite: overwrite=true discards this run dir's checkpoints, but resume={cfg.resume} continues "
            f"from them; to start over use resume=never overwrite=true"
        )
    else:
        p.append(f"overwrite: mode={mode} writes no checkpoints, so there is nothing to discard; drop overwrite=true")


def validate(cfg: RunConfig) -> list[str]:
    """Return every configuration problem (empty when valid); each names its key."""
    p: list[str] = []
    m, t, q = cfg.model, cfg.train, cfg.quant
    _check(p, cfg.mode.name in MODES, "mode", f"'{cfg.mode.name}' is not one of {list(MODES)}")
    _check(p, cfg.resume in ("auto", "never", "must"), "resume", f"'{cfg.resume}' must be auto|never|must")
    _check_overwrite(p, cfg)
    _check(p, cfg.device in ("auto", "cpu", "cuda"), "device", f"'{cfg.device}' must be auto|cpu|cuda")
    _check(p, _threads_ok(cfg.threads), "threads", f"'{cfg.threads}' must be auto or a positive integer")
    for key in ("n_layer", "n_embd", "n_head", "block_size", "mlp_hidden", "vocab_size"):
        _check(p, getattr(m, key) > 0, f"model.{key}", f"must be > 0 (got {getattr(m, key)})")
    if m.n_head > 0:
        _check(p, m.n_embd % m.n_head == 0, "model.n_embd", f"{m.n_embd} not divisible by model.n_head={m.n_head}")
        _check(p, (m.n_embd // m.n_head) % 2 == 0, "model.n_head", "head size must be even for rotary embeddings")
    _check(p, t.max_steps >= 0, "train.max_steps", f"must be >= 0 (got {t.max_steps})")
    _check(p, t.batch_size > 0, "train.batch_size", f"must be > 0 (got {t.batch_size})")
    _check(p, t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
    _check(p, 0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1] (got {t.min_lr_ratio})")
    _check(p, t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0 (got {t.warmup_steps})")
    _check(p, t.grad_accum > 0, "train.grad_accum", f"must be > 0 (got {t.grad_accum})")
    _check(p, t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (got {t.grad_clip})")
    _check(p, t.weight_decay >= 0, "train.weight_decay", f"must be >= 0 (got {t.weight_decay})")
    for key in ("eval_every", "save_every"):
        _check(p, getattr(t, key) >= 0, f"train.{key}", f"must be >= 0 (got {getattr(t, key)})")
    _check(p, t.log_every >= 0, "train.log_every", f"must be >= 0, 0 meaning auto (got {t.log_every})")
    _check(p, t.keep >= 2, "train.keep", f"must be >= 2 so a valid checkpoint always survives (got {t.keep})")
    _check(p, 0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be in (0, 1) (got {cfg.data.val_fraction})")
    _check(p, cfg.data.val_windows == -1 or cfg.data.val_windows > 0, "data.val_windows", "must be > 0 or -1")
    _check(p, cfg.data.name in ("pydocs", "text"), "data.name", f"'{cfg.data.name}' must be pydocs|text")
    if cfg.data.name == "text":
        _check(p, bool(cfg.data.path), "data.path", "required with data=text (a file or a directory of .txt files)")
    _validate_quant(p, q, m)
    _check(p, cfg.ptq.method in PTQ_METHODS, "ptq.method", f"'{cfg.ptq.method}' is not one of {list(PTQ_METHODS)}")
    _check(p, cfg.ptq.calib_batches > 0, "ptq.calib_batches", f"must be > 0 (got {cfg.ptq.calib_batches})")
    _check(
        p,
        cfg.qat.init in ("auto", *PTQ_METHODS),
        "qat.init",
        f"'{cfg.qat.init}' is not one of {['auto', *PTQ_METHODS]}",
    )
    _check(p, cfg.qat.start_step >= 0, "qat.start_step", f"must be >= 0 (got {cfg.qat.start_step})")
    _check(p, cfg.qat.act_start_step >= 0, "qat.act_start_step", f"must be >= 0 (got {cfg.qat.act_start_step})")
    _check(p, cfg.qat.scale_lr > 0, "qat.scale_lr", f"must be > 0 (got {cfg.qat.scale_lr})")
    _check(p, cfg.qat.distill_temperature > 0, "qat.distill_temperature", "must be > 0")
    ev = cfg.eval
    _check(p, ev.decode_tokens >= 0, "eval.decode_tokens", f"must be >= 0 (0: skip; got {ev.decode_tokens})")
    _check(p, ev.decode_repeats > 0, "eval.decode_repeats", f"must be > 0 (got {ev.decode_repeats})")
    _check(p, ev.prefill_tokens >= 0, "eval.prefill_tokens", f"must be >= 0 (0: skip; got {ev.prefill_tokens})")
    _check(p, cfg.generate.max_new_tokens >= 0, "generate.max_new_tokens", "must be >= 0")
    _check(p, cfg.generate.temperature >= 0, "generate.temperature", "must be >= 0")
    _validate_runnable(p, cfg)
    _validate_mode_inputs(p, cfg)
    return p


def warnings_for(cfg: RunConfig) -> list[str]:
    """Settings that are valid but almost certainly not what was meant: printed, not refused.

    ``train.warmup_steps >= train.max_steps`` is a warning, not an error: a short smoke run
    (``qtrain train.max_steps=20`` with the default 50 warmup steps) is a common first
    command, and it still trains; the warning says what the schedule does and how to fix it.
    """
    out: list[str] = []
    t = cfg.train
    if cfg.mode.name in TRAINING_MODES and 0 < t.max_steps <= t.warmup_steps:
        out.append(
            f"train.warmup_steps={t.warmup_steps} >= train.max_steps={t.max_steps}: the learning rate never "
            f"leaves warmup (it ends at {t.lr * t.max_steps / t.warmup_steps:.3g}, "
            f"{t.max_steps / t.warmup_steps:.0%} of train.lr={t.lr:g}) and the cosine decay never runs; "
            f"set train.warmup_steps below train.max_steps, e.g. train.warmup_steps={t.max_steps // 10}"
        )
    return out


def _threads_ok(value: Any) -> bool:
    text = str(value).strip()
    return text.lower() == "auto" or (not isinstance(value, bool) and text.isdigit() and int(text) > 0)


SEED_MAX = 2**32 - 1
"""Largest `seed`: the data order seeds a generator with seed * 100003 + epoch (64-bit)."""
FLOAT_SECTIONS = ("model", "quant", "data", "train", "ptq", "qat", "generate", "eval")


def _validate_runnable(p: list[str], cfg: RunConfig) -> None:
    """Values in range that the numerics cannot run with: seeds, epsilons, bases, non-finite floats."""
    m = cfg.model
    _check(p, 0 <= cfg.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}] (got {cfg.seed})")
    damp = f"must be in [1e-6, 1], a fraction of the mean Hessian diagonal (got {cfg.ptq.damp})"
    _check(p, 1e-6 <= cfg.ptq.damp <= 1, "ptq.damp", damp)
    _check(p, 1 <= m.rope_theta < math.inf, "model.rope_theta", f"must be a finite base >= 1 (got {m.rope_theta})")
    _check(p, 1e-12 <= m.norm_eps <= 1, "model.norm_eps", f"must be in [1e-12, 1] (got {m.norm_eps})")
    if m.vocab_size > 0:  # byte-level tokens: every byte value 0..255 must have an embedding row
        _check(p, m.vocab_size >= 256, "model.vocab_size", f"must be >= 256 for byte tokens (got {m.vocab_size})")
    reported = {problem.split(":", 1)[0] for problem in p}
    for section in FLOAT_SECTIONS:  # inf passes every `> 0` above, nan fails it: one message per key
        node = getattr(cfg, section)
        for f in fields(node):
            value, key = getattr(node, f.name), f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value) and key not in reported:
                p.append(f"{key}: must be a finite number (got {value})")


def _validate_quant(p: list[str], q: QuantConfig, m: ModelConfig) -> None:
    _check(p, q.scheme in SCHEME_NAMES, "quant.scheme", f"'{q.scheme}' is not one of {list(SCHEME_NAMES)}")
    _check(p, q.activations in ("none", "int8"), "quant.activations", f"'{q.activations}' must be none|int8")
    _check(p, q.kernel in KERNELS, "quant.kernel", f"'{q.kernel}' must be {'|'.join(KERNELS)}")
    grouped = GROUPED_SCHEMES.get(q.scheme)
    if grouped:
        ok = q.group_size == -1 or q.group_size in GROUP_SIZES
        _check(p, ok, "quant.group_size", f"{q.group_size} must be one of {list(GROUP_SIZES)} or -1 (per channel)")
        if ok and q.group_size > 0:
            for name, k in (
                ("attention/MLP input (model.n_embd)", m.n_embd),
                ("MLP down input (model.mlp_hidden)", m.mlp_hidden),
            ):
                _check(
                    p,
                    k % q.group_size == 0,
                    "quant.group_size",
                    f"{q.group_size} does not divide the {name} = {k}; pick one of "
                    f"{[g for g in GROUP_SIZES if k % g == 0] or 'none'} or -1",
                )
    if grouped is False:
        _check(
            p, q.symmetric, "quant.symmetric", f"{q.scheme} weights are symmetric per channel; set quant.symmetric=true"
        )


def _validate_mode_inputs(p: list[str], cfg: RunConfig) -> None:
    mode = cfg.mode.name
    needs_init = ("ptq", "finetune", "eval", "generate", "verify", "upgrade")
    if mode in needs_init:
        _check(p, bool(cfg.init_from), "init_from", f"mode={mode} needs init_from=PATH (a checkpoint or run dir)")
    if mode in ("ptq", "qat"):
        _check(p, cfg.quant.scheme != "none", "quant", f"mode={mode} needs a scheme: quant={'|'.join(GROUPED_SCHEMES)}")
    if mode == "upgrade":
        _check(p, bool(cfg.out), "out", "mode=upgrade needs out=PATH (a new directory)")
    if mode == "report":
        _check(p, len(cfg.runs) > 0, "runs", "mode=report needs runs=[DIR,...]")
    if cfg.qat.distill and mode == "qat":
        _check(p, bool(cfg.init_from), "qat.distill", "distillation needs a full-precision teacher: init_from=PATH")


def register_configs() -> None:
    """Register every group's schema in Hydra's ConfigStore, and the job-dir resolver (idempotent)."""
    register_resolver()  # also registered on import: a launcher's worker process needs it to name job dirs
    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)


SCHEMAS: tuple[tuple[str | None, str, type], ...] = (
    (None, "run_schema", RunConfig),
    ("mode", "mode_schema", ModeConfig),
    ("model", "model_schema", ModelConfig),
    ("quant", "quant_schema", QuantConfig),
    ("data", "data_schema", DataConfig),
)
"""(group, name, dataclass) of each ConfigStore entry: the YAML options' schemas, not options
a user picks, so `--help`, tab completion and error messages never offer these names."""
SCHEMA_NAMES = frozenset(name for _, name, _ in SCHEMAS)
