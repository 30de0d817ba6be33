"""Import a Hugging Face Llama-family model directory into a qtrain GPT, tensor by tensor.

The model is built on the meta device, checked against every safetensors header (names and
shapes: before any weight is read or any memory allocated), then allocated once
(``to_empty``) and filled from memory-mapped files one tensor at a time: each tensor is
viewed in the mapping, permuted if it is a rotary q/k block, copied (and cast to float32)
into its rows of the fused parameter, and its pages are released from the process again.
So the peak is the model itself plus about one tensor, whatever the files' size or sharding.

Example:
    >>> source, model = load_hf("path/to/Llama-3.2-1B", torch.device("cpu"))
    >>> source.manifest["imported_from"]["model_type"]
    'llama'
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from qtrain import checkpoint as ck
from qtrain.config import ModelConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.hf.config import model_config_from_hf, read_config
from qtrain.hf.weights import IGNORED_SUFFIXES, Slot, hf_shape, slots, to_qtrain
from qtrain.model import GPT
from qtrain.tokenizer import load_tokenizer_dir

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SIDE_FILES = ("config.json", INDEX, "generation_config.json", "tokenizer.json", "tokenizer_config.json")
"""Files besides the shards hashed into `imported_from` when present."""
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Stored:
    """One tensor of a shard: its file, where its bytes start, its dtype and shape."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def shard_files(src: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or model.safetensors.

    Raises:
        ConfigError: no safetensors weights (pickled ``.bin`` weights are never loaded).
        CheckpointError: an index naming unsafe or missing files.
    """
    index = src / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        for name in names:
            if (
                not isinstance(name, str)
                or "/" in name
                or "\\" in name
                or name.startswith(".")
                or not name.endswith(".safetensors")
            ):
                raise CheckpointError(f"{index}: names {name!r}, not a plain .safetensors file of the directory")
            if not (src / name).is_file():
                raise CheckpointError(f"{index}: shard {name} is missing from {src}")
        return [src / n for n in names]
    if (src / SINGLE).is_file():
        return [src / SINGLE]
    bins = sorted(p.name for p in src.glob("*.bin"))
    extra = (
        f" (found {', '.join(bins[:3])}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
    )
    raise ConfigError(f"init_from: {src} holds neither {SINGLE} nor {INDEX}{extra}")


def read_headers(shards: list[Path]) -> dict[str, Stored]:
    """Every tensor of the shards (headers validated like a checkpoint's, nothing else read).

    Raises:
        CheckpointError: a damaged header, or a tensor stored in two shards.
    """
    found: dict[str, Stored] = {}
    for file in shards:
        header = ck.check_safetensors_header(file)
        with file.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in found:
                raise CheckpointError(f"{file}: tensor '{name}' is also stored in {found[name].file.name}")
            found[name] = Stored(file, 8 + n + info["data_offsets"][0], ck.DTYPES[info["dtype"]], tuple(info["shape"]))
    return found


def plan(cfg: ModelConfig, stored: dict[str, Stored], shapes: dict[str, tuple[int, ...]], src: Path) -> dict[str, Slot]:
    """Match the stored tensors with the model's slots: every slot filled, every tensor placed, shapes equal.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped tensor (named).
        ConfigError: an untied model without ``lm_head.weight`` (``tie_word_embeddings`` is wrong).
    """
    want = slots(cfg)
    missing = sorted(set(want) - set(stored))
    if missing == ["lm_head.weight"]:
        raise ConfigError(
            f"{src / 'config.json'}: tie_word_embeddings=false, but the weights hold no lm_head.weight "
            f"(a tied model?); refusing to guess"
        )
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{src}: tensors missing from the weights: {', '.join(missing[:5])}{more}")
    for name, info in stored.items():
        if name in want:
            expect = hf_shape(want[name], shapes[want[name].name])
            if info.shape != expect:
                raise CheckpointError(
                    f"{info.file}: tensor '{name}' has shape {list(info.shape)}, expected {list(expect)}"
                )
        elif not (name == "lm_head.weight" or name.endswith(IGNORED_SUFFIXES)):
            raise CheckpointError(f"{info.file}: tensor '{name}' has no place in a {cfg.name} model; refusing it")
    return want


def _view(mm: mmap.mmap, info: Stored) -> torch.Tensor:
    """The tensor's bytes in the mapping, as a tensor (no copy)."""
    count = 1
    for d in info.shape:
        count *= d
    if count == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    with warnings.catch_warnings():  # a read-only mapping: the tensor is only read from
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=info.dtype, count=count, offset=info.offset).reshape(info.shape)


