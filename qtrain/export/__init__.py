"""Writing a qtrain model in other tools' formats (`mode=export`).

- `hf`: a Hugging Face model directory (`write_hf`), full precision or dequantized
- `gguf`: a GGUF file for llama.cpp (`write_gguf`), from the packed codes and scales
- `compressed-tensors`: a vLLM / llm-compressor directory (`write_compressed`)

Each writer is imported by the mode only when asked for, so this package's `__init__`
imports nothing.
"""
