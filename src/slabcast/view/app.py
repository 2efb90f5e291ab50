"""The web shell of ``slabcast view``: a Starlette app, one websocket per page, one drop-policy Window per stream.

One :class:`Hub` per server polls the broker's status (``POLL`` seconds), keeps the
list of streams (:class:`~slabcast.view.frames.StreamList`) and a
:class:`~slabcast.Window` per stream some page draws, shared by every page. A
``Window`` is an ordinary ``policy="drop"`` subscriber: the publisher never waits
for it, so the view can never slow a stream.

The page asks for each display frame when it is ready to draw one
(``requestAnimationFrame``) and the server answers that one request: nothing queues,
so the view never falls behind; a slow or hidden page simply asks less often.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .._exceptions import SlabcastError
from .._version import __version__
from ..client.control import broker_status
from ..client.window import Window
from .frames import MARKERS_SHOWN, StreamEnvelope, StreamList, is_audio, marker_list, pack_frame, stream_envelope

__all__ = ["POLL", "Hub", "ViewConfig", "create_app"]

log = logging.getLogger("slabcast.view")

POLL = 0.5
"""Seconds between two broker status requests (stream list, statistics, drop counters)."""

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ViewConfig:
    """What a view server serves.

    Attributes
    ----------
    address : str or None
        The broker's address.
    seconds : float
        Length of each stream's window (the longest span a page can show).
    curve : (str, str) or None
        For a ``tcp://`` address: client secret key file and broker public key file.
    token : str or None
        Required on every request when set (``?token=`` or the cookie the page gets).
    loopback : bool
        Bound to a loopback address only: requests must then name a loopback host
        (against DNS rebinding).
    preselect : dict
        Stream name to the channel names to draw (``None``: all), drawn on page load.
    method : str
        ``"numpy"`` or ``"tsdownsample"``, as :meth:`slabcast.Window.get_display`.
    """

    address: str | None = None
    seconds: float = 10.0
    curve: tuple[str, str] | None = None
    token: str | None = None
    loopback: bool = True
    preselect: dict[str, list[str] | None] = field(default_factory=dict)
    method: str = "numpy"


def _jsonable(obj: Any) -> Any:
    """Plain data with non-finite floats as ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


class _Entry:
    """A stream's shared window: opened while some page draws the stream, closed (kept for its data) once it ends."""

    def __init__(self) -> None:
        self.refs = 0
        self.window: Window | None = None
        self.live = False  # the window is subscribed (not closed after the stream ended)
        self.opening = False
        self.error: str | None = None
        self.permanent = False  # an error retrying cannot fix (no rate)


