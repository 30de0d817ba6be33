"""The direction of imports inside qtrain (README, Development: layout).

Every module of the package belongs to one layer; a module may import from its own layer
or a lower one, never a higher one (lazy imports inside functions count too). A module
that no layer names fails the test, so a new file has to be placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qtrain"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "utilities",
        (
            "qtrain",
            "qtrain.errors",
            "qtrain.fsinfo",
            "qtrain.console",
            "qtrain.sysmem",
            "qtrain.jobdir",
            "qtrain.rundir",
            "qtrain.runlock",
            "qtrain.runtime",
            "qtrain.progress",
            "qtrain.report_format",
            "qtrain.distributed",
        ),
    ),
    ("config", ("qtrain.config", "qtrain.config_rules")),
    ("data", ("qtrain.corpus", "qtrain.tokenizer", "qtrain.data")),
    ("model", ("qtrain.model",)),
    ("quant", ("qtrain.quant.*",)),
    ("train and evaluate", ("qtrain.train", "qtrain.evaluate", "qtrain.fastdecode")),
    ("checkpoint", ("qtrain.checkpoint.*",)),
    ("interchange", ("qtrain.hf.*", "qtrain.export.*")),
    ("modes", ("qtrain.modes.*",)),
    ("api", ("qtrain.api",)),
    ("cli", ("qtrain.cli", "qtrain.cli_flags", "qtrain.precheck", "qtrain.explain", "qtrain.__main__")),
]
"""Bottom to top. ``pkg.*`` names a package and everything in it."""


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a qtrain module (None: not placed)."""
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".*") and (module + ".").startswith(name[:-1])):
                return i
    return None


def module_name(path: Path) -> str:
    """Dotted name of a file under :data:`PACKAGE`."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """The qtrain modules a file imports (``from qtrain.x import y`` counts y when it is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qtrain")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "qtrain":
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def back_edges(package: Path = PACKAGE) -> list[str]:
    """Every import from a lower layer to a higher one, and every module no layer names."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        mod = module_name(path)
        here = layer_of(mod)
        if here is None:
            problems.append(f"{mod}: in no layer (add it to LAYERS in {Path(__file__).name})")
            continue
        for target in sorted(imported_modules(path)):
            there = layer_of(target)
            if there is not None and there > here:
                problems.append(f"{mod} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    return problems


def test_imports_go_down_the_layers() -> None:
    assert back_edges() == []


def test_a_back_edge_is_caught(tmp_path: Path) -> None:
    """A planted import from the model up to the modes layer is reported."""
    pkg = tmp_path / "qtrain"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("from qtrain.checkpoint import load\n\ndef f():\n    import qtrain.cli\n")
    global PACKAGE
    saved = PACKAGE
    PACKAGE = pkg
    try:
        found = back_edges(pkg)
    finally:
        PACKAGE = saved
    assert "qtrain.model (model) imports qtrain.checkpoint (checkpoint)" in found
    assert "qtrain.model (model) imports qtrain.cli (cli)" in found


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("qtrain.quant.fake", "quant"),
        ("qtrain.checkpoint", "checkpoint"),
        ("qtrain", "utilities"),
        ("qtrain.cli", "cli"),
    ],
)
def test_layer_of(module: str, layer: str) -> None:
    index = layer_of(module)
    assert index is not None and LAYERS[index][0] == layer
