"""Hugging Face Llama-family models in and out: config mapping, weight layout, the importer.

- `config`: ``config.json`` <-> ModelConfig, refusing what qtrain cannot run exactly (exit 2)
- `weights`: tensor names, fused rows and the rotary permutation between the two layouts
- `load`: :func:`load_hf`, a memory-mapped, tensor-by-tensor import into a model allocated once

The exporter is :mod:`qtrain.export.hf`. Nothing here imports ``transformers``.
"""

from qtrain.hf.load import load_hf  # noqa: F401