class Hub:
    """The broker's stream list and the shared windows, for every page of one server."""

    def __init__(self, config: ViewConfig) -> None:
        self.config = config
        self.streams = StreamList()
        self.failed: dict[str, str] = {}  # the last error drawing each stream (logged once per message)
        self.listed: list[dict[str, Any]] = []
        self.broker: dict[str, Any] | None = None
        self.sources: dict[str, dict[str, Any]] = {}  # hosted sources by stream name, as the last status said
        self.error: str | None = None
        self.version = 0
        self.changed = asyncio.Condition()
        self._entries: dict[str, _Entry] = {}
        self._opening: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
        self._pid = os.getpid()

    # ------------------------------------------------------------ status

    async def run(self) -> None:
        """Poll the broker until cancelled."""
        while True:
            try:
                await self._poll()
            except Exception:  # a bug here must not freeze every page's stream list: log it, poll again
                log.exception("slabcast view: polling the broker failed")
            async with self.changed:
                self.version += 1
                self.changed.notify_all()
            await asyncio.sleep(POLL)

    async def _poll(self) -> None:
        try:
            status = await asyncio.to_thread(broker_status, self.config.address, 2.0, self.config.curve)
        except SlabcastError as exc:
            self.error = f"no broker: {exc}"
            self.broker = None
            self.listed = self.streams.update({"streams": []}, time.time())
        else:
            self.error = None
            keys = ("pid", "version", "address", "tcp_address", "uptime", "clients")
            self.broker = {k: status.get(k) for k in keys}
            self.sources = {src["name"]: src for src in status.get("sources", ())}
            self.listed = self.streams.update(status, time.time())
        await self._sync_windows()

    def status_message(self) -> dict[str, Any]:
        """What the page shows beside the plots: streams, their statistics and subscribers, errors."""
        streams = []
        for s in self.listed:
            entry = self._entries.get(s["name"])
            try:
                audio = is_audio(np.dtype(s["dtype"]), s.get("channel_types") or (), s.get("channel_units") or ())
            except TypeError:
                audio = False
            subscribers = [{**u, "ours": u.get("pid") == self._pid} for u in s.get("subscribers", [])]
            # (its hosted source's state and last sample's age: a stalled stream says so, as `slabcast status` does)
            streams.append({**s, "subscribers": subscribers, "audio": audio, "markers": _is_markers(s),
                            "view_error": entry.error if entry else None,
                            "source": self.sources.get(s["name"])})  # fmt: skip
        msg: dict[str, Any] = _jsonable({"type": "status", "broker": self.broker, "error": self.error,
                                         "streams": streams, "time": time.time()})  # fmt: skip
        return msg

    # ------------------------------------------------------------ windows

    async def acquire(self, name: str) -> None:
        """A page draws ``name``: open its window if it is live."""
        entry = self._entries.setdefault(name, _Entry())
        entry.refs += 1
        await self._sync_windows()

    async def release(self, name: str) -> None:
        """A page no longer draws ``name``: close its window when no page does."""
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del self._entries[name]
            if entry.window is not None:
                await asyncio.to_thread(entry.window.close)

    async def _sync_windows(self) -> None:
        for name, entry in list(self._entries.items()):
            live = self.streams.live(name)
            window = entry.window
            if window is not None and entry.live and (not live or window.error is not None):
                # Ended (or broken): unsubscribe so the broker can let the stream go, keep the data to show.
                if window.error is not None:
                    entry.error = f"{type(window.error).__name__}: {window.error}"
                entry.live = False
                await asyncio.to_thread(window.close)
            if not live:
                entry.permanent = False  # a stream of the same name may come back with a rate
            elif not entry.live and not entry.opening and not entry.permanent:
                entry.opening = True
                task = asyncio.get_running_loop().create_task(self._open(name, entry))
                self._opening.add(task)
                task.add_done_callback(self._opening.discard)

    async def _open(self, name: str, entry: _Entry) -> None:
        cfg = self.config
        listed = next((s for s in self.listed if s["name"] == name), {})
        # A marker stream (no rate): its newest markers, listed in its panel and drawn over the other plots.
        length: dict[str, Any] = {"samples": MARKERS_SHOWN} if _is_markers(listed) else {"seconds": cfg.seconds}
        try:
            window = await asyncio.to_thread(Window, name, **length, address=cfg.address, curve=cfg.curve)
        except ValueError as exc:  # no rate: cannot be drawn against time
            entry.error, entry.permanent = str(exc), True
        except SlabcastError as exc:  # it ended or went away meanwhile: the next poll decides
            entry.error = f"{type(exc).__name__}: {exc}"
        else:
            if self._entries.get(name) is not entry:  # every page let it go meanwhile
                await asyncio.to_thread(window.close)
            else:
                old, entry.window, entry.live, entry.error = entry.window, window, True, None
                if old is not None:
                    await asyncio.to_thread(old.close)
        finally:
            entry.opening = False

    def envelope(self, name: str, channels: list[str] | None, width: int, seconds: float) -> StreamEnvelope | None:
        """The newest ``seconds`` of ``name`` at ``width`` columns (runs in a worker thread); ``None``: no data yet."""
        entry = self._entries.get(name)
        window = entry.window if entry else None
        if window is None or window.samples == 0:
            return None
        info = window.info
        if info.dtype.kind == "S":
            data, times = window.get()
            part = marker_list(name, data, times, min(seconds, self.config.seconds), time.time())
            part.header.update(samples=window.samples, live=bool(entry and entry.live), rate=None, names=[])
            return part
        assert info.rate is not None
        names = list(info.channel_names)
        picked = list(range(info.channels)) if channels is None else [names.index(c) for c in channels if c in names]
        data, times = window.get()
        audio = is_audio(info.dtype, info.channel_types, info.channel_units)
        part = stream_envelope(name, data, times, info.rate, picked, width, min(seconds, self.config.seconds),
                               audio, self.config.method)  # fmt: skip
        part.header.update(samples=window.samples, live=bool(entry and entry.live), rate=info.rate,
                           names=[names[i] for i in picked])  # fmt: skip
        return part

    async def close(self) -> None:
        """Close every window (after those being opened)."""
        await asyncio.gather(*self._opening, return_exceptions=True)
        for entry in list(self._entries.values()):
            if entry.window is not None:
                await asyncio.to_thread(entry.window.close)
        self._entries.clear()


def _is_markers(listed: dict[str, Any]) -> bool:
    """Whether a listed stream is a marker stream (dtype ``S<N>``: strings, drawn as a list and as lines)."""
    try:
        return bool(np.dtype(listed.get("dtype", "f4")).kind == "S")
    except TypeError:
        return False


