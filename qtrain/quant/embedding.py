"""The quantized embeddings' shared part: a lookup into a ``[V, d]`` table module, maybe the head's.

The table is a linear-like module over the ``[V, d]`` matrix (N = V rows, K = d), so rows are
quantized exactly like a linear weight. With tied embeddings the table *is* the model's
``lm_head`` module, held by reference and not registered, so its parameters and buffers exist
once in the state dict, under ``lm_head``; an untied table is this module's child ``table``.
"""

from __future__ import annotations

from torch import nn


class TableEmbedding(nn.Module):
    """Base of :class:`~qtrain.quant.fake.FakeQuantEmbedding` and :class:`~qtrain.quant.packed.QuantEmbedding`.

    Args:
        table: the table module.
        tied_to: name of the module owning ``table`` when tied (e.g. ``"lm_head"``), else None.
        name: this module's name (weight hooks, errors).
    """

    def __init__(self, table: nn.Module, tied_to: str | None = None, name: str = "tok_emb") -> None:
        super().__init__()
        self.tied_to = tied_to
        self.layer_name = name
        if tied_to is None:
            self.table = table
        else:
            self.__dict__["_tied_table"] = table

    def table_module(self) -> nn.Module:
        """The table (the tied head's module when tied)."""
        t = self.__dict__.get("_tied_table")
        return self._modules["table"] if t is None else t  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to}"
