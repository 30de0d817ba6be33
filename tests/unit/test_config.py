"""Every group combination composes and validates; bad values are all listed with their keys."""

from __future__ import annotations

import dataclasses
import itertools

from qtrain import config
from qtrain.config_rules import validate
from tests.conftest import compose_cfg

MODES = list(config.MODES)  # every mode the schema knows (export included)
MODELS = ["tiny", "small", "medium", "base", "1b"]
QUANTS = ["none", "int8", "int4", "int8da_int4w"]
DATA = ["pydocs", "text"]


def test_every_combination_composes_and_validates() -> None:
    # Each group option is composed through Hydra once; groups live in separate packages, so a
    # combination is exactly their union: build every one and validate it.
    extra = ["init_from=/some/ckpt", "out=/tmp/o", "runs=[a]", "data.path=/x.txt"]
    pieces = {
        "mode": {m: compose_cfg([f"mode={m}", *extra]).mode for m in MODES},
        "model": {m: compose_cfg([f"model={m}"]).model for m in MODELS},
        "quant": {q: compose_cfg([f"quant={q}"]).quant for q in QUANTS},
        "data": {d: compose_cfg([f"data={d}", *extra]).data for d in DATA},
    }
    base = compose_cfg(extra)
    for mode, model, quant, data in itertools.product(MODES, MODELS, QUANTS, DATA):
        cfg = dataclasses.replace(base, mode=pieces["mode"][mode], model=pieces["model"][model],
                                  quant=pieces["quant"][quant], data=pieces["data"][data])
        problems = validate(cfg)
        if quant == "none" and mode in ("ptq", "qat"):
            assert problems == [f"quant: mode={mode} needs a scheme: quant=int8|int4|int8da_int4w"]
        else:
            assert problems == [], (mode, model, quant, data, problems)
    assert pieces["quant"]["int8da_int4w"].activations == "int8"
    assert pieces["model"]["small"].n_embd == 384


def test_modes_list_every_shipped_mode_file() -> None:
    import importlib.resources

    shipped = {p.name[: -len(".yaml")] for p in importlib.resources.files("qtrain.conf").joinpath("mode").iterdir()
               if p.name.endswith(".yaml")}  # fmt: skip
    assert set(MODES) == shipped and "export" in MODES


def test_defaults_are_the_documented_main_job() -> None:
    cfg = compose_cfg([])
    assert (cfg.model.name, cfg.data.name) == ("tiny", "pydocs")
    assert cfg.model.n_layer == 2 and cfg.model.n_embd == 96 and cfg.model.n_head == 4 and cfg.model.block_size == 128


def test_all_problems_listed_at_once() -> None:
    cfg = compose_cfg(["train.lr=-1", "train.batch_size=0", "train.keep=1", "quant=int4", "quant.group_size=0"])
    keys = {p.split(":")[0] for p in validate(cfg)}
    assert {"train.lr", "train.batch_size", "train.keep", "quant.group_size"} <= keys


def test_group_size_must_divide_layer_inputs() -> None:
    cfg = compose_cfg(["quant=int4", "quant.group_size=128"])  # tiny: n_embd=96
    problems = validate(cfg)
    assert any("quant.group_size" in p and "96" in p for p in problems)


def test_text_data_needs_a_path() -> None:
    problems = validate(compose_cfg(["data=text"]))
    assert any(p.startswith("data.path") for p in problems)


def test_model_sizes_match_their_names() -> None:
    import torch

    from qtrain.model import GPT
    from qtrain.modes.context import n_params_of

    expected = {"tiny": (0.2e6, 0.3e6), "small": (8e6, 12e6), "medium": (40e6, 60e6), "base": (100e6, 150e6),
                "1b": (0.9e9, 1.2e9)}
    for name, (lo, hi) in expected.items():
        cfg = compose_cfg([f"model={name}"])
        with torch.device("meta"):
            n = n_params_of(GPT(cfg.model))
        assert lo <= n <= hi, (name, n)