class _Page:
    """One websocket: the page's selection, its frame requests, and status pushed to it."""

    def __init__(self, hub: Hub, ws: WebSocket) -> None:
        self.hub = hub
        self.ws = ws
        self.selected: dict[str, list[str] | None] = {}
        self.seq = 0
        self._send_lock = asyncio.Lock()

    async def send_json(self, msg: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(msg, separators=(",", ":"), allow_nan=False))

    async def push_status(self) -> None:
        seen = -1

        def news() -> bool:
            return self.hub.version != seen

        while True:
            async with self.hub.changed:
                await self.hub.changed.wait_for(news)
                seen = self.hub.version
            await self.send_json(self.hub.status_message())

    async def select(self, wanted: dict[str, list[str] | None]) -> None:
        for name in set(self.selected) - set(wanted):
            await self.hub.release(name)
        for name in set(wanted) - set(self.selected):
            await self.hub.acquire(name)
        self.selected = wanted

    async def frame(self, width: int, seconds: float) -> None:
        selected = dict(self.selected)

        def build() -> bytes:
            parts, pending, failed = [], [], {}
            for name, channels in selected.items():
                try:
                    part = self.hub.envelope(name, channels, width, seconds)
                except Exception as exc:  # one stream's bad data must not stop the page's other streams
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    if self.hub.failed.get(name) != failed[name]:
                        log.warning("stream %r cannot be drawn: %s", name, failed[name])
                    continue
                if part is None:
                    pending.append(name)
                else:
                    parts.append(part)
            self.hub.failed.update(failed)
            return pack_frame(self.seq, parts, {"pending": pending, "failed": failed})

        data = await asyncio.to_thread(build)
        self.seq += 1
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def serve(self) -> None:
        cfg = self.hub.config
        await self.send_json({"type": "hello", "version": __version__, "seconds": cfg.seconds,
                              "preselect": cfg.preselect, "auto": not cfg.preselect})  # fmt: skip
        pusher = asyncio.get_running_loop().create_task(self.push_status())
        try:
            async for text in self.ws.iter_text():
                try:
                    msg = json.loads(text)
                    kind = msg.get("type")
                    if kind == "frame":
                        width = max(1, min(int(msg.get("width", 1000)), 8192))
                        seconds = float(msg.get("seconds", cfg.seconds))
                        if not 0 < seconds < math.inf:
                            raise ValueError(f"seconds must be positive, got {seconds}")
                    elif kind == "select":
                        wanted = {str(k): None if v is None else [str(c) for c in v]
                                  for k, v in dict(msg["streams"]).items()}  # fmt: skip
                    else:
                        raise ValueError(f"unknown message type {kind!r}")
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    log.warning("ignored a malformed message from a page: %s (%.80r)", exc, text)
                    continue
                if kind == "frame":
                    await self.frame(width, seconds)
                else:
                    await self.select(wanted)
        except WebSocketDisconnect:
            pass
        finally:
            pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pusher
            await self.select({})


class _Guard:
    """Refuse requests without the token, and (on a loopback bind) for a non-loopback host or another origin.

    The token comes as ``?token=`` (the URL printed at startup) or as the cookie the
    page receives with it. A websocket is refused before it is accepted (the client
    sees HTTP 403). Checking ``Host`` on loopback binds defeats DNS rebinding; checking
    ``Origin`` on websockets stops other sites' pages from reading the streams.
    """

    def __init__(self, app: ASGIApp, token: str | None, loopback: bool) -> None:
        self.app = app
        self.token = token
        self.loopback = loopback

    def _cookie(self, scope: Scope) -> str:
        server = scope.get("server") or ("", 0)
        return f"slabcast_view_{server[1]}"

    def _problem(self, scope: Scope, headers: Headers) -> str | None:
        host = headers.get("host", "")
        hostname = urlsplit(f"//{host}").hostname or ""
        if self.loopback and hostname not in _LOOPBACK_HOSTS:
            return f"host {host!r} is not a loopback name"
        origin = headers.get("origin")
        if scope["type"] == "websocket" and origin is not None and urlsplit(origin).netloc != host:
            return f"origin {origin!r} is not this server ({host!r})"
        if self.token is not None:
            given = QueryParams(scope.get("query_string", b"")).get("token")
            if given is None:
                given = HTTPConnection(scope).cookies.get(self._cookie(scope))
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return "a valid token is required"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope, Headers(scope=scope))
        if problem is not None:
            log.warning("refused %s %s: %s", scope["type"], scope.get("path"), problem)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": problem})
            else:
                await PlainTextResponse(f"forbidden: {problem}\n", status_code=403)(scope, receive, send)
            return
        if self.token is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookie = f"{self._cookie(scope)}={self.token}; Path=/; HttpOnly; SameSite=Strict"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def create_app(config: ViewConfig) -> ASGIApp:
    """The ASGI application of a view server (serve it with uvicorn)."""
    hub = Hub(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(hub.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await hub.close()

    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        await _Page(hub, ws).serve()

    async def status(request: Request) -> Response:
        return JSONResponse(hub.status_message())

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", websocket),
            Route("/api/status", status),
            Mount("/", StaticFiles(packages=[("slabcast.view", "static")], html=True)),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return _Guard(app, config.token, config.loopback)
