"""``slabcast up CONFIG``: start the broker, its sources and one supervised worker process per task."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing as mp
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ._address import normalize
from ._process import BrokerProcess

__all__ = ["Task", "load_config", "run_up"]

log = logging.getLogger("slabcast.up")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_TASK_KEYS = {"name", "call", "stream", "size", "seconds", "clip", "sampler", "policy", "workers", "options",
              "max_inflight"}  # fmt: skip


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


@dataclass
class Config:
    """A parsed config file."""

    address: str
    broker_args: list[str]
    tasks: list[Task]


def load_config(path: str) -> Config:
    """Read and check a TOML config; errors name the file, the table and the key.

    Raises
    ------
    ValueError
        For a missing or unknown key, or a value of the wrong type.
    """
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    broker = raw.get("broker", {})
    args: list[str] = []
    if "lease_timeout" in broker:
        args += ["--lease-timeout", str(float(broker["lease_timeout"]))]
    if "shm_mode" in broker:
        args += ["--shm-mode", str(broker["shm_mode"])]
    for i, src in enumerate(raw.get("sources", [])):
        if "kind" not in src or "name" not in src:
            raise ValueError(f"{path}: [[sources]] #{i + 1} needs 'kind' and 'name'")
        opts = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in src.items() if k != "kind")  # fmt: skip
        args += ["--source", f"{src['kind']}:{opts}"]
    tasks = []
    for i, t in enumerate(raw.get("tasks", [])):
        where = f"{path}: [[tasks]] #{i + 1} ({t.get('name', '?')})"
        unknown = set(t) - _TASK_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_TASK_KEYS)}")
        for key in ("name", "call", "stream"):
            if not isinstance(t.get(key), str):
                raise ValueError(f"{where}: '{key}' must be a string, got {t.get(key)!r}")
        if ":" not in t["call"]:
            raise ValueError(f"{where}: 'call' must be 'module:function', got {t['call']!r}")
        if ("size" in t) == ("seconds" in t):
            raise ValueError(f"{where}: give exactly one of 'size' and 'seconds'")
        task = Task(**t)
        if not isinstance(task.workers, int) or task.workers < 1:
            raise ValueError(f"{where}: 'workers' must be a positive integer, got {task.workers!r}")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no [[tasks]]")
    return Config(normalize(broker.get("address")), args, tasks)


def resolve(call: str) -> Any:
    """Import ``module:function``."""
    module, _, name = call.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def task_main(task: Task, address: str, index: int) -> None:
    """A worker process: subscribe with the task's settings and call the task on every chunk."""
    from ._subscriber import Subscriber

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us with SIGTERM
    fn = resolve(task.call)
    with Subscriber(task.stream, task.size, seconds=task.seconds, clip=task.clip, sampler=task.sampler,
                    policy=task.policy, max_inflight=task.max_inflight, address=address, wait=60.0,
                    label=f"task:{task.name}#{index}") as sub:  # fmt: skip
        for chunk in sub:
            with chunk:
                fn(chunk, **task.options)


@dataclass
class _Slot:
    task: Task
    index: int
    proc: Any = None
    restarts: int = 0
    due: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.task.name}#{self.index}"


def run_up(path: str, output: Any = print) -> int:
    """Run the system described by the config at ``path`` until SIGINT/SIGTERM; return the exit code."""
    config = load_config(path)

    def say(line: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):  # a closed stdout must not stop the shutdown
            output(line)

    for task in config.tasks:
        resolve(task.call)  # fail now, not in a crash loop
    stop = threading.Event()
    old = [signal.signal(signal.SIGTERM, lambda *_: stop.set()), signal.signal(signal.SIGINT, lambda *_: stop.set())]
    ctx = mp.get_context("spawn")
    slots = [_Slot(t, i) for t in config.tasks for i in range(t.workers)]
    broker = BrokerProcess(config.address, args=tuple(config.broker_args))
    try:
        broker.start()
        say(f"broker {broker.pid} serving {broker.address}")
        while not stop.is_set():
            now = time.monotonic()
            for slot in slots:
                if slot.proc is not None and not slot.proc.is_alive():
                    code = slot.proc.exitcode
                    slot.proc.close()
                    slot.proc = None
                    slot.restarts += 1
                    delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (slot.restarts - 1))
                    slot.due = now + delay
                    say(f"task {slot.name} exited with code {code}; restart {slot.restarts} in {delay:g} s")
                    log.warning("task %s exited with code %s; restart %d in %g s", slot.name, code, slot.restarts,
                                delay)  # fmt: skip
                if slot.proc is None and now >= slot.due:
                    slot.proc = ctx.Process(target=task_main, args=(slot.task, broker.address, slot.index),
                                            name=f"slabcast-task-{slot.name}")  # fmt: skip
                    slot.proc.start()
                    say(f"task {slot.name} started, pid {slot.proc.pid}")
            if broker.process is not None and broker.process.poll() is not None:
                say(f"the broker exited with code {broker.process.returncode}; stopping")
                break
            stop.wait(0.1)
    finally:
        say("stopping")
        for slot in slots:
            if slot.proc is not None and slot.proc.is_alive():
                slot.proc.terminate()
        for slot in slots:
            if slot.proc is not None:
                slot.proc.join(5)
                if slot.proc.is_alive():
                    slot.proc.kill()
                    slot.proc.join()
                slot.proc.close()
        code = broker.stop()
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    say(f"stopped (broker exit code {code}, {sum(s.restarts for s in slots)} restarts)")
    return 0 if code in (0, None) else 1
