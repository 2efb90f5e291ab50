"""Sharing a broker with a group, and refusing what another user made (issue 19, items 15 and 16)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import slabcast


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A short directory under /tmp that every uid may enter (pytest's tmp_path is 0700, and long)."""
    path = Path(tempfile.mkdtemp(prefix="sc-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env_without_runtime_dir(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "SLABCAST_ADDRESS")}
    env["TMPDIR"] = str(tmp)
    return env


@pytest.mark.parametrize("command", [["broker"], ["status"]])
def test_a_default_directory_made_by_another_user_is_refused(shared_tmp, command):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another uid needs root")
    # Without XDG_RUNTIME_DIR the address lives in <tmp>/slabcast-<uid>: another user who made it first,
    # mode 0777, could hold the address (issue 19, item 16).
    theirs = shared_tmp / f"slabcast-{os.getuid()}"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, 4242, 4242)
    proc = subprocess.run([sys.executable, "-m", "slabcast", *command], env=_env_without_runtime_dir(shared_tmp),
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode != 0
    assert f"refusing the broker directory {theirs} (owner uid 4242, mode 0777" in proc.stderr, proc.stderr
    assert "belongs to another user" in proc.stderr
    assert not (theirs / "slabcast").exists()  # nothing made in it


_BROKER_UID, _GROUP, _MEMBER_UID, _STRANGER_UID = 4301, 4300, 4302, 4303

# Run as another uid: subscribe, print the first chunk's shape, or the error's type and message.
_SUBSCRIBE = textwrap.dedent(
    """
    import sys, slabcast
    try:
        with slabcast.Subscriber(sys.argv[1], size=480, address=sys.argv[2], timeout=10) as sub:
            chunk = sub.recv(timeout=10)
            print("ok", chunk.data.shape, flush=True)
            chunk.release()
    except Exception as exc:
        print(type(exc).__name__, isinstance(exc, PermissionError), exc, flush=True)
    """
)


def _setpriv(uid: int, gid: int, groups: list[int]) -> list[str]:
    """The command prefix that runs a program as ``uid``:``gid`` with exactly ``groups`` as supplementary groups."""
    return ["setpriv", "--reuid", str(uid), "--regid", str(gid),
            *(["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"])]  # fmt: skip


def _as(uid: int, gid: int, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_setpriv(uid, gid, groups), sys.executable, "-c", _SUBSCRIBE, *args], umask=0o022,
                          capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip


def _start_broker(address: str, shm_mode: str, source: str) -> subprocess.Popen[bytes]:
    """`slabcast broker` as the service user would run it from the shipped unit: User=, Group=, UMask=0022."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [*_setpriv(_BROKER_UID, _GROUP, []), sys.executable, "-m", "slabcast", "broker", "--address", address,
         "--shm-mode", shm_mode, "--source", source, "--ready-fd", str(write_fd)],
        pass_fds=(write_fd,), umask=0o022,
        stderr=subprocess.PIPE, cwd="/", start_new_session=True,
    )  # fmt: skip
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        line = os.read(read_fd, 4096) if ready else b""
    finally:
        os.close(read_fd)
    if not line.startswith(b"ready"):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the broker did not start: {err.decode()}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    return err.decode()


@pytest.fixture
def as_root() -> None:
    if os.getuid() != 0:
        pytest.skip("running clients as other uids needs root (CI runs as root)")
    if shutil.which("setpriv") is None:
        pytest.skip("running clients as other uids needs setpriv (util-linux)")


def test_a_group_member_uses_a_broker_run_like_the_shipped_unit(as_root, shared_tmp, stream_name):
    # --shm-mode 660 made 0660 segments but 0755 sockets (umask 022): a group member got "no answer from the
    # broker within 5.0 s" (issue 19, item 15). The runtime directory as systemd makes it: 0750, the service's.
    run = shared_tmp / "run"
    run.mkdir(mode=0o750)
    os.chown(run, _BROKER_UID, _GROUP)
    address = f"ipc://{run}/broker.sock"
    proc = _start_broker(address, "660", f"synthetic:name={stream_name},rate=48000,channels=1,frame=480")
    try:
        assert stat.S_IMODE(os.stat(run / "broker.sock").st_mode) == 0o660
        member = _as(_MEMBER_UID, _MEMBER_UID, [_GROUP], stream_name, address)
        assert member.stdout.startswith("ok (480,)"), member.stdout + member.stderr
        notices = [p for p in run.iterdir() if p.name.startswith("broker.sock.") and not p.name.endswith(".lock")]
        assert notices and all(stat.S_IMODE(p.stat().st_mode) == 0o660 for p in notices)
        segments = [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"slabcast.{proc.pid}.")]
        assert segments and all(stat.S_IMODE(p.stat().st_mode) == 0o660 and p.stat().st_gid == _GROUP
                                for p in segments)  # fmt: skip
        # Not in the group: a PermissionError at once, naming the directory and its mode, not a timeout.
        t = time.monotonic()
        stranger = _as(_STRANGER_UID, _STRANGER_UID, [], stream_name, address)
        assert time.monotonic() - t < 10
        assert stranger.stdout.startswith(f"AccessDeniedError True this user (uid {_STRANGER_UID}, groups "
                                          f"{_STRANGER_UID}) may not enter {run} (mode 0750 (drwxr-x---), owner "
                                          f"{_BROKER_UID}, group {_GROUP})"), stranger.stdout + stranger.stderr  # fmt: skip
    finally:
        log = _stop(proc)
    assert "does not let that group reach" not in log


def test_without_permission_on_the_socket_a_client_gets_a_permission_error(as_root, shared_tmp, stream_name):
    # A directory everyone may enter, a broker that shares nothing (--shm-mode 600): its socket is 0600.
    run = shared_tmp / "run"
    run.mkdir(mode=0o755)
    os.chown(run, _BROKER_UID, _GROUP)
    address = f"ipc://{run}/broker.sock"
    proc = _start_broker(address, "600", f"synthetic:name={stream_name},rate=48000,channels=1,frame=480")
    try:
        t = time.monotonic()
        member = _as(_MEMBER_UID, _MEMBER_UID, [_GROUP], stream_name, address)
        assert time.monotonic() - t < 10
        assert member.stdout.startswith(f"AccessDeniedError True this user (uid {_MEMBER_UID}, groups {_GROUP}, "
                                        f"{_MEMBER_UID}) may not connect to the broker socket {run}/broker.sock "
                                        f"(mode 0600 (srw-------)"), member.stdout + member.stderr  # fmt: skip
    finally:
        _stop(proc)


def test_a_group_broker_warns_when_its_group_cannot_reach_the_socket(as_root, shared_tmp, stream_name):
    private = shared_tmp / "private"
    private.mkdir(mode=0o700)
    os.chown(private, _BROKER_UID, _GROUP)
    (private / "run").mkdir(mode=0o755)
    os.chown(private / "run", _BROKER_UID, _GROUP)
    proc = _start_broker(f"ipc://{private}/run/broker.sock", "660", f"synthetic:name={stream_name},rate=8000")
    log = _stop(proc)
    assert f"{private} (mode 0700, group {_GROUP}) does not let that group reach the socket" in log, log


def test_a_wrong_curve_key_is_a_clear_error_and_the_broker_logs_it(tmp_path, stream_name):
    # A wrong broker key said the broker "went away"; the broker logged nothing about refused clients.
    for name, where in (("broker", tmp_path), ("client", tmp_path / "clients"), ("stranger", tmp_path / "other")):
        subprocess.run([sys.executable, "-m", "slabcast", "keygen", name, "--dir", str(where)],
                       capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    broker = slabcast.BrokerProcess(tmp_path / "b.sock", args=(
        "--tcp", "127.0.0.1:0", "--curve-secret", str(tmp_path / "broker.key_secret"),
        "--curve-clients", str(tmp_path / "clients")))  # fmt: skip
    with broker:
        wrong_server = (str(tmp_path / "clients" / "client.key_secret"), str(tmp_path / "other" / "stranger.key"))
        t = time.monotonic()
        with pytest.raises(slabcast.AccessDeniedError, match=rf"no CURVE handshake with {broker.tcp_address} .*: "
                           r"wrong server key \(.*stranger.key\), or this client's key is not authorized"):  # fmt: skip
            slabcast.Subscriber(stream_name, size=10, address=broker.tcp_address, curve=wrong_server)
        assert time.monotonic() - t < 5
        stranger = (str(tmp_path / "other" / "stranger.key_secret"), str(tmp_path / "broker.key"))
        with pytest.raises(slabcast.AccessDeniedError, match="refused this client's CURVE key"):
            slabcast.broker_status(broker.tcp_address, curve=stranger)
        good = (str(tmp_path / "clients" / "client.key_secret"), str(tmp_path / "broker.key"))
        assert slabcast.broker_status(broker.tcp_address, curve=good)["pid"] == broker.pid
        broker.stop()
    log = broker.stderr()
    assert f"refused a CURVE handshake on {broker.tcp_address}: its hello could not be decrypted" in log, log
    public = (tmp_path / "other" / "stranger.key").read_text().split('public-key = "')[1].split('"')[0]
    assert f"refused a CURVE client at 127.0.0.1: Unknown key (public key {public} is not in" in log, log
