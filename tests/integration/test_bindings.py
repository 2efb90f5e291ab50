"""libslabcast bound from two other languages (issue 22 item 5): Rust with std only, Node.js through koffi.

Both programs (clients/bindings/rust/slabcast_binding.rs, clients/bindings/node/slabcast.js) use the library
`make install` put into a fresh prefix, found by pkg-config and run with no LD_LIBRARY_PATH: the Rust program is
linked with the flags `pkg-config --libs slabcast` gives (its rpath included), the Node one loads
`$(pkg-config --variable=libdir slabcast)/libslabcast.so.<ABI>`.  Each subscribes to a Python publisher's stream
(chunks equal, line for line, to a Python subscriber's and to what the rechunking rules promise) and publishes
frames that Python subscribers get exactly as from a Python publisher (bytes, t0, flags, per-sample times, dtype,
channels, metadata).  Each toolchain is used once per module: one build, one `npm ci` into a temporary directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slabcast
from tests.integration import test_c_install as _c_install
from tests.integration import workers as W
from tests.integration.test_c_client import ROOT, CSub, _unavailable, expected_chunks, make_frames
from tests.integration.test_c_install import Installed, _dynamic, _header_version, _readelf
from tests.integration.test_c_publisher import frames_of, run_case

installed = _c_install.installed  # the module fixture: clients/c built and `make install`ed into a fresh prefix

BINDINGS = ROOT / "clients" / "bindings"
RUST_SOURCE = BINDINGS / "rust" / "slabcast_binding.rs"
NODE_DIR = BINDINGS / "node"
NODE_FILES = ("package.json", "package-lock.json", "slabcast.js")
TICKS = re.compile(r"slabcast-node: event loop ticks while subscribed: (\d+)")


@dataclass
class Binding:
    """A built binding: its command line, and one launcher script per mode (``--mode`` given, the rest passed on)."""

    language: str
    argv: list[str]
    version: Path
    sub: Path
    pub: Path


def _launchers(directory: Path, language: str, argv: list[str]) -> Binding:
    paths = {}
    for mode in ("version", "sub", "pub"):
        path = directory / f"{language}-{mode}"
        path.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} --mode {mode} "$@"\n')
        path.chmod(0o755)
        paths[mode] = path
    return Binding(language, argv, **paths)


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def _rustc() -> str | None:
    """rustc on PATH, else rustup's (~/.cargo/bin is often not on a service's PATH)."""
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    for candidate in (shutil.which("rustc"), cargo_home / "bin" / "rustc", Path("/root/.cargo/bin/rustc")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def rustc_link_args(libs: str) -> list[str]:
    """`pkg-config --libs` as rustc arguments: -L dirs, -l libraries, everything else (the rpath) to the linker."""
    args = []
    for flag in libs.split():
        if flag.startswith("-L"):
            args += ["-L", f"native={flag[2:]}"]
        elif flag.startswith("-l"):
            args += ["-l", f"dylib={flag[2:]}"]
        else:
            args += ["-C", f"link-arg={flag}"]
    return args


@pytest.fixture(scope="module")
def rust_binding(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Binding:
    """The Rust program, compiled once with plain rustc and the flags of `pkg-config --libs slabcast`."""
    rustc = _rustc()
    if rustc is None:
        _unavailable("the Rust binding needs rustc (rustup, or Debian's: apt-get install rustc)")
    assert rustc is not None
    out = tmp_path_factory.mktemp("rust")
    exe = out / "slabcast-rs"
    env = _c_install._env_without_ld_path()
    built = _run([rustc, "--edition", "2021", "-O", str(RUST_SOURCE), "-o", str(exe),
                  *rustc_link_args(installed.pkg_config("--libs"))], env=env)  # fmt: skip
    assert built.returncode == 0, f"rustc failed:\n{built.stderr}"
    return _launchers(out, "rust", [str(exe)])


@pytest.fixture(scope="module")
def node_binding(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Binding:
    """The Node program with koffi as package-lock.json pins it, installed by `npm ci` into a temporary directory."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("the Node.js binding needs node and npm (apt-get install nodejs npm)")
    assert node is not None and npm is not None
    home = tmp_path_factory.mktemp("node")
    for name in NODE_FILES:
        shutil.copy(NODE_DIR / name, home / name)
    # Scripts off: koffi's own would build from source; its prebuilt binary comes as an optional dependency.
    done = _run([npm, "ci", "--ignore-scripts", "--prefer-offline", "--no-audit", "--no-fund"], cwd=home)
    if done.returncode != 0:
        _unavailable(f"`npm ci` of clients/bindings/node failed (is the npm registry reachable?):\n{done.stderr}")
    return _launchers(home, "node", [node, str(home / "slabcast.js")])


