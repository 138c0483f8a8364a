"""The layering of docs/architecture.md, enforced: a module imports only from its own layer, lower layers and
the leaves, also inside functions."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ldmkit"
LAYERS = ["config", "data", "conditioning", "models", "diffusion", "transfer", "eval", "training", "demo", "api", "cli"]
# Modules every layer may use: checkpoint I/O, process groups, the autoencoder wrapper, the package root.
LEAVES = {"checkpoint", "distributed", "autoencoders", "__init__"}
# The package root is a leaf that anyone may import (for __version__); it reaches the API only lazily, on first use.
ROOT_MAY_IMPORT = {"api", "config"}


def layer(module: str) -> str:
    """'ldmkit.data.cache' -> 'data'; 'ldmkit' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every ldmkit import in source, at any depth."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("ldmkit"):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("ldmkit")]
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    me = layer(module)
    bad = []
    for line, name in imported_modules(source, module, is_package):
        other = layer(name)
        if me == "__init__" and other in ROOT_MAY_IMPORT:
            continue
        if me in LEAVES:  # a leaf stands below every layer but config
            if other not in LEAVES and other != "config":
                bad.append(f"{module}:{line} (leaf {me}) imports {name} ({other})")
            continue
        if other == me or other in LEAVES or me not in LAYERS:
            continue
        if other not in LAYERS or LAYERS.index(other) > LAYERS.index(me):
            bad.append(f"{module}:{line} ({me}) imports {name} ({other})")
    return bad


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        is_package = path.name == "__init__.py"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        bad += upward_imports(path.read_text(), module, is_package)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_layer_or_is_a_leaf():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and any(p.rglob("*.py"))}  # configs/ holds no code
    tops = {p.stem for p in SRC.iterdir() if p.suffix == ".py"} | packages
    tops.discard("__pycache__")
    assert tops <= set(LAYERS) | LEAVES, tops - set(LAYERS) - LEAVES


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("def f():\n    from ..training import loop\n", "ldmkit.eval.evaluate", 1),  # inside a function, relative
        ("import ldmkit.cli\n", "ldmkit.models.dit", 1),  # absolute
        ("from ..config import ConfigError\n", "ldmkit.data.cache", 0),  # downward
        ("from ..checkpoint import load_file\n", "ldmkit.models.dit", 0),  # a leaf
        ("from .layers import Mlp\n", "ldmkit.models.dit", 0),  # same layer
        ("from ..eval import report\n", "ldmkit.conditioning", 1),  # from a package's __init__
        ("from .training import loop\n", "ldmkit.checkpoint", 1),  # a leaf above its place
        ("from .config import ConfigError\n", "ldmkit.distributed", 0),  # a leaf may use config
    ],
)
def test_the_checker_itself(source, module, expected):
    assert len(upward_imports(source, module, is_package=module == "ldmkit.conditioning")) == expected
