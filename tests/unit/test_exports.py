"""The public namespace: __all__ sorted and complete, no private names, docstrings everywhere."""

from __future__ import annotations

import ast
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
    for info in pkgutil.iter_modules(slabcast.__path__):
        path = f"{slabcast.__path__[0]}/{info.name}.py"
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        assert doc and doc.strip(), f"slabcast.{info.name} has no module docstring"
