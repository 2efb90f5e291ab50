"""``slabcast up``'s config: read a TOML file, check all of it, size the pools, before anything starts.

Unknown keys (with the closest known one), types, values, the streams tasks name, options against the task
callable's signature, and whether each task's chunks fit its stream's pool; the pool is sized from the largest
chunk when the config does not size it, and ``/dev/shm`` is checked for room.  cli/up.py runs what it returns.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import json
import math
import os
import re
import sys
import tomllib
import traceback
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..client._pubargs import DEFAULT_CHUNK_LIMIT, DEFAULT_NSLABS, DEFAULT_SLAB_BYTES, history_nslabs, pool_layout
from ..core.geometry import RING_BYTES, Geometry
from ..wire.address import normalize

__all__ = ["Config", "ConfigError", "Task", "load_config", "resolve"]

_TOP_KEYS = {"broker", "sources", "tasks"}
_BROKER_KEYS = {"address", "lease_timeout", "shm_mode", "log_level"}
_TASK_KEYS = {"name", "call", "stream", "size", "seconds", "clip", "sampler", "policy", "workers", "options",
              "max_inflight", "partial_tail", "restart_on_end", "external", "max_failures", "stop_timeout"}  # fmt: skip
_FINITE = {"stdin", "file", "replay"}  # sources that end, and so wait for their tasks before they start
_DEFAULT_SLAB, _DEFAULT_NSLABS = DEFAULT_SLAB_BYTES, DEFAULT_NSLABS
_DRAIN = 10.0  # seconds a task gets to finish its stream when up stops (its stop_timeout by default)
_SHM = "/dev/shm"


class ConfigError(ValueError):
    """A config that cannot run: the message names the file, the table, the key and what was expected."""


@dataclass
class Task:
    """One task of the config: a callable applied to every chunk of a stream, in ``workers`` processes."""

    name: str
    call: str
    stream: str
    size: int | None = None
    seconds: float | None = None
    clip: bool = False
    sampler: float | None = None
    policy: str = "block"
    workers: int = 1
    max_inflight: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    partial_tail: bool = False
    restart_on_end: bool = False
    external: bool = False
    max_failures: int = 5  # failures in a row before the task is marked failed and not restarted (0: never)
    stop_timeout: float = _DRAIN  # seconds its workers get to finish their stream when up stops


@dataclass
class Config:
    """A checked config file."""

    address: str
    broker_args: list[str]
    tasks: list[Task]
    lease_timeout: float = 30.0
    shm_bytes: int = 0  # /dev/shm the sources' pools take
    sources: list[dict[str, Any]] = field(default_factory=list)  # {"kind", "options"}: what the broker gets
    directory: str = ""  # the config's directory: first on the tasks' import path
    finite: set[str] = field(default_factory=set)  # streams whose source ends (a file read once, a pipe)


def _unknown(where: str, got: dict[str, Any], known: set[str]) -> None:
    for key in sorted(set(got) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _number(where: str, key: str, value: Any, *, integer: bool = False, low: float = 0.0, low_ok: bool = False,
            high: float = math.inf) -> Any:  # fmt: skip
    """Check a number: its type (a string is not a number), finite, and in range."""
    want = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        got = f"{value!r} (a {type(value).__name__})"
        raise ConfigError(f"{where}: {key!r} must be {want}, got {got}")
    if not math.isfinite(value) or value < low or (value == low and not low_ok) or value > high:
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        limit = f" and <= {high:g}" if high < math.inf else ""
        finite = want if integer else "a finite number"  # (inf is > 0, and no length of time)
        raise ConfigError(f"{where}: {key!r} must be {finite} {bound}{limit}, got {value!r}")
    return value


def _bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    return str(value)


def _kinds(annotation: Any) -> set[str]:
    """The names of the types an annotation allows (``int | None`` -> ``{"int", "None"}``), whether it is written
    as types or, under ``from __future__ import annotations``, as a string; empty for none."""
    if annotation is inspect.Parameter.empty:
        return set()
    if isinstance(annotation, str):
        inner = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]", annotation.strip())
        if inner:
            return _kinds(inner[1]) | {"None"}
        return {k.strip() for k in annotation.split("|")}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if annotation is None or annotation is type(None):
        return {"None"}
    return {getattr(annotation, "__name__", str(annotation))}


def _literals(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal[...]`` annotation allows (with None for ``Literal[...] | None``), as a type or, under
    ``from __future__ import annotations``, as a string; None when it is no literal."""
    if isinstance(annotation, str):
        text = re.sub(r"\s*\|\s*None$", "", annotation.strip())
        inner = re.fullmatch(r"(?:typing\.)?Literal\[(.+)\]", text)
        if inner is None:
            return None
        try:
            values = ast.literal_eval(f"({inner[1]},)")
        except (ValueError, SyntaxError):
            return None
        return (*values, None) if text != annotation.strip() else tuple(values)
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [_literals(a) if a is not type(None) else (None,) for a in typing.get_args(annotation)]
        if all(p is not None for p in parts):
            return tuple(v for p in parts for v in p)  # type: ignore[union-attr]
    return None


