"""The public namespace: __all__ sorted and complete, no private names, docstrings everywhere."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pkgutil

import slabcast


def test_all_is_sorted_and_complete():
    assert list(slabcast.__all__) == sorted(slabcast.__all__)
    public = {n for n in vars(slabcast) if not n.startswith("_") and not inspect.ismodule(getattr(slabcast, n))}
    assert public == set(slabcast.__all__)


def test_every_public_name_and_module_has_a_docstring():
    for name in slabcast.__all__:
        obj = getattr(slabcast, name)
        assert inspect.getdoc(obj), f"slabcast.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert inspect.getdoc(member), f"slabcast.{name}.{attr} has no docstring"
    for info in pkgutil.walk_packages(slabcast.__path__, "slabcast."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None
        if spec.origin.endswith(".py"):
            with open(spec.origin) as f:
                doc = ast.get_docstring(ast.parse(f.read()))
        else:  # a compiled module (core/_hot.c)
            doc = importlib.import_module(info.name).__doc__
        assert doc and doc.strip(), f"{info.name} has no module docstring"


def test_the_layers_are_subpackages_and_public_names_report_the_public_module():
    layers = {info.name for info in pkgutil.iter_modules(slabcast.__path__) if info.ispkg}
    assert layers == {"bridge", "broker", "cli", "client", "core", "emit", "sources", "view", "wire"}
    for name in slabcast.__all__:
        obj = getattr(slabcast, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "slabcast", f"slabcast.{name} reports {obj.__module__}"


def test_the_core_does_no_input_or_output():
    # The sans-io core: no sockets, no threads, no clock in the rechunker and the pool (models: h11, iceoryx2).
    for module in ("slabcast.core.rechunk", "slabcast.core.pool"):
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        with open(spec.origin) as f:
            tree = ast.parse(f.read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"zmq", "socket", "threading", "time", "os", "select", "asyncio"}, (module, imported)


def test_every_exception_slabcast_exports_is_in_the_hierarchy_of_docs_exceptions():
    # A newcomer: SamplesLostError, which the README promises, was missing from the documented hierarchy.
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "exceptions.md").read_text()
    tree = text.split("```")[1]
    exported = [name for name in slabcast.__all__
                if inspect.isclass(getattr(slabcast, name)) and issubclass(getattr(slabcast, name), BaseException)]
    assert len(exported) > 10
    assert [name for name in exported if f"\n{name}\n" not in tree and f"─ {name} " not in tree] == []
