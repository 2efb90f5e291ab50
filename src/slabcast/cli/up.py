"""``slabcast up CONFIG``: check the whole config, then start the broker, its sources and supervised task workers.

Everything is checked before anything starts: unknown keys (with the closest
known one), types, values, the streams tasks name, options against the task
callable's signature, and whether each task's chunks fit the stream's pool; the
pool is sized from the largest chunk when the config does not size it, and
``/dev/shm`` is checked for room.  A worker whose stream ends exits 0 and is
done; when every worker is done (finite sources: a file, a pipe), ``up`` exits 0.
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import importlib
import inspect
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import BrokerGoneError
from ..broker.process import BrokerProcess
from ..client.publisher import DEFAULT_CHUNK_LIMIT, DEFAULT_NSLABS, DEFAULT_SLAB_BYTES, history_nslabs, pool_layout
from ..core.geometry import Geometry
from ..wire.address import normalize

__all__ = ["Config", "ConfigError", "Task", "load_config", "run_up"]

log = logging.getLogger("slabcast.up")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_HEALTHY = 60.0  # seconds a worker must live for its restart back-off to start again from the first step
_STATUS_EVERY = 1.0  # seconds between looks at the broker's status (evicted workers)
_TOP_KEYS = {"broker", "sources", "tasks"}
_BROKER_KEYS = {"address", "lease_timeout", "shm_mode", "log_level"}
_TASK_KEYS = {"name", "call", "stream", "size", "seconds", "clip", "sampler", "policy", "workers", "options",
              "max_inflight", "partial_tail", "restart_on_end", "external", "max_failures", "stop_timeout"}  # fmt: skip
_FINITE = {"stdin", "file", "replay"}  # sources that end, and so wait for their tasks before they start
_DEFAULT_SLAB, _DEFAULT_NSLABS = DEFAULT_SLAB_BYTES, DEFAULT_NSLABS
_DRAIN = 10.0  # seconds a task gets to finish its stream when up stops (its stop_timeout by default)
_STOPPED = 128 + signal.SIGTERM  # a worker's exit code when up stopped it (0: it finished its stream)
# How up stops a worker (between two chunks).  Not SIGTERM: SIGTERM and SIGINT sent to up's whole process group
# (timeout(1), `kill -- -PGID`, Ctrl-C) are up's, which stops its workers itself after they finish their
# streams; a worker drops them.  (The broker has a session of its own; a SIGTERM to every process of up's cgroup,
# systemd's KillMode=control-group, reaches it too, and ends its sources' streams only: --sigterm-ends-sources.)
_STOP_WORKER = signal.SIGUSR2
_WORKER_SIGNALS = {signal.SIGINT, signal.SIGTERM, _STOP_WORKER}  # blocked from a worker's start to its handlers


def _dropped(*_: Any) -> None:
    """A worker's handler of SIGINT and SIGTERM: up's signals (see task_main)."""
_ABSENT_LOOK = 0.5  # seconds between the drain's looks for streams that never appeared
_STOP_WAIT = 5.0  # seconds a stopped worker gets to finish the chunk in its callback before up names where it was
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
        raise ConfigError(f"{where}: {key!r} must be {want} {bound}{limit}, got {value!r}")
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
    missing = [p.name for p in params if p.default is p.empty and p.name not in options
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    if missing:  # caught here, not by a worker restarting forever on the same TypeError
        given = ", ".join(f"{k} = ..." for k in missing)
        raise ConfigError(f"{where}: {what} needs option {', '.join(map(repr, missing))}: options = {{ {given} }}")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(sorted(known)) or 'none'}"
            raise ConfigError(f"{where}: {what} has no option {key!r}{hint}")
        # Plain annotations say what a value must be ("float", "int | None"): a string for a number is
        # refused here, naming the key, not by the callable with a message that names none.
        kinds = {str(k).strip() for k in str(known[key].annotation).split("|")}
        number = "float" in kinds or "int" in kinds
        if number and (isinstance(value, bool) or not isinstance(value, int | float)) and not (
            value is None and "None" in kinds
        ):
            want = "a number" if "float" in kinds else "an integer"
            raise ConfigError(f"{where}: {what}'s option {key!r} must be {want}, got {value!r} "
                              f"(a {type(value).__name__})")  # fmt: skip
        if kinds == {"int"} and isinstance(value, float):
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
        pool["slab_bytes"] = _round_up(pool["max_chunk_bytes"] + pool.get("slab_bytes", _DEFAULT_SLAB) // 2, 4096)
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
    # What the segment commits: its header, each slab's frames and carried room, and their times if kept.
    geometry = Geometry(nslabs, slab, sample, limit, bool(getattr(info, "timestamps", False)))
    per_slab = frames + carried
    times = 8 * (per_slab // sample) * nslabs if geometry.timestamps else 0
    return geometry.header_bytes + per_slab * nslabs + times


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
    _unknown(path, raw, _TOP_KEYS)
    broker = raw.get("broker", {})
    if not isinstance(broker, dict):
        raise ConfigError(f"{path}: [broker] must be a table")
    _unknown(f"{path}: [broker]", broker, _BROKER_KEYS)
    args: list[str] = []
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
    # Task modules beside the config import as `python script.py` imports those beside a script.
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    tasks = [_task(path, i, t) for i, t in enumerate(raw.get("tasks", []))]
    if not tasks:
        raise ConfigError(f"{path}: no [[tasks]]: nothing to run (to host sources alone, for `slabcast record` or "
                          f"other programs: slabcast broker --source kind:key=value,... , pool options such as "
                          f"history=S included)")  # fmt: skip
    sources = [_source(path, i, s) for i, s in enumerate(raw.get("sources", []))]
    names = [(getattr(src, "info", None) and src.info.name) or opts.get("name") for _, opts, _, src in sources]
    for t in tasks:
        if t.stream not in names and not t.external:
            close = difflib.get_close_matches(t.stream, [n for n in names if n], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{path}: task {t.name!r} reads stream {t.stream!r}, which no [[sources]] provides "
                f"(sources: {', '.join(map(repr, names)) or 'none'}){hint}; set external = true for a stream "
                f"another program publishes"
            )
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
    return Config(normalize(broker.get("address")), args, tasks, lease_timeout, shm, specs, directory)


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


def task_main(task: Task, address: str, index: int, reached: int | None = None, directory: str = "",
              progress: Any = None) -> None:  # fmt: skip
    """A worker process: subscribe with the task's settings and call the task on every chunk.

    ``reached``: for a restarted worker, the stream index its predecessor had processed up to;
    the samples between it and this worker's start are reported as missed.  ``progress``: a shared
    integer (``multiprocessing.Value``) this worker sets to the stream index it has processed up to:
    its start once subscribed, then the end of each chunk whose callback returned.  ``directory``
    (the config's) goes first on the import path.  Returns (exit code 0) when the stream
    ends; any error ends the process with a traceback.
    """
    from ..client.subscriber import Subscriber

    if directory and directory not in sys.path:
        sys.path.insert(0, directory)

    busy = [False, False]  # in the task's callback; a stop came meanwhile

    def stop(*_: Any) -> None:
        if busy[0]:
            busy[1] = True  # never in the middle of the callback (a file half written): right after it
            return
        raise SystemExit(_STOPPED)  # ... and we leave cleanly: the subscription says goodbye, nothing looks dead

    # SIGINT and SIGTERM to our group (Ctrl-C, systemd, timeout) are up's, which stops us itself: caught and
    # dropped (not SIG_IGN, which a program the task runs would inherit through exec).  They, and up's stop,
    # were blocked from before this process started (up's _start): a signal meanwhile waits for its handler.
    signal.signal(signal.SIGINT, _dropped)
    signal.signal(signal.SIGTERM, _dropped)
    signal.signal(_STOP_WORKER, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fn = resolve(task.call)
    # The broker holds the subscription until the stream exists: a worker may start first.
    with Subscriber(task.stream, task.size, seconds=task.seconds, clip=task.clip, sampler=task.sampler,
                    policy=task.policy, max_inflight=task.max_inflight, address=address, wait=86400.0,
                    label=f"task:{task.name}#{index}", partial_tail=task.partial_tail) as sub:  # fmt: skip
        if reached is not None and sub.start_index > reached:
            # A restarted worker: what its predecessor did not read is not ours to see (a lossless
            # task must know what it missed).
            line = (f"task {task.name}#{index} restarted at stream index {sub.start_index}: samples "
                    f"{reached}..{sub.start_index - 1} ({sub.start_index - reached}) were not processed")  # fmt: skip
            logging.getLogger("slabcast.up").warning(line)
        if progress is not None:
            progress.value = sub.start_index
        for chunk in sub:
            with chunk:
                busy[0] = True
                try:
                    fn(chunk, **task.options)
                    if progress is not None:
                        progress.value = chunk.index + len(chunk)  # (its callback returned: processed)
                finally:
                    busy[0] = False
            if busy[1]:
                raise SystemExit(_STOPPED)


def _stop_worker(proc: Any) -> None:
    """Stop a worker between two chunks (it exits with _STOPPED)."""
    with contextlib.suppress(ProcessLookupError, TypeError):  # (gone, or never started: pid None)
        os.kill(proc.pid, _STOP_WORKER)


@dataclass
class _Slot:
    task: Task
    index: int
    proc: Any = None
    restarts: int = 0
    streak: int = 0  # crashes in a row (the back-off step)
    started: float = 0.0
    due: float = 0.0
    done: bool = False
    failed: bool = False  # gave up after max_failures in a row
    seen: bool = False  # it has been seen subscribed in the broker's status
    missing_since: float = 0.0
    reached: int | None = None  # the stream index its last worker had processed up to
    progress: Any = None  # the running worker's: its start, then the end of each chunk processed (-1: none yet)

    def processed(self) -> int | None:
        """The stream index the running (or last) worker processed up to, or None if it never subscribed."""
        value = -1 if self.progress is None else int(self.progress.value)
        return value if value >= 0 else None

    @property
    def name(self) -> str:
        return f"{self.task.name}#{self.index}"

    @property
    def label(self) -> str:
        return f"task:{self.name}"


def _subscribed_labels(address: str) -> set[tuple[str, int]]:
    """(label, pid) of every subscriber the broker lists.  (Where a worker has processed to is its own word:
    ``_Slot.progress``.)"""
    from ..client.control import broker_status

    status = broker_status(address, timeout=1.0)
    return {(u["label"], u["pid"]) for s in status["streams"] for u in s["subscribers"]}


def _never_appeared(address: str, names: set[str]) -> set[str]:
    """Those of ``names`` the broker neither serves nor ended in the last minute (empty if it cannot say)."""
    from ..client.control import broker_status

    if not names:
        return set()
    try:
        status = broker_status(address, timeout=1.0)
    except Exception:  # the broker is stopping: nothing said
        return set()
    seen = {s["name"] for s in status["streams"]} | {s["name"] for s in status.get("ended_streams", ())}
    return names - seen


def run_up(path: str, output: Any = print, log_level: str = "WARNING") -> int:
    """Run the system described by the config at ``path`` until SIGINT/SIGTERM, or until every task is done.

    Returns the exit code: 0 after a clean stop or when every worker finished its
    stream; 1 if the broker failed, a task gave up (``max_failures``), or a worker
    did not finish its stream after the stop (its ``stop_timeout``, or a crash;
    not after a second Ctrl-C).
    """
    config = load_config(path)

    def say(line: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):  # a closed stdout must not stop the shutdown
            output(line)

    # Signals counted, nothing more: a handler that took a lock (Event.set) deadlocked when a second signal
    # came while the first handler held it (Ctrl-C relayed twice). The loop looks every 0.1 s.
    signals = [0]

    def count(*_: Any) -> None:
        signals[0] += 1

    old = [signal.signal(signal.SIGTERM, count), signal.signal(signal.SIGINT, count)]
    ctx = mp.get_context("spawn")
    slots = [_Slot(t, i) for t in config.tasks for i in range(t.workers)]
    args = (*config.broker_args, "--sigterm-ends-sources")  # (stopped with SIGINT: see below)
    if "--log-level" not in args:
        args += ("--log-level", log_level)
    # The broker's and its sources' log lines go to our standard error, prefixed by component, through a
    # pipe whose last lines say why, should the broker not start.
    tail: collections.deque[str] = collections.deque(maxlen=20)
    read_fd, write_fd = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_fd, tail), name="broker-stderr", daemon=True)
    pump.start()
    broker = BrokerProcess(config.address, args=args, stderr_fd=write_fd)
    try:
        broker.start()
    except BrokerGoneError:
        os.close(write_fd)
        pump.join(5)
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
        code = broker.process.returncode if broker.process is not None else None
        reason = "; ".join(tail) or "it printed nothing"
        how = f"exited with code {code}" if code is not None else f"did not serve within {broker.startup_timeout} s"
        say(f"the broker {how} before serving: {reason}")
        raise BrokerGoneError(f"the broker {how} before serving: {reason}") from None
    os.close(write_fd)
    finished = False
    cut_off = False  # a task did not finish its stream after the stop (not for a second Ctrl-C)
    try:
        say(f"broker {broker.pid} serving {broker.address}")
        next_status = time.monotonic() + _STATUS_EVERY
        while not signals[0]:
            now = time.monotonic()
            for slot in slots:
                if slot.proc is not None and not slot.proc.is_alive():
                    _reap(slot, now, say)
                if slot.proc is None and not slot.done and now >= slot.due:
                    slot.progress = ctx.Value("q", -1, lock=False)
                    slot.proc = ctx.Process(target=task_main, args=(slot.task, broker.address, slot.index,
                                                                    slot.reached, config.directory, slot.progress),
                                            name=f"slabcast-task-{slot.name}")  # fmt: skip
                    # Blocked in the child from its first instruction until task_main's handlers (a group
                    # signal meanwhile would kill it): the mask is inherited, unblocked there.
                    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
                    try:
                        slot.proc.start()
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    slot.started, slot.seen, slot.missing_since = now, False, 0.0
                    say(f"task {slot.name} started, pid {slot.proc.pid}")
            if all(slot.done for slot in slots):
                failed = sorted({s.task.name for s in slots if s.failed})
                say(f"every task is done; failed: {', '.join(failed)}" if failed else "every task finished its stream")
                finished = True
                break
            if broker.process is not None and broker.process.poll() is not None:
                say(f"the broker exited with code {broker.process.returncode}; stopping")
                break
            if now >= next_status:
                next_status = now + _STATUS_EVERY
                _check_evicted(slots, broker.address, config.lease_timeout, now, say)
            time.sleep(0.1)
    finally:
        say("stopping")
        if not finished and broker.process is not None and broker.process.poll() is None:
            # The sources end their streams first, and the tasks on them finish them (every sample, the
            # last partial chunk too) and exit by themselves; one still busy after its stop_timeout is stopped.
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker.pid, signal.SIGUSR1)
            say("the sources end their streams; the tasks finish them (Ctrl-C again: stop now)")
            cut_off = _drain(slots, broker.address, time.monotonic(), signals, say)
        for slot in slots:
            if slot.proc is not None and slot.proc.is_alive():
                _stop_worker(slot.proc)
        for slot in slots:
            if slot.proc is not None:
                slot.proc.join(5)
                if slot.proc.is_alive():
                    slot.proc.kill()
                    slot.proc.join()
                slot.proc.close()
        # SIGINT: its SIGTERM ends the sources' streams only (a SIGTERM to our whole cgroup, systemd's
        # KillMode=control-group, reaches it too).  8 s: longer than it gives its sources' threads to stop (5 s).
        code = broker.stop(timeout=8.0, sig=signal.SIGINT)
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    say(f"stopped (broker exit code {code}, {sum(s.restarts for s in slots)} restarts)")
    if any(s.failed for s in slots) or cut_off:
        return 1  # a task gave up, or did not finish its stream in time: the run did not do all it was asked
    if finished:
        return 0
    return 0 if code in (0, None) else 1


def _drain(slots: list[_Slot], address: str, stop: float, signals: list[int], say: Any) -> bool:
    """After the stop (at ``stop``), while the workers finish their streams: name each one that finished, one
    that exited otherwise (a crash on its last chunks), and one still busy after its task's ``stop_timeout``,
    which is stopped then (between two chunks) with the stream index it had processed to (said once it has
    exited); a second Ctrl-C stops and names the rest at once.  Return whether a worker did not finish its
    stream (not counting a second Ctrl-C)."""
    pending = [s for s in slots if s.proc is not None and not s.task.external]
    cut = False
    # A worker still waiting for a stream that never appeared (not served, not ended lately) has nothing to
    # finish: stopped at once, said so (a lab newcomer's Ctrl-C before the device came waited 10 s, then said
    # the stream was cut).
    stopping: dict[int, tuple[str, float]] = {}  # id(slot) -> (why, when): stopped, said once it is gone
    next_look = 0.0  # (looked at again every _ABSENT_LOOK s: a worker still importing its task subscribes late)

    def index_of(slot: _Slot) -> str:
        at = slot.processed()
        return f" at stream index {at}" if at is not None else ""

    while pending:
        now = time.monotonic()
        if now >= next_look:
            next_look = now + _ABSENT_LOOK
            absent = _never_appeared(address, {s.task.stream for s in pending if id(s) not in stopping})
            for slot in [s for s in pending if s.task.stream in absent and id(s) not in stopping]:
                pending.remove(slot)
                say(f"task {slot.name} stopped: its stream {slot.task.stream!r} never appeared")
                _stop_worker(slot.proc)
        for slot in list(pending):
            late = now >= stop + slot.task.stop_timeout
            alive = slot.proc.is_alive()
            if id(slot) in stopping:
                # Said once it exited (it finishes the chunk in its callback first): the index is then exact.
                when, since = stopping[id(slot)]
                if alive and now - since < _STOP_WAIT and signals[0] < 2:
                    continue
                pending.remove(slot)
                say(f"task {slot.name} had not finished its stream {when}: stopped{index_of(slot)}; the samples "
                    f"after it up to the stream's end were not processed")  # fmt: skip
            elif not alive:
                pending.remove(slot)
                code = slot.proc.exitcode
                if code == 0:
                    say(f"task {slot.name} finished its stream")
                else:
                    say(f"task {slot.name} exited with code {code} before the end of its stream")
                    cut = True
            elif late or signals[0] >= 2:
                when = "when Ctrl-C came again" if signals[0] >= 2 else f"{slot.task.stop_timeout:g} s after the stop"
                stopping[id(slot)] = (when, now)
                _stop_worker(slot.proc)  # (between two chunks: task_main)
                cut = cut or signals[0] < 2
        time.sleep(0.05)
    return cut


def _pump(fd: int, tail: collections.deque[str]) -> None:
    """Copy the broker's standard error to ours, keeping its last lines."""
    with open(fd, "rb") as f:
        for line in f:
            tail.append(line.decode(errors="replace").rstrip())
            with contextlib.suppress(OSError):
                os.write(2, line)


def _reap(slot: _Slot, now: float, say: Any) -> None:
    """A worker exited: done (code 0, its stream ended) or crashed (restart with back-off)."""
    code = slot.proc.exitcode
    if (at := slot.processed()) is not None:
        slot.reached = at  # what its successor reports as missed starts here
    slot.proc.close()
    slot.proc = None
    if code == 0 and not slot.task.restart_on_end:
        slot.done = True
        say(f"task {slot.name} finished its stream")
        return
    if now - slot.started >= _HEALTHY:
        slot.streak = 0  # it ran well for a while: this is a new failure, not the same one again
    slot.streak += 1
    if code != 0 and slot.task.max_failures and slot.streak >= slot.task.max_failures:
        slot.done = slot.failed = True  # the others go on; up exits 1 at the end
        say(f"task {slot.name} failed: exited with code {code}, {slot.streak} times in a row; not restarted "
            f"(max_failures = {slot.task.max_failures})")  # fmt: skip
        return
    slot.restarts += 1
    delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (slot.streak - 1))
    slot.due = now + delay
    say(f"task {slot.name} exited with code {code}; restart {slot.restarts} in {delay:g} s")


def _check_evicted(slots: list[_Slot], address: str, lease_timeout: float, now: float, say: Any) -> None:
    """A live worker that the broker no longer lists (evicted: stuck past its lease) is killed and restarted."""
    try:
        present = _subscribed_labels(address)
    except Exception:  # the broker is busy or stopping; look again next time
        return
    for slot in slots:
        if slot.proc is None or not slot.proc.is_alive():
            continue
        if (slot.label, slot.proc.pid) in present:
            slot.seen, slot.missing_since = True, 0.0
            continue
        if not slot.seen:
            continue  # still starting, or waiting for its stream
        if not slot.missing_since:
            slot.missing_since = now
        elif now - slot.missing_since >= min(5.0, lease_timeout):
            say(f"task {slot.name} (pid {slot.proc.pid}) lost its subscription (evicted: stuck past the "
                f"lease timeout); killing it to restart")  # fmt: skip
            slot.proc.kill()
