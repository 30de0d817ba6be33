"""The scheme table and the tables that must stay in step with it (config sits below quant)."""

from __future__ import annotations

from qtrain import config
from qtrain.quant import kernels, ptq
from qtrain.quant.schemes import SCHEMES


def test_config_vocabulary_matches_the_quant_tables() -> None:
    assert {name: row.width.grouped for name, row in SCHEMES.items()} == config.GROUPED_SCHEMES
    assert all(not row.width.asymmetric for row in SCHEMES.values() if not row.width.grouped)  # config's rule
    assert tuple(ptq.METHODS) == config.PTQ_METHODS
    assert config.KERNELS == kernels.KERNELS


def test_every_scheme_row_builds_its_spec_and_packed_module() -> None:
    for name, row in SCHEMES.items():
        spec = row.spec(config.QuantConfig(scheme=name))
        assert (spec.scheme, spec.bits) == (name, row.bits) and row.packed.bits == row.bits
        row.packed.empty(64, 16, spec, device="meta")
