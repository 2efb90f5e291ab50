"""Every import in src/slabcast points to the same or a lower layer (the table in slabcast/__init__.py's comment).

The table below mirrors that comment: a module belongs to the layer of its longest
prefix.  Imports are read with ``ast`` from every module, lazy ones inside
functions included, so a layer cannot be crossed by importing late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slabcast

SRC = Path(slabcast.__file__).parent

# Bottom to top; each layer uses only itself and those above it in this list.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("slabcast._exceptions", "slabcast._info", "slabcast._version")),
    ("core", ("slabcast.core",)),
    ("wire", ("slabcast.wire",)),
    ("client", ("slabcast.client", "slabcast.aio", "slabcast.examples")),
    ("broker", ("slabcast.broker",)),
    ("sources", ("slabcast.sources",)),
    ("emit", ("slabcast.emit",)),
    ("bridge", ("slabcast.bridge",)),
    ("view", ("slabcast.view",)),
    ("cli", ("slabcast.cli", "slabcast.testing", "slabcast.__main__")),
    ("package", ("slabcast",)),  # __init__.py: re-exports the public names of every layer
]


def _rank(module: str) -> int:
    best = (-1, -1)  # (prefix length, rank)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS here and to slabcast/__init__.py's comment"
    return best[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ["slabcast", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of a slabcast module in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "slabcast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "slabcast":
                continue
            names = [a.name for a in node.names]
            # `from .. import examples` imports a module; `from .. import __version__` a name of the package.
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            out += [(node.lineno, f"{target}.{n}", []) for n in submodules]
            if len(submodules) < len(names):
                out.append((node.lineno, target, [n for n in names if n not in submodules]))
    return out


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _violations() -> list[str]:
    found = []
    for module, path in MODULES.items():
        rank = _rank(module)
        for line, target, names in _imports(module, path):
            assert target in MODULES, f"{path}:{line}: imports {target}, which is no module of slabcast"
            where = f"{module}:{line} ({LAYERS[rank][0]})"
            if _rank(target) > rank:
                found.append(f"{where} imports {target} ({LAYERS[_rank(target)][0]}), a layer above it")
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private and _subpackage(target) != _subpackage(module):
                found.append(f"{where} imports private {', '.join(private)} of {target}, another subpackage")
    return found


def test_every_import_points_to_the_same_or_a_lower_layer():
    violations = _violations()
    assert not violations, "\n".join(violations)


def test_the_table_mirrors_the_layers_drawn_in_the_package_comment():
    # The comment in __init__.py names each subpackage in the order of LAYERS (bottom to top).
    text = (SRC / "__init__.py").read_text()
    comment = [line for line in text.splitlines() if line.startswith("#")]
    drawn = [line.split()[1].rstrip("/") for line in comment if len(line.split()) > 1 and line.split()[1].endswith("/")]
    subpackages = [p.removeprefix("slabcast.") for _, prefixes in LAYERS for p in prefixes
                   if p.count(".") == 1 and (SRC / p.removeprefix("slabcast.")).is_dir()]  # fmt: skip
    assert drawn == subpackages
    on_disk = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert set(subpackages) == on_disk


def test_the_check_sees_an_import_that_points_up(tmp_path):
    # The check itself: a client module importing the broker is caught, a lazy import too.
    MODULES["slabcast.client._probe"] = probe = tmp_path / "_probe.py"
    try:
        probe.write_text(
            "def f():\n    from ..broker.process import BrokerProcess\n    from ..wire.protocol import _private\n"
        )
        violations = [v for v in _violations() if "_probe" in v]
        assert len(violations) == 2, violations
        assert "imports slabcast.broker.process (broker), a layer above it" in violations[0]
    finally:
        del MODULES["slabcast.client._probe"]
