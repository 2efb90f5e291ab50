"""One schema for a hosted source's options, read from its class's signature: TOML, JSON and ``kind:k=v`` text.

``slabcast up`` checks a config's sources with :func:`source_options` and hands the
broker the typed values as JSON (``--sources-json``); the broker checks them again
with the same function.  ``--source kind:k=v`` text is parsed by the same
signature, never guessed: a string option stays a string (a stream named
``"1234"``), ``loop=false`` is false.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
import types
import typing
from typing import Any

from .kinds import _KINDS

__all__ = ["SourceOptionError", "build_source", "parse_source", "source_options", "sources_from_json"]

_POOL_TYPES: dict[str, type] = {"slab_bytes": int, "nslabs": int, "max_chunk_bytes": int, "write_timeout": float,
                                "history": float}
_POOL_KEYS = set(_POOL_TYPES)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class SourceOptionError(ValueError):
    """A source option the source's signature does not take, or a value of the wrong type."""


def _kinds_of(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: ``float | None`` -> {float, None}; ``Any`` -> {Any}."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return {Any}
    if annotation is type(None) or annotation is None:
        return {None}
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds_of(a) for a in args))
    origin = typing.get_origin(annotation)
    return {origin if origin is not None else annotation}


def _signature(cls: Any) -> dict[str, tuple[set[Any], bool]]:
    """A source class's options: name -> (the types it admits, whether it is required)."""
    hints = typing.get_type_hints(cls.__init__)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: (_kinds_of(hints.get(p.name, Any)), p.default is p.empty) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # fmt: skip


def _want(kinds: set[Any]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             None: "none"}  # fmt: skip
    if float in kinds:
        kinds = kinds - {int}
    return " or ".join(names.get(k, str(k)) for k in (bool, int, float, str, list, None) if k in kinds)


def _typed(what: str, key: str, value: Any, kinds: set[Any], text: bool) -> Any:
    """``value`` as one of ``kinds`` (a value from a config or JSON: checked, never guessed; ``text``: a
    ``--source`` value, parsed as the signature says)."""
    if Any in kinds:
        return value
    if text:
        if value == "" and None in kinds:
            return None
        if list in kinds:
            return [_typed(what, key, v, {float}, True) for v in value.split("/")]
        if bool in kinds and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
        if str in kinds:
            return value
    elif isinstance(value, list | tuple):
        if list in kinds:
            return [_typed(what, key, v, {float}, False) for v in value]
    elif (None if value is None else type(value)) in kinds:  # exactly the type: a bool is no int
        return value
    elif type(value) is int and float in kinds:
        return float(value)
    got = f"{value!r} (a {type(value).__name__})" if text or isinstance(value, str) else repr(value)
    raise SourceOptionError(f"{what}'s option {key!r} must be {_want(kinds)}, got {got}")


