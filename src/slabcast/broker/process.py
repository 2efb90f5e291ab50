"""BrokerProcess: start a broker as a child process, wait until it is ready, stop and reap it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
from typing import Any

from .._exceptions import BrokerGoneError
from ..wire.address import ipc_path, normalize
from .lock import AddressLock

__all__ = ["BrokerProcess"]


class BrokerProcess:
    """A broker running in a child process (``python -m slabcast broker``).

    Parameters
    ----------
    address : str, optional
        Where it listens; default ``$SLABCAST_ADDRESS`` or the per-user default.
    args : sequence of str
        Extra command-line arguments for ``slabcast broker``.
    startup_timeout : float
        Seconds to wait for the broker's ready signal.
    die_with_parent : bool
        Stop the broker when this process dies, so a crashed test or supervisor
        leaves no orphan broker.  The broker watches a pipe whose other end only
        this process holds (the kernel closes it when the *process* ends, whichever
        thread started the broker; ``PR_SET_PDEATHSIG`` would fire when that thread
        ended).
    inherit_stderr : bool
        Let the broker's log lines go to this process's standard error instead
        of keeping them for :meth:`stderr`.
    stderr_fd : int, optional
        A descriptor for the broker's standard error (``slabcast up`` passes a
        pipe it copies to its own standard error, keeping the last lines).

    Examples
    --------
    >>> with slabcast.BrokerProcess(tmp_path / "b.sock") as broker:   # doctest: +SKIP
    ...     pub = slabcast.Publisher("mic", address=broker.address)
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | None = None,
        *,
        args: tuple[str, ...] = (),
        startup_timeout: float = 10.0,
        die_with_parent: bool = True,
        inherit_stderr: bool = False,
        stderr_fd: int | None = None,
    ) -> None:
        self.address = normalize(address)
        self.inherit_stderr = inherit_stderr
        self.stderr_fd = stderr_fd  # the broker's standard error goes there (a pipe `slabcast up` reads)
        self.args = tuple(args)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._stderr_text = ""
        self.tcp_address: str | None = None  # set when started with --tcp
        self.die_with_parent = die_with_parent
        self.killed = False  # by kill(): on purpose
        self._parent_w = -1

    @property
    def pid(self) -> int:
        """The broker's process id."""
        if self.process is None:
            raise RuntimeError("the broker is not started")
        return self.process.pid

    def start(self) -> BrokerProcess:
        """Spawn the broker and block until it serves, or raise with what it printed.

        Raises
        ------
        BrokerRunningError
            At once, if a broker already serves this address.
        BrokerGoneError
            If the broker did not start within ``startup_timeout``.
        """
        self.killed = False
        path = ipc_path(self.address)
        if path is not None and os.path.exists(path + ".lock"):
            AddressLock(self.address).release()  # BrokerRunningError now, rather than a timeout later
        read_fd, write_fd = os.pipe()
        watch: list[str] = []
        keep: tuple[int, ...] = (write_fd,)
        if self.die_with_parent:
            watch_r, self._parent_w = os.pipe()  # ours stays non-inheritable: only this process holds it
            watch, keep = ["--parent-fd", str(watch_r)], (write_fd, watch_r)
        if not self.inherit_stderr:
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)  # a pipe nobody reads would stall a chatty broker
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "slabcast",
                    "broker",
                    "--address",
                    self.address,
                    "--ready-fd",
                    str(write_fd),
                    *watch,
                    *self.args,
                ],
                pass_fds=keep,
                start_new_session=True,  # its own process group: a terminal's Ctrl-C is ours to relay
                stderr=self._stderr if self.stderr_fd is None else self.stderr_fd,  # None: to our standard error
            )
        finally:
            for fd in keep:
                os.close(fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], self.startup_timeout)
            line = os.read(read_fd, 4096) if ready else b""
        finally:
            os.close(read_fd)
        if not line.startswith(b"ready"):
            self.stop(timeout=2)
            err = self.stderr()
            raise BrokerGoneError(
                f"the broker at {self.address} did not start within {self.startup_timeout} s "
                f"(exit code {self.process.returncode}): {err or 'no output'}"
            )
        words = line.decode().split()
        if "and" in words:
            self.tcp_address = words[words.index("and") + 1]
        return self

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the broker (``sig``: SIGTERM), wait ``timeout`` s, SIGKILL it if it must; return its exit
        code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_stderr()
        return proc.returncode

    def _close_parent_pipe(self) -> None:
        if self._parent_w >= 0:
            os.close(self._parent_w)
            self._parent_w = -1

    def _close_stderr(self) -> None:
        self._close_parent_pipe()
        self._stderr_text = self.stderr()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def stderr(self) -> str:
        """What the broker wrote to its standard error so far."""
        f = self._stderr
        if f is None:
            return self._stderr_text
        f.seek(0)
        return str(f.read().decode(errors="replace").strip())

    def kill(self, group: bool = False) -> None:
        """SIGKILL the broker (``group=True``: its whole process group) and reap it.  Its death is then on
        purpose (:attr:`killed`): the ``slabcast_broker`` fixture does not fail the test for it (call this
        after killing it another way too)."""
        self.killed = True
        if self.process is not None and self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
            self.process.wait()
        self._close_stderr()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the broker to exit by itself; return its exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