def _release(mm: mmap.mmap, info: Stored) -> None:
    """Drop the tensor's pages from this process (they stay in the page cache, not in its memory)."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    nbytes = info.dtype.itemsize * int(torch.Size(info.shape).numel())
    start = info.offset - info.offset % mmap.PAGESIZE
    if nbytes:
        mm.madvise(mmap.MADV_DONTNEED, start, info.offset + nbytes - start)


def fill(params: dict[str, torch.Tensor], want: dict[str, Slot], stored: dict[str, Stored]) -> None:
    """Copy every planned tensor into its rows of ``params``, one memory-mapped tensor at a time."""
    by_file: dict[Path, list[str]] = {}
    for name in want:
        by_file.setdefault(stored[name].file, []).append(name)
    for file, names in by_file.items():
        with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name in sorted(names, key=lambda n: stored[n].offset):
                slot, info = want[name], stored[name]
                src = _view(mm, info)
                with torch.no_grad():
                    params[slot.name][slot.start : slot.stop].copy_(to_qtrain(src, slot))
                del src  # the mapping closes only once no tensor views it
                _release(mm, info)


def _check_tied_head(model: GPT, stored: dict[str, Stored], src: Path) -> None:
    """A tied model whose files also hold lm_head.weight: it must equal the embedding."""
    info = stored.get("lm_head.weight")
    if info is None or not model.cfg.tie_embeddings:
        return
    with info.file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        head = _view(mm, info)
        same = torch.equal(head.to(model.tok_emb.weight.device, torch.float32), model.tok_emb.weight.detach())
        del head
    if not same:
        raise ConfigError(
            f"{src / 'config.json'}: tie_word_embeddings=true, but lm_head.weight differs from "
            f"model.embed_tokens.weight; refusing to drop it"
        )


def build_empty(cfg: ModelConfig, device: torch.device) -> GPT:
    """The model allocated once on ``device`` (uninitialised: every weight is overwritten by the import)."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty makes a new tensor per module: share the embedding again
        model.lm_head.weight = model.tok_emb.weight
    return model


def provenance(src: Path, hf: dict[str, Any], shards: list[Path], hash_files: bool = True) -> dict[str, Any]:
    """``imported_from``: the directory, architecture, special token ids and every file's size and SHA-256
    (``hash_files=False``: sizes only, ``sha256`` null: a run that writes no checkpoint need not read them twice)."""
    files = {}
    for p in [*(src / n for n in SIDE_FILES), *shards]:
        if p.is_file() and p.name not in files:
            files[p.name] = {"bytes": p.stat().st_size, "sha256": ck.sha256_of(p) if hash_files else None}
    special = {k: hf.get(k) for k in SPECIAL_KEYS if isinstance(hf.get(k), (int, list))}
    gen = src / "generation_config.json"
    if gen.is_file():
        try:
            extra = json.loads(gen.read_text(encoding="utf-8"))
            special.update({k: extra[k] for k in SPECIAL_KEYS if isinstance(extra.get(k), (int, list))})
        except (ValueError, UnicodeDecodeError, AttributeError):
            pass  # informational only; the model does not depend on it
    return {
        "path": str(src.resolve()),
        "model_type": hf.get("model_type"),
        "architectures": hf.get("architectures"),
        "dtype": str(hf.get("torch_dtype", hf.get("dtype"))),
        "special_tokens": special,
        "files": files,
    }


def import_config(src: Path, block_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (``block_size``: a shorter context than it was trained for).

    Raises:
        ConfigError: see :func:`qtrain.hf.config.model_config_from_hf`; a block_size beyond the model's.
    """
    cfg = model_config_from_hf(read_config(src), str(src / "config.json"), block_size)
    if block_size is not None and block_size != cfg.block_size:
        if not 0 < block_size <= cfg.block_size:
            raise ConfigError(
                f"model.block_size={block_size}: {src} was trained for at most {cfg.block_size} positions "
                f"(max_position_embeddings); choose a value in [1, {cfg.block_size}]"
            )
        cfg = replace(cfg, block_size=block_size)
    return cfg


def _tokenizer_section(src: Path, cfg: ModelConfig) -> dict[str, Any] | None:
    """The manifest's `tokenizer` section of the directory's tokenizer.json (None without one).

    Raises:
        ConfigError: the tokenizer has more ids than the model has embeddings (a padded vocabulary is fine).
    """
    if not (src / "tokenizer.json").is_file():
        return None
    tok = load_tokenizer_dir(src)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"{src / 'tokenizer.json'}: {tok.vocab_size} token ids, but config.json vocab_size={cfg.vocab_size}: "
            f"the model has no embedding for the ids above; refusing the pair"
        )
    return tok.manifest_section()


def load_hf(
    path: str | Path, device: torch.device, block_size: int | None = None, hash_files: bool = True
) -> tuple[ck.Checkpoint, GPT]:
    """A Hugging Face model directory as (a checkpoint-like source, the qtrain model on ``device``).

    The source's ``manifest`` holds ``step`` 0, ``model``, ``quant: None``, the ``tokenizer``
    section (when the directory has a ``tokenizer.json``) and ``imported_from`` (provenance);
    its ``path`` is the directory. Nothing is held besides the model's parameters.
    ``hash_files=False`` leaves the files' SHA-256 out of ``imported_from`` (for runs that write no checkpoint).

    Raises:
        ConfigError: not a model directory, or a model qtrain cannot represent exactly (key and value named).
        CheckpointError: damaged, missing, unexpected or mis-shaped weights.
    """
    src = Path(str(path)).expanduser()
    if not src.is_dir():
        raise ConfigError(f"init_from: hf:{src} is not a directory")
    hf = read_config(src)
    cfg = import_config(src, block_size)
    tokenizer = _tokenizer_section(src, cfg)
    shards = shard_files(src)
    stored = read_headers(shards)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in GPT(cfg).state_dict().items()}
    want = plan(cfg, stored, shapes, src)
    model = build_empty(cfg, device)
    fill(dict(model.named_parameters()), want, stored)
    _check_tied_head(model, stored, src)
    manifest: dict[str, Any] = {"step": 0, "model": asdict(cfg), "quant": None, "mode": "import"}
    manifest["imported_from"] = provenance(src, hf, shards, hash_files)
    if tokenizer is not None:
        manifest["tokenizer"] = tokenizer
    return ck.Checkpoint(path=src, manifest=manifest, model_state={}, trainer_tensors={}, trainer_meta={}), model.eval()