def source_options(kind: str, options: dict[str, Any], *, text: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a source's options against its class's signature; return ``(source options, pool options)``, typed.

    One schema for every way a source is configured: ``slabcast up``'s TOML, the
    JSON ``up`` hands the broker (``--sources-json``), and ``--source kind:k=v``
    (``text=True``: each value is parsed as the option's annotation says, so a
    stream named ``"1234"`` stays a string and ``loop=false`` is false).

    Raises
    ------
    SourceOptionError
        For an unknown kind, an unknown option (naming the closest one), a value of
        the wrong type, or a required option left out.
    """
    cls = _KINDS.get(kind)
    if cls is None:
        close = difflib.get_close_matches(str(kind), _KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SourceOptionError(f"unknown source kind {kind!r}; known: {', '.join(sorted(_KINDS))}{hint}")
    what = f"{'an' if kind[:1] in 'aeiou' or kind == 'lsl' else 'a'} {kind} source"
    sig = _signature(cls)
    opts: dict[str, Any] = {}
    pool: dict[str, Any] = {}
    for key, value in options.items():
        if key in _POOL_TYPES:
            pool[key] = _typed(what, key, value, {_POOL_TYPES[key]}, text)
            if not 0 < pool[key] < math.inf:  # (sizes in range are the publisher's to check)
                raise SourceOptionError(f"{what}: pool option {key!r} must be a finite number > 0, got {value!r}")
            continue
        if key not in sig or key == "address":
            known = [k for k in sig if k != "address"]
            close = difflib.get_close_matches(key, [*known, *_POOL_TYPES], n=1)
            hint = (f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(sorted(known))}, and "
                    f"every source's pool options: {', '.join(_POOL_TYPES)}")  # fmt: skip
            raise SourceOptionError(f"{what} has no option {key!r}{hint}")
        opts[key] = _typed(what, key, value, sig[key][0], text)
    missing = [k for k, (_, required) in sig.items() if required and k not in opts]
    if missing:
        raise SourceOptionError(f"{what} needs {', '.join(map(repr, missing))}")
    return opts, pool


def build_source(kind: str, options: dict[str, Any], *, text: bool = False) -> Any:
    """Check the options (:func:`source_options`) and make the source; its pool options ride along.

    Raises
    ------
    ValueError
        For a bad option (:class:`SourceOptionError`) or a value the source refuses.
    OSError, ImportError
        A file the source cannot read; the source's extra is missing.
    """
    opts, pool = source_options(kind, options, text=text)
    source: Any = _KINDS[kind](**opts)  # a Source, given an attribute the protocol does not name
    source.publisher_options = pool  # the stream's pool: slab_bytes, nslabs, max_chunk_bytes, write_timeout
    return source


def parse_source(spec: str) -> Any:
    """Build a source from ``kind:key=value,key=value`` (e.g. ``synthetic:name=mic,rate=48000,channels=2``).

    Each value is read as the source's signature types that option (a name stays a
    string, ``loop=false`` is false, ``freqs=440/1000`` is a list); a comma starts a
    new option only when what follows is ``known_option=``, so a value may hold
    commas (``device=hw:1,0``, an LSL predicate).  ``slab_bytes``, ``nslabs`` and
    ``max_chunk_bytes`` size the stream's pool (the largest chunk a subscriber may
    ask for), ``write_timeout`` is how long a write waits for a slab before the
    source says it is held back (it then keeps waiting).

    Raises
    ------
    ValueError
        For an unknown kind or a malformed option.
    """
    kind, _, rest = spec.partition(":")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown source kind {kind!r} in {spec!r}; known: {', '.join(sorted(_KINDS))}")
    known = {*_signature(cls), *_POOL_TYPES}
    items: list[list[str]] = []
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        if eq and (key.strip() in known or re.fullmatch(r"[a-z_][a-z0-9_]*", key.strip())):
            items.append([key.strip(), value])  # an unknown lowercase key is said by the schema, with a hint
        elif items:
            items[-1][1] += "," + part  # a comma inside the previous value (hw:1,0; an XPath predicate)
        elif part.strip():
            raise ValueError(f"source option must be key=value, got {part!r} in {spec!r}")
    options = {key: value.strip() for key, value in items}
    try:
        return build_source(kind, options, text=True)
    except SourceOptionError as exc:
        raise SourceOptionError(f"{exc} (in {spec!r})") from None
    except ValueError as exc:  # (a value the source itself refused: a rate of 0)
        raise ValueError(f"{exc} (in {spec!r})") from None


def sources_from_json(text: str) -> list[Any]:
    """Build the sources ``slabcast up`` hands the broker: a JSON list of ``{"kind": ..., "options": {...}}``.

    The values arrive as the config checked them (JSON keeps strings, numbers,
    booleans and lists apart): they are checked again by the same schema, never guessed.
    """
    try:
        specs = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--sources-json must be a JSON list of sources, got {text[:80]!r}: {exc}") from None
    if not isinstance(specs, list) or not all(
        isinstance(s, dict) and isinstance(s.get("kind"), str) and isinstance(s.get("options", {}), dict)
        for s in specs
    ):
        raise ValueError(f'--sources-json must be a list of {{"kind": ..., "options": {{...}}}}, got {text[:80]!r}')
    return [build_source(s["kind"], s.get("options", {})) for s in specs]
