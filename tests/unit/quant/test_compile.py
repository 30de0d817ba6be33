"""QAT under torch.compile: no graph break (fullgraph) and no recompile across training steps."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from qtrain.config import ModelConfig, QuantConfig
from qtrain.model import GPT
from qtrain.quant.recipe import QuantRecipe


@pytest.mark.parametrize(
    ("qcfg", "learn"),
    [(QuantConfig(scheme="int4", group_size=32), False), (QuantConfig(scheme="int8da_int4w"), True)],
    ids=["int4_g32_dynamic", "int8da_int4w_lsq"],
)
def test_qat_step_compiles_to_one_graph_and_never_recompiles(qcfg: QuantConfig, learn: bool) -> None:
    torch._dynamo.reset()
    model = GPT(ModelConfig(n_layer=1))
    model.init_weights(0)
    QuantRecipe.from_config(qcfg, learn).prepare(model)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # weights (and dynamic or learned scales) change every step: no guard may depend on them
        compiled(idx).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert counter.frame_count == 1
    torch._dynamo.reset()