def _check_options(where: str, what: str, fn: Any, options: dict[str, Any], skip: int) -> None:
    """Check keyword options against ``fn``'s signature (``skip`` leading positional parameters)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    every = list(sig.parameters.values())
    takes = [p for p in every if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(takes) < skip and not any(p.kind is p.VAR_POSITIONAL for p in every):
        # (else each worker fails on its first chunk, "takes 0 positional arguments but 1 was given", restarting)
        raise ConfigError(f"{where}: {what} must take the chunk as its first argument (def f(chunk, ...)), "
                          f"its signature is {sig}")  # fmt: skip
    params = every[skip:]
    alone = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if alone:  # (options are passed by name: each worker would fail on its first chunk)
        raise ConfigError(f"{where}: {what} takes {', '.join(map(repr, alone))} positionally only (before a '/' "
                          f"in its signature {sig}): options are passed by name")  # fmt: skip
    known = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    anything = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in options:  # first: an unknown key is likely the misspelling of a missing one
        if key not in known and not anything:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(sorted(known)) or 'none'}"
            raise ConfigError(f"{where}: {what} has no option {key!r}{hint}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in options
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    if missing:  # caught here, not by a worker restarting forever on the same TypeError
        given = ", ".join(f"{k} = ..." for k in missing)
        raise ConfigError(f"{where}: {what} needs option {', '.join(map(repr, missing))}: options = {{ {given} }}")
    for key, value in options.items():
        if key not in known:
            continue  # (taken by **kwargs)
        # Annotations say what a value must be (float, int | None, str; as written or as strings under
        # `from __future__ import annotations`): a string for a number is refused here, naming the key, not by
        # the callable with a message that names none.
        choices = _literals(known[key].annotation)
        if choices is not None:  # (clock = "lsll" for xdf_file's Literal["wall", "lsl"] failed in every worker)
            if not any(type(value) is type(c) and value == c for c in choices):  # (True is not Literal[1])
                close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: {what}'s option {key!r} must be one of "
                                  f"{', '.join(map(repr, choices))}, got {value!r}{hint}")  # fmt: skip
            continue
        kinds = _kinds(known[key].annotation)
        plain = kinds - {"None"}  # (checked only where every kind it allows is one of these: str, bool, numbers)
        if value is None and "None" in kinds:
            continue
        if plain == {"str"} and not isinstance(value, str):
            raise ConfigError(f"{where}: {what}'s option {key!r} must be a string, got {value!r} "
                              f"(a {type(value).__name__})")  # fmt: skip
        if plain == {"bool"} and not isinstance(value, bool):
            raise ConfigError(f"{where}: {what}'s option {key!r} must be true or false, got {value!r}")
        if plain and plain <= {"int", "float"}:
            if isinstance(value, bool) or not isinstance(value, int | float):
                want = "a number" if "float" in plain else "an integer"
                raise ConfigError(f"{where}: {what}'s option {key!r} must be {want}, got {value!r} "
                                  f"(a {type(value).__name__})")  # fmt: skip
            if plain == {"int"} and isinstance(value, float):
                raise ConfigError(f"{where}: {what}'s option {key!r} must be an integer, got {value!r}")
        # No annotation: the default's kind says what is wanted ({ rate = "48000" } against rate=48000 failed in
        # each worker, "unsupported operand type(s) for /: 'int' and 'str'").
        default = known[key].default
        if known[key].annotation is inspect.Parameter.empty and default not in (inspect.Parameter.empty, None) \
                and value is not None:  # fmt: skip
            if isinstance(default, bool):
                ok, want = isinstance(value, bool), "true or false"
            elif isinstance(default, int | float):
                ok, want = isinstance(value, int | float) and not isinstance(value, bool), "a number"
            elif isinstance(default, str):
                ok, want = isinstance(value, str), "a string"
            else:
                ok, want = True, ""
            if not ok:
                raise ConfigError(f"{where}: {what}'s option {key!r} must be {want}, as its default {default!r} "
                                  f"is, got {value!r} (a {type(value).__name__})")  # fmt: skip


def _source(path: str, i: int, raw: Any) -> tuple[str, dict[str, Any], dict[str, Any], Any]:
    """Check one [[sources]] table; return (kind, source options, pool options, source object), typed by the
    source's signature (the schema the broker checks them against again, never re-parsed from text)."""
    from ..sources import SourceOptionError, source_class, source_kinds, source_options

    where = f"{path}: [[sources]] #{i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table, got {raw!r}")
    kind = _choice(where, "kind", raw.get("kind"), source_kinds())
    given = {k: v for k, v in raw.items() if k != "kind"}
    _beside_config(path, given, ("path",))
    try:
        opts, pool = source_options(kind, given)
    except SourceOptionError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for key, value in pool.items():
        _number(where, key, value, integer=key not in ("write_timeout", "history"))
    try:
        source = source_class(kind)(**opts)
    except (ImportError, TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return kind, opts, pool, source


def _task(path: str, i: int, raw: Any) -> Task:
    where = f"{path}: [[tasks]] #{i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table, got {raw!r}")
    where += f" ({raw.get('name', '?')})"
    _unknown(where, raw, _TASK_KEYS)
    for key in ("name", "call", "stream"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{where}: {key!r} must be a string, got {raw.get(key)!r}")
    if ":" not in raw["call"]:
        raise ConfigError(f"{where}: 'call' must be 'module:function', got {raw['call']!r}")
    if ("size" in raw) == ("seconds" in raw):
        raise ConfigError(f"{where}: give exactly one of 'size' (samples) and 'seconds'")
    task = Task(**raw)
    if task.size is not None:
        _number(where, "size", task.size, integer=True)
    if task.seconds is not None:
        _number(where, "seconds", task.seconds)
    if task.sampler is not None:
        _number(where, "sampler", task.sampler, low_ok=True, high=1e9)
    _number(where, "workers", task.workers, integer=True, low=1, low_ok=True)
    _number(where, "max_inflight", task.max_inflight, integer=True, low=1, low_ok=True, high=1024)
    _choice(where, "policy", task.policy, ("block", "drop"))
    for key in ("clip", "partial_tail", "restart_on_end", "external"):
        _bool(where, key, getattr(task, key))
    if not isinstance(task.options, dict):
        raise ConfigError(f"{where}: 'options' must be a table, got {task.options!r}")
    _beside_config(path, task.options, ("out", "path"))
    _number(where, "max_failures", task.max_failures, integer=True, low_ok=True)
    _number(where, "stop_timeout", task.stop_timeout, high=86400.0)
    try:
        fn = resolve(task.call)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot import {task.call!r}: {exc}") from exc
    except Exception as exc:  # the module raised at import: one line, where it did, not a traceback
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        raise ConfigError(f"{where}: cannot import {task.call!r}: {type(exc).__name__}: {exc}{at}") from None
    if not callable(fn):
        raise ConfigError(f"{where}: {task.call!r} is not callable")
    _check_options(where, task.call, fn, task.options, skip=1)
    return task


def _beside_config(config: str, options: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Relative file names in a config are read beside the config, as its task modules are (not from the
    working directory ``up`` was started in)."""
    base = os.path.dirname(os.path.abspath(config))
    for key in keys:
        value = options.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) and "://" not in value:
            options[key] = os.path.join(base, os.path.expanduser(value))  # (an absolute one stays as it is)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _size_pool(path: str, name: str, info: Any, pool: dict[str, Any], tasks: list[Task]) -> int:
    """Check that every task's chunk fits the stream's pool, size the pool when the config does not;
    return the bytes of /dev/shm it takes."""
    where = f"{path}: source {name!r}"
    sample = info.dtype.itemsize * info.channels
    largest, who = 0, ""
    for t in tasks:
        if t.seconds is not None and not info.rate:
            raise ConfigError(f"{path}: task {t.name!r} asks for seconds = {t.seconds} but stream {name!r} has no rate")
        n = t.size if t.size is not None else max(1, round(float(t.seconds or 0) * info.rate))
        if n * sample > largest:
            largest, who = n * sample, t.name
    explicit = "max_chunk_bytes" in pool
    if explicit:
        if largest > pool["max_chunk_bytes"]:
            raise ConfigError(
                f"{where}: task {who!r} asks for chunks of {largest} bytes, larger than its max_chunk_bytes "
                f"({pool['max_chunk_bytes']}); raise it (and slab_bytes), or leave the pool out to have it sized"
            )
    elif largest > DEFAULT_CHUNK_LIMIT:  # past what a default pool grows to: make the carried part that long
        pool["max_chunk_bytes"] = _round_up(largest, sample)
        explicit = True
        room = pool.get("slab_bytes", _DEFAULT_SLAB) // 2  # (for frames)
        pool["slab_bytes"] = _round_up(pool["max_chunk_bytes"] + room, 4096)
        if pool["slab_bytes"] > 1 << 30:  # (said as the task's, not as a slab_bytes nobody wrote)
            most = (1 << 30) - room
            raise ConfigError(f"{where}: task {who!r} asks for chunks of {largest} bytes; a chunk must fit in one "
                              f"slab (up to 2**30 bytes, with room for frames): at most {most} bytes here "
                              f"({most // sample} samples)")  # fmt: skip
    try:
        slab, limit = pool_layout(pool.get("slab_bytes"), pool.get("max_chunk_bytes"))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if explicit:
        pool["slab_bytes"] = slab  # the publisher's choice, written out for the broker's command line
        if limit >= slab:
            raise ConfigError(f"{where}: max_chunk_bytes ({limit}) must be smaller than slab_bytes ({slab}): a slab "
                              "holds the carried chunk and at least one frame")  # fmt: skip
    # Room for frames in each slab, and the carried part the tasks' chunks need (memory is committed for
    # as much as the frames' room at first, then grown as subscribers ask: see Publisher's max_chunk_bytes).
    frames = slab - limit
    carried = max(largest, min(limit, frames))
    history = pool.pop("history", None)
    if history is not None and "nslabs" not in pool:
        # Enough slabs to hold `history` seconds behind the one being written (plus those granted ahead),
        # so block tasks may fall that far behind before the source waits.
        if not info.rate:
            raise ConfigError(f"{where}: 'history' (seconds) needs a stream with a rate")
        pool["nslabs"] = history_nslabs(history, info.rate, sample, frames)
    nslabs = int(pool.setdefault("nslabs", _DEFAULT_NSLABS))
    # What the segment commits: its header, each slab's frames and carried room, their times if kept, and the ring
    # describing the frames (4 MiB: an operator's up said a config fit that did not by 4 MiB a stream).
    geometry = Geometry(nslabs, slab, sample, limit, bool(getattr(info, "timestamps", False)))
    per_slab = frames + _round_up(carried, 4096)  # (the carried room is committed in whole pages)
    times = 8 * ((frames + carried) // sample) * nslabs if geometry.timestamps else 0
    return geometry.header_bytes + per_slab * nslabs + times + RING_BYTES


def _check_shm(path: str, needed: int, shm_dir: str = _SHM) -> None:
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if needed > free:
        mib = -(-needed // (1 << 20))
        raise ConfigError(
            f"{path}: the sources' pools need {mib} MiB of {shm_dir}, which has {free / (1 << 20):.0f} MiB free. "
            f"Free some, give it more (Docker: docker run --shm-size={2 * mib}m ...; Kubernetes: an emptyDir "
            f"with medium: Memory at /dev/shm), or ask for fewer or smaller slabs (nslabs, slab_bytes)"
        )


def _broker(path: str, broker: dict[str, Any], args: list[str]) -> float:
    """Check the [broker] table; its options go into ``args`` (the broker's command line).  Returns its
    lease timeout."""
    _unknown(f"{path}: [broker]", broker, _BROKER_KEYS)
    lease_timeout = float(_number(f"{path}: [broker]", "lease_timeout", broker.get("lease_timeout", 30.0)))
    args += ["--lease-timeout", str(lease_timeout)]
    if "shm_mode" in broker:
        mode = str(broker["shm_mode"])
        if mode not in ("600", "660", "640", "644", "666"):
            raise ConfigError(f"{path}: [broker] 'shm_mode' must be an octal mode like \"660\", got {mode!r}")
        args += ["--shm-mode", mode]
    if "log_level" in broker:
        args += ["--log-level", _choice(f"{path}: [broker]", "log_level", str(broker["log_level"]).upper(),
                                        ("DEBUG", "INFO", "WARNING", "ERROR"))]  # fmt: skip
    return lease_timeout


def load_config(path: str, shm_dir: str = _SHM) -> Config:
    """Read and check a TOML config before anything starts.

    Raises
    ------
    ConfigError
        Naming the file, the table, the key and what was expected: unknown keys,
        wrong types or values, a task's stream that no source provides, options a
        callable does not take, chunks larger than the pool, a ``/dev/shm`` too small.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    errors: list[ConfigError] = []  # every table's first problem, told together (one run finds them all)

    def checked(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ConfigError as exc:
            errors.append(exc)
            return None

    checked(_unknown, path, raw, _TOP_KEYS)
    broker = raw.get("broker", {})
    if not isinstance(broker, dict):
        raise ConfigError(f"{path}: [broker] must be a table")
    args: list[str] = []
    lease_timeout = checked(_broker, path, broker, args) or 30.0
    # Task modules beside the config import as `python script.py` imports those beside a script.
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    raw_tasks = raw.get("tasks", [])
    parsed = [(i, checked(_task, path, i, t)) for i, t in enumerate(raw_tasks)]
    tasks = [t for _, t in parsed if t is not None]
    seen: dict[str, int] = {}
    for i, t in parsed:
        if t is None:
            continue
        if t.name in seen:  # (logs, status and restarts name a task: two of one name could not be told apart)
            errors.append(ConfigError(f"{path}: [[tasks]] #{seen[t.name] + 1} and #{i + 1} are both named "
                                      f"{t.name!r}: each task needs a name of its own"))  # fmt: skip
        seen.setdefault(t.name, i)
    if not raw_tasks:
        errors.append(ConfigError(f"{path}: no [[tasks]]: nothing to run (to host sources alone, for `slabcast "
                                  f"record` or other programs: slabcast broker --source kind:key=value,... , pool "
                                  f"options such as history=S included)"))  # fmt: skip
    sources = [s for s in (checked(_source, path, i, s) for i, s in enumerate(raw.get("sources", []))) if s]
    names = [(getattr(src, "info", None) and src.info.name) or opts.get("name") for _, opts, _, src in sources]
    if len(sources) == len(raw.get("sources", [])):  # (a source refused: its tasks' streams are not checked)
        for t in tasks:
            if t.stream not in names and not t.external:
                close = difflib.get_close_matches(t.stream, [n for n in names if n], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                errors.append(ConfigError(
                    f"{path}: task {t.name!r} reads stream {t.stream!r}, which no [[sources]] provides "
                    f"(sources: {', '.join(map(repr, names)) or 'none'}){hint}; set external = true for a stream "
                    f"another program publishes"
                ))  # fmt: skip
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problems:\n" + "\n".join(f"  {str(e).removeprefix(path + ': ')}"
                                                                        for e in errors))  # fmt: skip
    shm = 0
    specs: list[dict[str, Any]] = []
    for (kind, opts, pool, src), name in zip(sources, names, strict=True):
        mine = [t for t in tasks if t.stream == name]
        info = getattr(src, "info", None)
        if info is not None:
            shm += _size_pool(path, str(name), info, pool, mine)
        if kind in _FINITE and "wait_for" not in opts:
            opts["wait_for"] = sum(t.workers for t in mine)  # a short file must not end before its tasks start
        specs.append({"kind": kind, "options": {**opts, **pool}})
    _check_shm(path, shm, shm_dir)
    if specs:
        # The checked values go to the broker as they are (JSON keeps "1234" a string and false false).
        args += ["--sources-json", json.dumps(specs)]
    finite = {str(name) for (kind, opts, _, _), name in zip(sources, names, strict=True)
              if kind in _FINITE and not opts.get("loop")}  # fmt: skip
    return Config(normalize(broker.get("address")), args, tasks, lease_timeout, shm, specs, directory, finite)


def resolve(call: str) -> Any:
    """Import ``module:function``.

    Raises
    ------
    ImportError, AttributeError
        The latter naming the closest existing name.
    """
    module, _, name = call.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"{getattr(obj, '__name__', obj)!s} has no {part!r}{hint}")
        obj = getattr(obj, part)
    return obj
