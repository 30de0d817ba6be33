"""Typed configuration: one dataclass per Hydra group, registered in the ConfigStore.

YAML files under ``conf/`` hold values only; these dataclasses are the schema. Range and
cross-field checks live in :mod:`qtrain.config_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from qtrain.jobdir import register_resolver

MODES = ("train", "ptq", "qat", "finetune", "eval", "generate", "verify", "upgrade", "report", "export")
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
    """RMSNorm epsilon (also of the q/k norms with ``qk_norm``)."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); must divide n_head. None: n_head."""
    head_dim: int | None = None
    """Width of one attention head (even, for rotary). None: n_embd // n_head."""
    attn_bias: bool = False
    """Biases on the q, k and v projections (Qwen2); the output projection has none."""
    qk_norm: bool = False
    """RMSNorm over each head of q and k before rotary (Qwen3)."""
    rope_scaling: str = "none"
    """none | llama3 (Llama 3.1+ frequency scaling, the rope_* values below)."""
    rope_factor: float = 8.0
    """llama3: how much the low frequencies are slowed down."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths over rope_original_context / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths under rope_original_context / this are kept; in between, interpolated."""
    rope_original_context: int = 8192
    """llama3: the context length the model was pretrained with."""

    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when unset."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def head_size(self) -> int:
        """Width of one attention head: head_dim, or n_embd // n_head when unset."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim


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
    tokenizer: str = "bytes"
    """bytes (UTF-8 bytes, 256 ids) | bpe (byte-level BPE trained on the training split, data.vocab_size ids)
    | hf (the tokenizer.json in data.tokenizer_path). A checkpoint carries its tokenizer: eval, generate,
    finetune and resume use it without being told. model.vocab_size follows the tokenizer."""
    vocab_size: int = 1024
    """Ids of the bpe tokenizer (>= 256)."""
    tokenizer_path: str | None = None
    """hf: a model directory holding tokenizer.json (set by init_from=hf:PATH)."""


@dataclass
class TrainConfig:
    """Optimisation loop."""

    max_steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step (per process under DDP: global = batch_size * world)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr (0: decay to zero; it was 0.1 until the quality matrix, README
    Results, found that QAT needs the lr to reach zero to settle its codes; CHANGELOG)."""
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
    """MSE clipping search: number of candidate ranges (mse, and GPTQ's group ranges)."""
    act_order: bool = True
    """GPTQ: columns in order of decreasing Hessian diagonal, group ranges fixed beforehand from the
    original weights (same packed format). false: left to right, each group's range taken when GPTQ
    reaches it (qtrain's GPTQ until act-order became the default; CHANGELOG)."""


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
    distill: bool | None = None
    """Distil from the frozen full-precision init_from model (cross-entropy + distill_weight x KL on
    the logits). null (the default): when there is an init_from; true: require one; false: never
    (cross-entropy alone, no teacher copy in memory). Chosen on the quality matrix (README, Results)."""
    distill_weight: float = 0.5
    """Weight of the KL term."""
    distill_temperature: float = 1.0
    """Softmax temperature of the KL term."""
    distill_schedule: str = "constant"
    """constant: the KL weight stays `distill_weight` | linear: it falls to zero at train.max_steps."""


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


EXPORT_FORMATS = ("hf", "gguf", "compressed-tensors")
"""The `export.format` values (`mode=export`)."""
EXPORT_FLOAT_TYPES = ("f32", "f16", "bf16")
"""The `export.float_type` values."""


@dataclass
class ExportConfig:
    """`mode=export`: write a checkpoint (or an imported model) in another tool's format to `out`."""

    format: str = "hf"
    """hf (a Hugging Face model directory) | gguf | compressed-tensors."""
    float_type: str = "f32"
    """f32 | f16 | bf16: the type of the weights written in floating point."""


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
    export: ExportConfig = field(default_factory=ExportConfig)
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
    """upgrade, export: destination directory (new; never overwritten)."""
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
    backend: str = "qtrain"
    """eval, generate: qtrain (its own kernels) | llamacpp (the checkpoint exported losslessly to GGUF,
    cached by its manifest hash, run through llama-cpp-python: pip install 'qtrain[llamacpp]')."""


def distills(cfg: RunConfig) -> bool:
    """Whether this run distils: mode=qat with a full-precision `init_from` and `qat.distill` not false."""
    return cfg.mode.name == "qat" and bool(cfg.init_from) and cfg.qat.distill is not False


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
