"""A qtrain tokenizer as GGUF vocabulary metadata (``tokenizer.ggml.*``) that llama.cpp loads.

Every kind is written as a byte-level BPE vocabulary (``tokenizer.ggml.model = gpt2``), whose
token strings spell bytes with GPT-2's byte-to-unicode alphabet:

- ``bytes``: 256 tokens, id = byte value. llama.cpp's BPE tokenizer maps each input byte to its
  alphabet character and, with no merge that can apply, looks each one up: exactly qtrain's byte
  ids, for every input (SentencePiece-style ``<0xNN>`` tokens would not be: llama.cpp's SPM
  tokenizer rewrites every space as U+2581 before the byte fallback, three bytes instead of one).
  llama.cpp refuses a ``gpt2`` vocabulary without ``tokenizer.ggml.merges`` and the ``gguf``
  writer refuses an empty array, so one merge is written that can never apply: its halves are
  two-character strings, which no byte-level symbol is and no other merge builds.
- ``bpe`` / ``hf``: the byte-level BPE of ``tokenizer.hf_json()`` (vocab, merges, added tokens,
  padded with unused ``[PADn]`` tokens up to ``model.vocab_size`` as llama.cpp's converter does),
  with its pre-tokenizer named when llama.cpp knows the regex (GPT-2, Llama 3, Qwen2), BOS/EOS
  from ``tokenizer_config.json`` or the post-processor. SentencePiece-style BPE (Metaspace, byte
  fallback) and non-BPE models are refused, naming ``export.format=hf``.

No BOS is added unless the tokenizer says so (qtrain's own tokenizers add none).
"""

from __future__ import annotations

import json
from typing import Any

from qtrain.errors import ConfigError

DEAD_MERGE = "ĠĠ ĠĠ"
"""The byte vocabulary's one merge: it needs the symbol ``ĠĠ`` on both sides, which never exists."""
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
"""Split regexes of Hugging Face tokenizers -> llama.cpp's ``tokenizer.ggml.pre`` names."""


def byte_alphabet() -> list[str]:
    """GPT-2's printable character for each byte value 0..255 (``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _nodes(spec: Any) -> list[dict[str, Any]]:
    """A pre-tokenizer / decoder spec flattened (``Sequence`` expanded)."""
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in spec else "decoders"
        return [n for sub in spec.get(key, []) for n in _nodes(sub)]
    return [spec]


def pre_name(pre_tokenizer: Any) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` (None: not recognised)."""
    nodes = _nodes(pre_tokenizer)
    splits = [n.get("pattern", {}).get("Regex") for n in nodes if n.get("type") == "Split"]
    if not splits:
        gpt2 = any(n.get("type") == "ByteLevel" and n.get("use_regex", True) for n in nodes)
        return "gpt-2" if gpt2 else None
    return PRE_TOKENIZERS.get(str(splits[0])) if len(splits) == 1 else None


def _special_id(value: Any, ids: dict[str, int]) -> int | None:
    text = value.get("content") if isinstance(value, dict) else value
    return ids.get(text) if isinstance(text, str) else None


def _specials(data: dict[str, Any], config: dict[str, Any], ids: dict[str, int]) -> tuple[int | None, int | None, bool]:
    """(bos id, eos id, add bos) from tokenizer_config.json, else the post-processor's template."""
    bos, eos = _special_id(config.get("bos_token"), ids), _special_id(config.get("eos_token"), ids)
    template = (data.get("post_processor") or {}).get("single") or []
    first = template[0].get("SpecialToken", {}).get("id") if template and isinstance(template[0], dict) else None
    if bos is None and isinstance(first, str):
        bos = ids.get(first)
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos is not None and first is not None and ids.get(first) == bos
    return bos, eos, bool(add_bos) and bos is not None


def _hf_vocab(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Tokens, types, merges, pre and specials of a byte-level BPE tokenizer.json."""
    data = json.loads(tokenizer.hf_json())
    model = data.get("model") or {}
    nodes = _nodes(data.get("pre_tokenizer")) + _nodes(data.get("decoder"))
    byte_level = any(n.get("type") == "ByteLevel" for n in nodes)
    if model.get("type") != "BPE" or not byte_level:
        raise ConfigError(
            f"tokenizer ({tokenizer.kind}) is a {model.get('type')} model without byte-level pre-tokenization: "
            "the GGUF export writes byte-level BPE vocabularies only; "
            "the closest format that can hold it is export.format=hf"
        )
    ids: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for tok in data.get("added_tokens") or []:
        ids[tok["content"]] = tok["id"]
        if tok.get("special"):
            special.add(tok["id"])
    n = max(ids.values()) + 1
    if n > vocab_size:
        raise ConfigError(f"tokenizer has {n} tokens but model.vocab_size={vocab_size}; they must agree")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED until a token claims the id
    for text, i in ids.items():
        tokens[i] = text
        types[i] = 3 if i in special else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    config = json.loads(tokenizer.files().get("tokenizer_config.json", b"{}") or b"{}")
    bos, eos, add_bos = _specials(data, config, ids)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name(data.get("pre_tokenizer")),
            "bos": bos, "eos": eos, "add_bos": add_bos}  # fmt: skip


def vocab_of(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The GGUF vocabulary fields of a qtrain tokenizer (see the module docstring).

    Raises:
        ConfigError: a tokenizer GGUF cannot hold, or a size that disagrees with the model.
    """
    if tokenizer.kind != "bytes":
        return _hf_vocab(tokenizer, vocab_size)
    if vocab_size != 256:
        raise ConfigError(f"tokenizer is bytes (256 tokens) but model.vocab_size={vocab_size}; they must agree")
    return {"tokens": byte_alphabet(), "types": [1] * 256, "merges": [], "pre": "gpt-2",
            "bos": None, "eos": None, "add_bos": False}  # fmt: skip


def add_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> list[str]:
    """Write ``tokenizer.ggml.*`` keys; returns notes for the export report."""
    v = vocab_of(tokenizer, vocab_size)
    notes: list[str] = []
    writer.add_tokenizer_model("gpt2")
    if v["pre"] is None:
        notes.append("tokenizer: pre-tokenizer not one llama.cpp names; it will split text with its default regex")
    writer.add_tokenizer_pre(v["pre"] or "default")
    writer.add_token_list(v["tokens"])
    writer.add_token_types(v["types"])
    writer.add_token_merges(v["merges"] or [DEAD_MERGE])
    if v["bos"] is not None:
        writer.add_bos_token_id(v["bos"])
    if v["eos"] is not None:
        writer.add_eos_token_id(v["eos"])
    writer.add_add_bos_token(v["add_bos"])
    writer.add_add_eos_token(False)
    return notes
