"""qtrain: train GPT-style byte-level language models and quantize them (PTQ, QAT, int8/int4)."""

__version__ = "0.1.0"