@pytest.fixture(scope="module", params=["rust", "node"])
def binding(request: pytest.FixtureRequest) -> Binding:
    return request.getfixturevalue(f"{request.param}_binding")  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _found_by_pkg_config(installed: Installed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bindings' processes find the installed library as a user's would: pkg-config, no LD_LIBRARY_PATH."""
    monkeypatch.setenv("PKG_CONFIG_PATH", str(installed.pc_path))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("SLABCAST_LIB", raising=False)


# ------------------------------------------------------------------ the library they load


def test_each_binding_loads_the_installed_library_and_checks_its_abi(binding, installed):
    major, minor, patch, text = _header_version()
    ran = _run([str(binding.version)])
    assert ran.returncode == 0, ran.stderr
    # The file the process mapped (its /proc/self/maps): the installed library, reached through the SONAME link.
    real = installed.prefix / "lib" / f"libslabcast.so.{major}.{minor}.{patch}"
    assert ran.stdout == f"libslabcast {text} {major} {minor} {patch} abi {major} mapped={real}\n", ran.stdout
    if binding.language == "rust":
        entries = _readelf(Path(binding.argv[0]))
        assert f"libslabcast.so.{major}" in _dynamic(entries, "NEEDED"), entries
        assert _dynamic(entries, "RUNPATH") + _dynamic(entries, "RPATH") == [str(real.parent)], entries


# ------------------------------------------------------------------ subscribing


SUB_CASE: dict[str, Any] = {
    "dtype": "int16",
    "channels": 2,
    "rate": 1000.0,
    "frames": 150,
    "max_frame": 600,
    "seed": 21,
}
SUB_SETTINGS = [(250, True), (777, False)]  # (size, clip)


def test_the_binding_subscribes_and_gets_python_subscribers_chunks(binding, broker, workers, queue, stream_name):
    case = SUB_CASE
    frames, data = make_frames(case)
    sample_bytes = np.dtype(case["dtype"]).itemsize * case["channels"]
    pub = slabcast.Publisher(
        stream_name, dtype=case["dtype"], channels=case["channels"], rate=case["rate"], address=broker.address,
        slab_bytes=1 << 15, nslabs=4,
    )  # fmt: skip
    subs: list[CSub] = []
    try:
        for size, clip in SUB_SETTINGS:  # a binding and a Python subscriber with each setting
            subs.append(CSub(binding.sub, broker.address, stream_name, "--size", str(size), *(["--clip"] * clip)))
            workers.spawn(W.subscribe, broker.address, stream_name, {"size": size, "clip": clip}, (size, clip),
                          queue, queue)  # fmt: skip
        for s in subs:
            s.wait_ready(30)
        for _ in SUB_SETTINGS:
            said = queue.get(timeout=60)
            assert said[0] == "sub-ready", said
        for frame, t0 in frames:
            pub.write(frame, t0=t0)
        pub.close()
        python = {}
        for _ in SUB_SETTINGS:
            tag, got, end, dropped = queue.get(timeout=60)
            assert (end, dropped) == ("end", 0), (tag, got, end)
            python[tag] = [(seq, index, n, f"{t0:.9f}", crc) for seq, index, n, t0, crc in got]
        for s, setting in zip(subs, SUB_SETTINGS, strict=True):
            assert s.finish(60) == 0, s.stderr
            want = expected_chunks(frames, *setting, case["rate"], sample_bytes, data)
            assert len(want) > 30
            assert python[setting] == want, f"the Python subscriber {setting} did not get what the rules promise"
            got = s.chunks()
            assert len(got) == len(want), f"{binding.language} {setting}: {len(got)} chunks, {len(want)} promised"
            for k, (a, b) in enumerate(zip(got, want, strict=True)):
                assert a == b, f"{binding.language} {setting}: chunk {k} (seq, index, n, t0, crc) {a} != {b}"
            if binding.language == "node":
                # sc_recv ran on koffi's worker thread: the event loop went on meanwhile.
                ticks = TICKS.search(s.stderr)
                assert ticks and int(ticks[1]) > 0, s.stderr
            else:
                assert s.stderr == ""
    finally:
        for s in subs:
            s.close()
        pub.close()


# ------------------------------------------------------------------ publishing

# run_case's layout (test_c_publisher.py): a time per sample on half the frames, jumps, every metadata field, three
# Python subscribers (clip or not, one woken by futex, one by seconds); slabs reused several times over.
PUB_CASE: dict[str, Any] = {
    "dtype": "int16", "channels": 3, "rate": 500.0, "slab_bytes": 1 << 15, "nslabs": 6, "frames": 120,
    "max_frame": 400, "seed": 23, "jump_every": 29, "timestamps": True,
    "meta": {"channel_names": ["x", "y", "z"], "channel_types": ["EMG", "EMG", "ACC"],
             "channel_units": ["microvolts", "microvolts", "g"], "source_id": "binding-proof"},
    "py": [("b300c-doorbell", {"size": 300, "clip": True}), ("b512-futex", {"size": 512, "wake": "futex"}),
           ("s05c-doorbell", {"seconds": 0.5, "clip": True})],
    "c": [],
}  # fmt: skip

_reference: dict[str, Any] = {}  # what a Python publisher's subscribers got (made once)


@pytest.mark.parametrize("kind", ["c", "c-loan"], ids=["write", "loan"])
def test_python_subscribers_get_from_the_binding_what_a_python_publisher_gives(
    binding, broker, workers, stream_name, kind
):
    case = PUB_CASE
    frames = frames_of(case)
    if not _reference:
        _reference.update(run_case("python", case, frames, binding.pub, binding.sub, broker, workers,
                                   stream_name + "p"))  # fmt: skip
    got = run_case(kind, case, frames, binding.pub, binding.sub, broker, workers, stream_name + "b")
    assert got["status"] == _reference["status"], "the broker describes the two streams differently"
    meta = case["meta"]
    described = ("<i2", 3, 500.0, tuple(meta["channel_names"]), tuple(meta["channel_types"]),
                 tuple(meta["channel_units"]), meta["source_id"], True)  # fmt: skip
    for tag, _ in case["py"]:
        chunks, end, dropped, start, info = _reference[tag]
        assert (end, dropped, start) == ("EndOfStream", 0, 0), (tag, end, dropped, start)
        assert len(chunks) > 20
        b_chunks, b_end, b_dropped, b_start, b_info = got[tag]
        assert (b_end, b_dropped, b_start) == (end, dropped, start), tag
        assert b_info[0] == stream_name + "b"
        assert tuple(tuple(x) if isinstance(x, list) else x for x in b_info[1:]) == described, b_info
        assert b_info[1:] == info[1:], f"{tag}: the stream's info differs from the Python publisher's"
        assert len(b_chunks) == len(chunks), f"{tag}: {len(b_chunks)} chunks from the binding, {len(chunks)}"
        for k, (a, b) in enumerate(zip(b_chunks, chunks, strict=True)):
            assert a == b, f"{tag}: chunk {k} (seq, index, n, t0, crc, flags, times crc) {a} != {b}"
    assert any(c[5] for c in got["b300c-doorbell"][0]), "no chunk was flagged: the jumps were not carried"
    counters = got["counters"]
    total = sum(n for _, n, _, _, _ in frames)
    assert (counters["frames"], counters["samples"], counters["filled"]) == (len(frames), total, 56), counters
    # (Its futex subscriber sleeps with its byte in the futex sleeper table: woken while it sleeps, not after every
    # frame; it got every chunk above.)
    assert counters["slabs"] > case["nslabs"] and counters["wakes"] >= 1, counters
