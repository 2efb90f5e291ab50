"""`slabcast view` as a real server process, read back from a real headless Chromium (Debian's package).

A known signal (a 440 Hz sine of amplitude 0.5, a +/-0.25 square wave) is published;
the page's own data (``window.slabcastView``) must show its shape, amplitude and RMS.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import slabcast

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

CHROMIUM = "/usr/bin/chromium"
needs_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs chromium (apt-get install chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
RATE = 8000.0
TIMEOUT_MS = 15_000


@contextlib.contextmanager
def view_server(*args, timeout=20.0):
    """Start `slabcast view`, wait for the URL it prints, yield ``(url, proc)``; stop and reap it after."""
    proc = subprocess.Popen([sys.executable, "-m", "slabcast", "view", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"slabcast view printed no URL within {timeout} s")
        line = proc.stdout.readline()
        match = re.search(r"serving (http://\S+)", line)
        assert match, f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1), proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


def tone_and_square(k):
    """A 440 Hz sine of amplitude 0.5 and a 10 Hz +/-0.25 square wave at sample indices ``k``, float32."""
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * k / RATE)
    square = np.where((k // 400) % 2 == 0, 0.25, -0.25)
    return np.stack([tone, square], axis=1).astype(np.float32)


class Signal(threading.Thread):
    """Publish ``make(sample indices)`` in frames, paced at ``rate`` (default: the tone and the square wave)."""

    def __init__(self, name, address, make=tone_and_square, rate=RATE, frame=400, **stream):
        super().__init__(daemon=True)
        stream = stream or {"dtype": "float32", "channels": 2, "channel_names": ["tone", "square"]}
        self.pub = slabcast.Publisher(name, rate=rate, address=address, **stream)
        self.make, self.rate, self.frame = make, rate, frame
        self.stop = threading.Event()
        self.error = None

    def run(self):
        n, start = 0, time.monotonic()
        try:
            while not self.stop.is_set():
                self.pub.write(self.make(np.arange(n, n + self.frame)))
                n += self.frame
                self.stop.wait(max(0.0, start + n / self.rate - time.monotonic()))  # pacing, not a readiness wait
        except BaseException as exc:  # reported by close()
            self.error = exc

    def close(self):
        self.stop.set()
        self.join(10)
        self.pub.close()
        assert self.error is None, self.error


@contextlib.contextmanager
def browser_page(url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, timeout=TIMEOUT_MS)
            yield page
            assert not errors, f"errors in the page: {errors}"
        finally:
            browser.close()


def last(page, name):
    """The last frame the page drew for ``name``, as plain lists."""
    return page.evaluate(
        """(name) => { const f = window.slabcastView.last[name]; return f && {...f, x: Array.from(f.x),
             channels: f.channels.map(c => ({...c, min: Array.from(c.min), max: Array.from(c.max)}))}; }""",
        name,
    )


@needs_browser
def test_view_draws_the_signal_and_follows_streams(broker, stream_name):
    signal = Signal(stream_name, broker.address)
    signal.start()
    second = None
    try:
        with view_server("--address", broker.address, "--seconds", "2") as (url, proc), browser_page(url) as page:
            assert url.startswith("http://127.0.0.1:")
            page.wait_for_selector(f'#streams li[data-name="{stream_name}"][data-state="live"]', timeout=TIMEOUT_MS)
            # Drawn without asking (no --stream: every stream as it appears), until the 2 s window is full.
            page.wait_for_function(
                "(n) => { const f = window.slabcastView.last[n]; return f && f.span >= 1.95; }",
                arg=stream_name,
                timeout=TIMEOUT_MS,
            )
            frame = last(page, stream_name)
            assert frame["names"] == ["tone", "square"] and frame["rate"] == RATE and frame["live"]
            x = np.array(frame["x"])
            assert 100 <= frame["columns"] <= 1200  # about the plot's width in pixels, not the sample count
            assert np.all(np.diff(x) > 0) and -2.01 <= x[0] < -1.9 and -0.01 <= x[-1] <= 0.0
            tone, square = frame["channels"]
            tmax, tmin = np.array(tone["max"]), np.array(tone["min"])
            # Each column spans more than one 440 Hz period (at most 1200 columns for 16000 samples): every
            # column reaches both peaks, to within the sampling of the peak (one 0.35 rad step at 8 kHz).
            assert frame["samples_shown"] / frame["columns"] > RATE / 440
            assert tmax.max() == pytest.approx(0.5, abs=1e-3) and tmin.min() == pytest.approx(-0.5, abs=1e-3)
            assert np.all(tmax > 0.48) and np.all(tmin < -0.48)
            smax, smin = np.array(square["max"]), np.array(square["min"])
            assert np.all(np.isclose(smax, 0.25) | np.isclose(smax, -0.25))
            assert np.all(np.isclose(smin, 0.25) | np.isclose(smin, -0.25))
            high = np.isclose(smin, 0.25)  # the whole column at +0.25
            low = np.isclose(smax, -0.25)
            assert high.mean() > 0.35 and low.mean() > 0.35 and (high | low).mean() > 0.85  # the bulk at the levels
            assert tone["level"]["rms"] == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
            assert tone["level"]["dbfs"] == pytest.approx(-9.03, abs=0.2)
            assert square["level"]["rms"] == pytest.approx(0.25, rel=1e-3)
            assert square["level"]["peak"] == pytest.approx(0.25, rel=1e-3)
            assert square["level"]["dbfs"] == pytest.approx(-12.04, abs=0.05)
            panel = page.locator(f'section.panel[data-name="{stream_name}"]')
            assert "RMS 0.250" in panel.locator('.row[data-channel="square"] .meter').inner_text()
            assert "dBFS" in panel.locator('.row[data-channel="tone"] .meter').inner_text()
            page.wait_for_function(
                "(n) => document.querySelector(`section.panel[data-name='${n}'] [data-key='view drops']`)",
                arg=stream_name,
                timeout=TIMEOUT_MS,
            )
            assert panel.locator("[data-key='view drops']").inner_text() == "view drops 0"
            panel.locator("details summary").click()
            details = panel.locator("details").inner_text()
            assert "(this view)" in details and "mean" in details and "tone" in details
            # It keeps pace: frames keep coming and stay fresh.
            before = page.evaluate("window.slabcastView.frames")
            page.wait_for_function(f"window.slabcastView.frames >= {before + 10}", timeout=TIMEOUT_MS)

            # A stream appearing later is listed (and drawn); ending it is shown.
            other = stream_name + "b"
            second = Signal(other, broker.address, lambda k: np.full((len(k), 1), 16384, dtype=np.int16), rate=1000.0,
                            frame=50, dtype="int16", channels=1)  # fmt: skip
            second.start()
            page.wait_for_selector(f'#streams li[data-name="{other}"][data-state="live"]', timeout=TIMEOUT_MS)
            page.wait_for_function("(n) => !!window.slabcastView.last[n]", arg=other, timeout=TIMEOUT_MS)
            half_scale = last(page, other)["channels"][0]["level"]["dbfs"]
            assert half_scale == pytest.approx(-6.02, abs=0.01)  # int16 16384: dBFS against the dtype's full scale
            second.close()
            second = None
            page.wait_for_selector(f'#streams li[data-name="{other}"][data-state="ended"]', timeout=TIMEOUT_MS)
            page.wait_for_selector(f'section.panel.ended[data-name="{other}"]', timeout=TIMEOUT_MS)
            assert page.locator(f'#streams li[data-name="{other}"] .state').inner_text().lower() in ("ended", "ending")

            # On a loopback bind, a request naming another host (DNS rebinding) is refused.
            port = int(url.split("/?")[0].rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/", headers={"Host": f"attacker.example:{port}"})
            assert conn.getresponse().status == 403
            conn.close()
        assert proc.returncode == 0, proc.returncode  # a clean stop on SIGTERM
    finally:
        if second is not None:
            second.close()
        signal.close()


@needs_browser
def test_view_preselects_channels_and_explains_what_it_cannot_draw(broker, stream_name):
    signal = Signal(stream_name, broker.address)
    signal.start()
    norate = slabcast.Publisher(stream_name + "n", dtype="float32", channels=1, address=broker.address)
    try:
        # --channels names the channels of --stream options that name none: not this one's.
        with view_server("--address", broker.address, "--seconds", "1", "--stream", f"{stream_name}=square",
                         "--channels", "tone", "--stream", "nosuch") as (url, _), browser_page(url) as page:  # fmt: skip
            page.wait_for_function(
                "(n) => { const f = window.slabcastView.last[n]; return f && f.span >= 0.5; }",
                arg=stream_name,
                timeout=TIMEOUT_MS,
            )
            frame = last(page, stream_name)
            assert frame["names"] == ["square"] and frame["channels"][0]["index"] == 1
            assert max(frame["channels"][0]["max"]) == pytest.approx(0.25)
            assert page.locator(f'section.panel[data-name="{stream_name}"] .row').count() == 1
            expect = pytest.importorskip("playwright.sync_api").expect
            # A preselected stream that does not exist yet is awaited.
            awaited = page.locator('section.panel[data-name="nosuch"] .note')
            expect(awaited).to_contain_text("waiting for stream nosuch to appear", timeout=TIMEOUT_MS)
            # Only the preselected streams are drawn; ticking another draws it, or says why it cannot.
            assert page.locator("section.panel").count() == 2
            page.locator(f'#streams li[data-name="{stream_name}n"] input').check()
            note = page.locator(f'section.panel[data-name="{stream_name}n"] .note')
            expect(note).to_contain_text("needs a stream with a rate", timeout=TIMEOUT_MS)
    finally:
        norate.close()
        signal.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_token_is_required_on_loopback_too(broker, host):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with view_server("--address", broker.address, "--host", host) as (url, _):
        match = re.search(r":(\d+)/\?token=(\S+)$", url)
        assert match, f"no generated token in {url}"
        port, token = int(match.group(1)), match.group(2)
        base = f"127.0.0.1:{port}"
        for query in ("", "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://{base}/{query}", timeout=10)
            assert err.value.code == 403
            err.value.close()
            with pytest.raises(InvalidStatus) as refused, connect(f"ws://{base}/ws{query}", open_timeout=10):
                pass
            assert refused.value.response.status_code == 403
        with urllib.request.urlopen(f"http://{base}/?token={token}", timeout=10) as ok:
            assert ok.status == 200 and b"slabcast view" in ok.read()
            cookie = ok.headers["set-cookie"].split(";")[0]
        with urllib.request.urlopen(urllib.request.Request(f"http://{base}/view.js", headers={"Cookie": cookie}),
                                    timeout=10) as js:  # fmt: skip
            assert js.status == 200  # the page's own files come with the cookie it was given
        with pytest.raises(InvalidStatus), connect(f"ws://{base}/ws?token={token}", open_timeout=10,
                                                   origin="http://attacker.example"):  # fmt: skip
            pass  # another site's page, even with the token
        with connect(f"ws://{base}/ws?token={token}", open_timeout=10) as ws:
            assert '"type":"hello"' in ws.recv(timeout=10)


def test_no_token_is_for_loopback_only(broker):
    with view_server("--address", broker.address, "--no-token") as (url, _):
        assert "token" not in url
        with urllib.request.urlopen(url, timeout=10) as ok:
            assert ok.status == 200
    refused = subprocess.run([sys.executable, "-m", "slabcast", "view", "--address", broker.address, "--host",
                              "0.0.0.0", "--no-token"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.returncode == 2 and "--no-token is for a loopback --host" in refused.stderr


def test_view_without_broker_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "slabcast", "view", "--address", f"ipc://{tmp_path}/none.sock"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert "no broker" in done.stderr and "slabcast broker" in done.stderr and "Traceback" not in done.stderr


def test_view_without_the_extra_says_how_to_install_it():
    code = "import sys; sys.modules['uvicorn'] = None; from slabcast.cli.main import main; sys.exit(main(['view']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "pip install 'slabcast[view]'" in done.stderr and "Traceback" not in done.stderr


# (The sans-io core, slabcast.view.frames, is tested without processes in tests/unit/test_view_frames.py.)


def test_a_stream_with_nan_samples_does_not_stop_the_page(broker, stream_name):
    from websockets.sync.client import connect

    def with_gaps(k):  # a sensor with missing values
        x = np.sin(k / 10.0).astype(np.float32)
        x[k % 100 == 3] = np.nan
        return x

    good = Signal(stream_name, broker.address)
    sensor = Signal(stream_name + "-nan", broker.address, make=with_gaps, rate=1000.0, frame=50, dtype="float32",
                    channels=1)  # fmt: skip
    good.start()
    sensor.start()
    try:
        with contextlib.ExitStack() as stack:
            url, _ = stack.enter_context(view_server("--address", broker.address))
            base, _, query = url.partition("/?")
            ws = stack.enter_context(connect(base.replace("http://", "ws://") + "/ws?" + query, max_size=None,
                                             open_timeout=10))  # fmt: skip
            assert json.loads(ws.recv(timeout=10))["type"] == "hello"
            ws.send(json.dumps({"type": "select", "streams": {stream_name: None, stream_name + "-nan": None}}))
            drawn: dict[str, dict] = {}
            deadline = time.monotonic() + 20
            # Until both are drawn, the sensor's over a full level window (0.3 s): only then must it hold a NaN
            # (one every 0.1 s), however late its window joined the stream.
            while (len(drawn) < 2 or drawn[stream_name + "-nan"]["samples_shown"] < 300) and time.monotonic() < deadline:
                ws.send(json.dumps({"type": "frame", "width": 200, "seconds": 2}))
                while not isinstance(msg := ws.recv(timeout=10), bytes):
                    pass
                (hlen,) = np.frombuffer(msg[:4], "<u4")
                head = json.loads(msg[4 : 4 + hlen])
                assert not head["failed"], head["failed"]
                drawn.update({s["name"]: s for s in head["streams"]})
        assert set(drawn) == {stream_name, stream_name + "-nan"}
        assert drawn[stream_name]["levels"][0]["rms"] == pytest.approx(0.5 / np.sqrt(2), abs=0.02)
        assert drawn[stream_name + "-nan"]["levels"][0]["rms"] is None  # a NaN in the last 0.3 s: no figure
    finally:
        good.close()
        sensor.close()


@needs_browser
def test_a_stream_held_back_says_so_on_its_panel(broker, stream_name):
    # An operator: a stream whose publisher a stopped block task held back showed LIVE, its last observed rate and
    # "waiting for data", while `status` said "held back 10.0 s by task:rec#0".
    pub = slabcast.Publisher(stream_name, "int32", rate=1000.0, slab_bytes=8192, nslabs=2, max_chunk_bytes=4096,
                             timeout=60, address=broker.address)  # fmt: skip
    slow = slabcast.Subscriber(stream_name, size=256, clip=True, address=broker.address, label="slow-one")
    stop = threading.Event()

    def write() -> None:
        with contextlib.suppress(slabcast.SlabcastError):
            while not stop.is_set():
                pub.write(np.zeros(256, dtype=np.int32))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        with view_server("--address", broker.address) as (url, _proc), browser_page(url) as page:
            fig = page.locator(f'section.panel[data-name="{stream_name}"] [data-key="held back"]')
            fig.wait_for(timeout=TIMEOUT_MS)
            assert re.fullmatch(r"held back \d+\.\d s \(no free slab\) by slow-one", fig.inner_text()), fig.inner_text()
            assert "bad" in fig.get_attribute("class")
    finally:
        stop.set()
        slow.close()  # (the writer goes on, then stops)
        writer.join(30)
        pub.close()
